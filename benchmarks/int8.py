"""int8 prediction on a CPU: torch dynamic int8 against ONNX Runtime dynamic int8, next to the default precision.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/int8.py      # the two MiniLM runs; about 30 minutes
    OMP_NUM_THREADS=1 python benchmarks/int8.py --runs runs/bench/minilm-no-dropout-s42 --test-rows 300   # a quick look

Four ways to predict with one trained run, each on 1 thread:
- default: `runfolder.load(run)` then `run.predict` (LoRA merged, bf16 autocast where the CPU multiplies bf16
  natively, else fp32: the precision is printed beside it);
- torch int8: `runfolder.load(run, precision="int8")` (modeling.quantize_int8: every nn.Linear dynamically quantised);
- ORT int8: `runfolder.load(run, precision="int8-onnx")` (onnx_int8.py: the graph of `budgetlora export --format
  onnx`, its weights quantised per channel to 7-bit QInt8 by onnxruntime.quantization.quantize_dynamic, run by
  onnxruntime's CPU provider);
- ORT fused int8: the same graph after onnxruntime.transformers.optimizer's BERT fusions (attention, layer norm,
  GELU), then quantised the same way.
The fused way batches as modeling.predict_logits does (and so as the others): longest-first batches of the run's
eval_batch_size, padded to their longest text, original order restored. Columns: accuracy on the official AG News test
split (7,600 rows), on the competition file's 484 labelled generated texts (dev_ood_labels.csv), the share of test
labels equal to the default's, the test labels that change when the same texts come in another (seeded) order (int8
quantises activations with one scale a batch, so a text's label can depend on the texts batched with it), and
samples/s over the test texts, timed after one untimed pass over them (the kernels' first use of each batch shape),
with its ratio to the default's. The one-time preparation (loading, quantising, exporting, fusing) is not timed with
prediction: it is printed in its own table. The last line of the output is JSON with every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnxruntime.transformers.optimizer import optimize_model
from shared_data import ROOT, eval_texts
from table import markdown_table
from transformers import PreTrainedTokenizerBase

from budgetlora import runfolder
from budgetlora.export import PROBE_TEXTS
from budgetlora.export_onnx import ONNX_FILE, write_onnx
from budgetlora.modeling import length_sorted_batches
from budgetlora.onnx_int8 import quantize_graph

RUNS = ["runs/bench/minilm-no-dropout-s42", "runs/bench/minilm-no-dropout-s43"]
# Texts of other lengths than the export's example batch: the fused graph must give the plain graph's logits on them.
CHECK_TEXTS = [*reversed(PROBE_TEXTS), "a third text", "Oil prices rose on Tuesday after the storm shut refineries."]

Predict = Callable[[list[str]], np.ndarray]


class OrtPredictor:
    """Logits from an ONNX graph on one CPU thread, batched as modeling.predict_logits batches on a CPU
    (length_sorted_batches)."""

    def __init__(self, path: Path, run: runfolder.Run, threads: int) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [node.name for node in self.session.get_inputs()]
        self.tokenizer: PreTrainedTokenizerBase = run.tokenizer
        self.max_length = run.config.model.max_length
        self.batch_size = run.config.train.eval_batch_size
        self.pad_to_max_length = run.config.model.pad_to_max_length
        self.num_labels = len(run.label_names)

    def __call__(self, texts: list[str]) -> np.ndarray:
        logits = np.empty((len(texts), self.num_labels), dtype=np.float32)
        for rows, batch in length_sorted_batches(self.tokenizer, texts, max_length=self.max_length,
                                                 batch_size=self.batch_size, pad_to_max_length=self.pad_to_max_length,
                                                 tensors="np"):
            feed = {name: (batch[name] if name in batch else np.zeros_like(batch["input_ids"])).astype(np.int64)
                    for name in self.inputs}
            logits[rows] = self.session.run(["logits"], feed)[0]
        return logits


def int8_copy(source: Path, target: Path) -> float:
    """`source` with its weights quantised as `--precision int8-onnx` quantises them (onnx_int8.quantize_graph),
    written to `target`; the seconds taken."""
    started = time.perf_counter()
    quantize_graph(source, target)
    return time.perf_counter() - started


def fused_copy(source: Path, target: Path, run: runfolder.Run) -> tuple[float, dict[str, int]]:
    """`source` after onnxruntime's BERT graph fusions, written to `target`; the seconds taken and the fused ops."""
    config = run.model.config
    started = time.perf_counter()
    optimized = optimize_model(str(source), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
    optimized.save_model_to_file(str(target))
    elapsed = time.perf_counter() - started
    return elapsed, {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}


def timed(predict: Predict, texts: list[str]) -> tuple[np.ndarray, float]:
    """The logits of a second pass of `predict` over `texts` and its samples/s (the first pass is untimed)."""
    predict(texts)
    started = time.perf_counter()
    logits = predict(texts)
    return logits, len(texts) / (time.perf_counter() - started)


def measure_run(run_dir: Path, threads: int, test_rows: int | None, workdir: Path) -> list[dict]:
    """Every way on one run: accuracies, agreement with the default, samples/s, the one-time preparation's seconds."""
    started = time.perf_counter()
    run = runfolder.load(run_dir)
    prepared = {"default": time.perf_counter() - started}
    test_texts, test_labels, dev_texts, dev_labels = eval_texts(run, test_rows)
    notes = {"default": f"runfolder.load ({run.precision})",
             "torch int8": "runfolder.load(precision=\"int8\"), quantize_int8 included",
             "ORT int8": "runfolder.load(precision=\"int8-onnx\"), export and quantisation included"}
    predictors: dict[str, Predict] = {"default": run.predict}
    for way, precision in (("torch int8", "int8"), ("ORT int8", "int8-onnx")):
        started = time.perf_counter()
        predictors[way] = runfolder.load(run_dir, precision=precision).predict
        prepared[way] = time.perf_counter() - started

    folder = workdir / run_dir.name
    folder.mkdir(parents=True)
    started = time.perf_counter()
    write_onnx(copy.deepcopy(run.model), run.tokenizer, folder, run.label_names, run.config.model.max_length,
               PROBE_TEXTS)
    exported = time.perf_counter() - started
    plain = folder / ONNX_FILE

    fuse_s, fused_ops = fused_copy(plain, folder / "fused.onnx", run)
    # The fusions must not change the fp32 graph's logits: checked on texts of other lengths than the export's.
    difference = float(np.abs(OrtPredictor(plain, run, threads)(CHECK_TEXTS)
                              - OrtPredictor(folder / "fused.onnx", run, threads)(CHECK_TEXTS)).max())
    quantise_s = int8_copy(folder / "fused.onnx", folder / "fused-int8.onnx")
    prepared["ORT fused int8"] = exported + fuse_s + quantise_s
    predictors["ORT fused int8"] = OrtPredictor(folder / "fused-int8.onnx", run, threads)
    notes["ORT fused int8"] = f"export {exported:.1f} s + fuse {fuse_s:.1f} s + quantise {quantise_s:.1f} s"
    fusion = {"fused_ops": fused_ops, "fused_vs_plain_fp32_max_logit_difference": difference}

    results, reference = [], None
    order = np.random.default_rng(0).permutation(len(test_texts))
    for way, predict in predictors.items():
        logits, speed = timed(predict, test_texts)
        labels = logits.argmax(-1)
        reordered = np.empty_like(labels)
        reordered[order] = predict([test_texts[row] for row in order]).argmax(-1)
        reference = labels if reference is None else reference
        results.append({
            "run": run_dir.name, "way": way, "default_precision": run.precision, "test_rows": len(test_texts),
            "test_accuracy": float(np.mean(labels == test_labels)),
            "dev_accuracy": float(np.mean(predict(dev_texts).argmax(-1) == dev_labels)),
            "agreement_with_default": float(np.mean(labels == reference)),
            "labels_changed_by_order": int(np.sum(reordered != labels)), "samples_per_s": speed,
            "prepare_s": prepared[way], "prepare": notes[way], **(fusion if way == "ORT fused int8" else {})})
        results[-1]["x_default"] = speed / results[0]["samples_per_s"]
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", type=Path, default=[ROOT / run for run in RUNS])
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--test-rows", type=int, default=None, help="the first N test rows only (a quick look)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="budgetlora-int8-") as workdir:
        for run_dir in args.runs:
            results += measure_run(run_dir, args.threads, args.test_rows, Path(workdir))
    rows = results[0]["test_rows"]
    print(f"\n{args.threads} thread(s); AG test: {rows:,} rows of the official test split; dev: the 484 labelled "
          f"generated texts; samples/s over the AG test texts, after an untimed pass\n")
    print(markdown_table(
        ["run", "way", "AG test acc", "dev acc", "agreement with default", "labels changed by order", "samples/s",
         "x default"],
        [[r["run"], f"default ({r['default_precision']})" if r["way"] == "default" else r["way"],
          f"{100 * r['test_accuracy']:.2f}", f"{100 * r['dev_accuracy']:.2f}",
          f"{100 * r['agreement_with_default']:.2f}", r["labels_changed_by_order"], r["samples_per_s"],
          r["x_default"]] for r in results]))
    print("\none-time preparation (not in samples/s):\n")
    print(markdown_table(["run", "way", "seconds", "what"],
                         [[r["run"], r["way"], r["prepare_s"], r["prepare"]] for r in results]))
    for r in results:
        if "fused_ops" in r:
            print(f"{r['run']}: fused graph's operators {r['fused_ops']}; fp32 logits against the plain graph's on "
                  f"{len(CHECK_TEXTS)} texts: max difference {r['fused_vs_plain_fp32_max_logit_difference']:.1e}")
    print(json.dumps({"threads": args.threads, "results": [
        {key: round(value, 4) if isinstance(value, float) else value for key, value in r.items()} for r in results]}))


if __name__ == "__main__":
    main()
