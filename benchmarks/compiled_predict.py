"""Compiled prediction on a CPU: torch.compile's bf16 and torchao's compiled int8 against the eager bf16 default.

    python benchmarks/compiled_predict.py         # the MiniLM run of benchmarks/int8.py; about 5 minutes; alone
    python benchmarks/compiled_predict.py --runs runs/bench/mpnet-first-token-s42 --test-rows 500   # about 10 minutes

`benchmarks/int8_kernels.py` bounds torch's eager int8 linear layers on a CPU that multiplies bf16 natively; a
compiled graph can fuse the quantisation around each int8 product into it. Five ways to predict with one trained run
(LoRA merged), on the same texts, all batched as `Run.predict` batches (modeling.predict_logits):
- bf16: `Run.predict`, the default (eager, bf16 autocast; the script stops on a CPU without bf16);
- bf16 compiled: the same model through `torch.compile(dynamic=True)` with inductor's freezing (weights folded in as
  constants and prepacked for the CPU's matmul library);
- torch int8: `runfolder.load(precision="int8")`, what `--precision int8` runs (eager);
- torchao int8 compiled: torchao's `Int8DynamicActivationInt8WeightConfig` (int8 weights per output row, activations
  quantised per token as each batch comes) on every linear layer, compiled as above, bf16 autocast around it. Needs
  `pip install torchao` (not a budgetlora dependency); skipped with a line saying so when it is missing;
- torchao PT2E int8 compiled: graph-mode static int8 (`torch.export`, torchao's X86InductorQuantizer calibrated on 256
  training texts, inductor with freezing), fp32 around the int8 products; with torch 2.13 and torchao 0.18 it does
  not compile (inductor's freezing inserts onednn.qlinear_prepack, which has no fake-tensor kernel): the script says
  so in one line and leaves its row out.
Columns: the seconds of the first pass over the test texts (compilation included; loading and quantising are not),
accuracy on the first test rows of the official AG News test split and on the 484 labelled generated texts, the share
of test labels equal to bf16's, and samples/s over the test texts: the median of `--repeats` passes, the ways taking
turns pass by pass (a machine's speed drifts; turns keep the drift out of the ratios). The last line is JSON with
every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from shared_data import AG_NEWS_TRAIN, ROOT, eval_texts
from table import markdown_table
from torch import nn

from budgetlora import runfolder
from budgetlora.data import load_table
from budgetlora.export_onnx import TensorLogits
from budgetlora.modeling import length_sorted_batches, predict_logits

RUN = "runs/bench/minilm-no-dropout-s42"

Predict = Callable[[list[str]], np.ndarray]


def compiled_predictor(model: nn.Module, run: runfolder.Run) -> Predict:
    """Logits from `model` compiled by inductor with freezing (dynamic shapes: one graph for every batch length), in
    bf16 autocast, batched as Run.predict batches."""
    compiled = torch.compile(model, dynamic=True, options={"freezing": True})
    return lambda texts: predict_logits(compiled, run.tokenizer, texts, max_length=run.config.model.max_length,
                                        batch_size=run.config.train.eval_batch_size, precision="bf16",
                                        pad_to_max_length=run.config.model.pad_to_max_length)


def torchao_int8(model: nn.Module) -> nn.Module | None:
    """A copy of `model` with torchao's dynamic int8 linear layers; None when torchao is not installed."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return None
    quantized = copy.deepcopy(model)
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
    return quantized


