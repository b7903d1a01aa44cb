"""The ceiling of int8 prediction on this CPU: one linear layer's throughput in bf16 against torch's int8 kernels.

    python benchmarks/int8_kernels.py            # about a minute; alone on the machine
    python benchmarks/int8_kernels.py --threads 1

`--precision int8` (modeling.quantize_int8) swaps every nn.Linear for torch's dynamically quantised one; the rest of
the model (attention, GELU, layer norm) then runs in fp32 instead of bf16. Whether that can pay is bounded by the
linear layers alone: each shape below is one of MiniLM's or roberta-base's, over a batch of 128 texts of 60 tokens
(AG News' length), timed as TFLOP/s for
- fp32 and bf16: the layer with its bias (bf16: what the default prediction's autocast runs);
- int8 x86 / int8 onednn: modeling.quantize_int8's layer (activations quantised per call) packed for that engine;
- _int_mm: torch's bare int8 x int8 -> int32 product, no quantisation around it (an upper bound for int8).
The last line is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from table import markdown_table
from torch import nn

from budgetlora.modeling import quantize_int8

# (model, layer, in_features, out_features) of MiniLM (hidden 384, FFN 1536) and roberta-base (768, 3072).
SHAPES = [("minilm", "attention", 384, 384), ("minilm", "ffn in", 384, 1536), ("minilm", "ffn out", 1536, 384),
          ("roberta-base", "attention", 768, 768), ("roberta-base", "ffn in", 768, 3072),
          ("roberta-base", "ffn out", 3072, 768)]
TOKENS = 128 * 60


def seconds_per_call(call: Callable[[], object], seconds: float = 1.0) -> float:
    """Mean wall time of `call` over about `seconds`, after one untimed call."""
    call()  # first use: packing, allocation
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        count += 1
    return (time.perf_counter() - started) / count


@torch.inference_mode()
def measure(in_features: int, out_features: int) -> dict[str, float]:
    """TFLOP/s of each way for one layer of this shape over TOKENS rows."""
    x, layer = torch.randn(TOKENS, in_features), nn.Linear(in_features, out_features)
    xb, wb, bb = x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16()
    xi = torch.randint(-127, 127, (TOKENS, in_features), dtype=torch.int8)
    wi = torch.randint(-127, 127, (in_features, out_features), dtype=torch.int8)
    ways = {"fp32": lambda: layer(x), "bf16": lambda: nn.functional.linear(xb, wb, bb),
            "_int_mm": lambda: torch._int_mm(xi, wi)}
    for engine in ("x86", "onednn"):
        if engine in torch.backends.quantized.supported_engines:
            quantised = quantize_int8(nn.Sequential(layer), engine=engine)
            ways[f"int8 {engine}"] = lambda quantised=quantised: quantised(x)
    flops = 2 * TOKENS * in_features * out_features
    return {name: flops / seconds_per_call(call) / 1e12 for name, call in ways.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [{"model": model, "layer": name, "shape": f"{fan_in}x{fan_out}", **measure(fan_in, fan_out)}
               for model, name, fan_in, fan_out in SHAPES]
    ways = [key for key in results[0] if key not in ("model", "layer", "shape")]
    print(f"TFLOP/s of one linear layer over {TOKENS} tokens, {args.threads} thread(s); int8 x86 is what "
          f"--precision int8 runs\n")
    print(markdown_table(["model", "layer", "in x out", *ways, "int8 x86 / bf16"],
                         [[r["model"], r["layer"], r["shape"], *(r[w] for w in ways),
                           r.get("int8 x86", float("nan")) / r["bf16"]] for r in results]))
    print(json.dumps({"threads": args.threads, "layers": results}))


if __name__ == "__main__":
    main()