def pt2e_int8(run: runfolder.Run, calibration: list[str]) -> Predict:
    """torchao's PT2E static int8 of the run's model (X86InductorQuantizer: int8 weights per channel, activations per
    tensor with scales calibrated on `calibration`), exported with dynamic batch and length, compiled by inductor
    with freezing. Compiled on the calibration texts here, so that a failure shows before any timing."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    length = {"truncation": True, "max_length": run.config.model.max_length}
    example = run.tokenizer(calibration[:8], padding=True, return_tensors="pt", **length)
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("length", min=2, max=512)}
    exported = torch.export.export(TensorLogits(copy.deepcopy(run.model)).eval(), (example["input_ids"],
                                   example["attention_mask"]), dynamic_shapes=(dims, dims)).module()
    prepared = prepare_pt2e(exported, x86.X86InductorQuantizer().set_global(
        x86.get_default_x86_inductor_quantization_config()))
    with torch.no_grad():
        for batch in (run.tokenizer(calibration[i:i + 64], padding=True, return_tensors="pt", **length)
                      for i in range(0, len(calibration), 64)):
            prepared(batch["input_ids"], batch["attention_mask"])
    compiled = torch.compile(convert_pt2e(prepared), dynamic=True, options={"freezing": True})

    @torch.inference_mode()  # as Run.predict runs: the graph compiled (and frozen) without autograd is the one timed
    def predict(texts: list[str]) -> np.ndarray:  # batched as Run.predict batches on a CPU
        logits = np.empty((len(texts), run.model.config.num_labels), dtype=np.float32)
        for rows, batch in length_sorted_batches(run.tokenizer, texts, max_length=run.config.model.max_length,
                                                 batch_size=run.config.train.eval_batch_size):
            logits[rows] = compiled(batch["input_ids"], batch["attention_mask"]).float().numpy()
        return logits

    predict(calibration[:64])
    return predict


def predictors(run_dir: Path) -> tuple[runfolder.Run, dict[str, Predict]]:
    """The run loaded for bf16 prediction, and each way's predict function (torchao's only when installed)."""
    run = runfolder.load(run_dir)
    if run.precision != "bf16":
        raise SystemExit(f"{run_dir}: predicts in {run.precision} on this machine; this benchmark compares with bf16")
    ways: dict[str, Predict] = {
        "bf16": run.predict,
        "bf16 compiled": compiled_predictor(run.model, run),
        "torch int8": runfolder.load(run_dir, precision="int8").predict,
    }
    quantized = torchao_int8(run.model)
    if quantized is None:
        print("torchao is not installed (pip install torchao): its row is skipped", flush=True)
    else:
        ways["torchao int8 compiled"] = compiled_predictor(quantized, run)
        training = load_table(str(AG_NEWS_TRAIN), run.config.data, labelled=True)["text"][:]
        calibration = [training[i] for i in np.random.default_rng(0).choice(len(training), 256, replace=False)]
        try:
            ways["torchao PT2E int8 compiled"] = pt2e_int8(run, calibration)
        except Exception as error:  # noqa: BLE001 - any failure of the export/quantise/compile chain is the result
            print(f"torchao PT2E int8 (X86InductorQuantizer, static) does not run here: {type(error).__name__}: "
                  f"{str(error).strip().splitlines()[0][:200]}", flush=True)
    return run, ways


def measure_run(run_dir: Path, test_rows: int, repeats: int) -> list[dict]:
    """Every way on one run: first-pass seconds, accuracies, agreement with bf16, median samples/s."""
    run, ways = predictors(run_dir)
    test_texts, test_labels, dev_texts, dev_labels = eval_texts(run, test_rows)
    results = {}
    for way, predict in ways.items():
        started = time.perf_counter()
        labels = predict(test_texts).argmax(-1)
        results[way] = {"run": run_dir.name, "way": way, "test_rows": len(test_texts),
                        "first_pass_s": time.perf_counter() - started,
                        "test_accuracy": float(np.mean(labels == test_labels)),
                        "dev_accuracy": float(np.mean(predict(dev_texts).argmax(-1) == dev_labels)),
                        "labels": labels, "pass_s": []}
    for _ in range(repeats):
        for way, predict in ways.items():  # in turns: drift in the machine's speed reaches every way alike
            started = time.perf_counter()
            predict(test_texts)
            results[way]["pass_s"].append(time.perf_counter() - started)
    bf16 = results["bf16"]
    for result in results.values():
        result["samples_per_s"] = len(test_texts) / float(np.median(result["pass_s"]))
        result["x_bf16"] = float(np.median(bf16["pass_s"]) / np.median(result["pass_s"]))
        result["agreement_with_bf16"] = float(np.mean(result["labels"] == bf16["labels"]))
    return [{key: value for key, value in result.items() if key != "labels"} for result in results.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", type=Path, default=[ROOT / RUN])
    parser.add_argument("--threads", type=int, default=2, help="torch's intra-op threads")
    parser.add_argument("--test-rows", type=int, default=2000, help="the first N rows of the official test split")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each way, taking turns")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [result for run_dir in args.runs for result in measure_run(run_dir, args.test_rows, args.repeats)]
    print(f"\n{args.threads} thread(s); AG test: the first {results[0]['test_rows']:,} rows of the official test "
          f"split; dev: the 484 labelled generated texts; samples/s: the median of {args.repeats} passes over the "
          f"AG test texts, the ways taking turns; first pass: compilation included, loading and quantising not\n")
    print(markdown_table(
        ["run", "way", "first pass s", "AG test acc", "dev acc", "agreement with bf16", "samples/s", "x bf16"],
        [[r["run"], r["way"], r["first_pass_s"], f"{100 * r['test_accuracy']:.2f}", f"{100 * r['dev_accuracy']:.2f}",
          f"{100 * r['agreement_with_bf16']:.2f}", r["samples_per_s"], r["x_bf16"]] for r in results]))
    print(json.dumps({"threads": args.threads, "results": [
        {key: round(value, 4) if isinstance(value, float) else value for key, value in r.items() if key != "pass_s"}
        for r in results]}))


if __name__ == "__main__":
    main()
