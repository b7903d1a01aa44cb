"""Streaming prediction at corpus scale: peak memory and throughput of `budgetlora predict` as the input grows.

    python benchmarks/stream.py          # 10k, 100k, 1M texts; 100k from 1 and 2 processes (9 minutes, 2 CPU cores)
    python benchmarks/stream.py --sizes 10000 --shared-rows 10000   # a quick look

A tiny model (roberta-base's real tokenizer, a random 2-layer body of width 32, a LoRA run trained for 2 steps on the
vendored quickstart rows): the cost is reading, tokenizing and writing, which is what grows with a corpus. The texts
are real AG News texts (../shared/data/ag_news/train_subset.csv, the first 12 words of each, recycled), written as a
JSONL file without IDs. Each `budgetlora predict` runs in a process of its own with one thread (OMP_NUM_THREADS=1):
wall time and texts/s include its start-up (imports, model load), which a 100-text run measures first (for 1 and for
2 processes) and the "after start-up" column leaves out; peak RSS is given for the whole process tree (the
sum over its processes, sampled every 20 ms with psutil) and for its largest process (its own high-water mark, VmHWM).
The same CSV is then predicted by one process and by two (`torchrun --nproc_per_node=2`, gloo), and the two files
compared byte for byte.
Prints a markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from shared_data import AG_NEWS_TRAIN, ROOT, TOKENIZER
from table import markdown_table
from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

from budgetlora.config import RunConfig, from_dict
from budgetlora.train import train

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def tiny_run(folder: Path) -> Path:
    """A trained LoRA run of a tiny random RoBERTa with roberta-base's tokenizer."""
    model_dir = folder / "tiny-roberta"
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    torch.manual_seed(0)
    RobertaForSequenceClassification(RobertaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=520, type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=4,
    )).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = from_dict(RunConfig, {
        "name": "stream-bench", "runs_dir": str(folder / "runs"),
        "model": {"name": str(model_dir), "max_length": 64},
        "data": {"train": str(ROOT / "data" / "quickstart" / "train.csv")},
        "lora": {"r": 8, "target_modules": ["query", "value"]},
        "train": {"max_steps": 2, "batch_size": 16, "eval_batch_size": 256, "precision": "fp32"},
    })
    return train(config).run_dir


def short_texts() -> list[str]:
    with AG_NEWS_TRAIN.open(newline="", encoding="utf-8") as handle:
        return [" ".join(row["text"].split()[:12]) for row in csv.DictReader(handle)]


def write_jsonl(path: Path, texts: list[str], rows: int) -> Path:
    with path.open("w", encoding="utf-8") as out:
        for text in itertools.islice(itertools.cycle(texts), rows):
            out.write(json.dumps({"text": text}) + "\n")
    return path


def write_csv(path: Path, texts: list[str], rows: int) -> Path:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["text"])
        writer.writerows([text] for text in itertools.islice(itertools.cycle(texts), rows))
    return path


def high_water_kib(process: psutil.Process) -> int:
    """The process's peak resident size so far (the kernel's VmHWM). Not ru_maxrss: a child's starts from the size of
    the process it was forked from, this benchmark's."""
    with open(f"/proc/{process.pid}/status") as status:
        return next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0)  # 0: ended


def measure(command: list[str], rows: int, log: Path) -> dict[str, float]:
    """Wall time, texts/s and peak RSS of one command: the sum over its process tree, and its largest process's own
    peak, both read every 20 ms."""
    start = time.perf_counter()
    tree_peak, largest_kib = 0, 0
    with log.open("w") as stderr:
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
        root = psutil.Process(process.pid)
        while process.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                tree = [root, *root.children(recursive=True)]  # a process that ends meanwhile: the next sample
                tree_peak = max(tree_peak, sum(p.memory_info().rss for p in tree))
                largest_kib = max(largest_kib, *(high_water_kib(p) for p in tree))
            time.sleep(0.02)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()[-4000:]}")
    return {"rows": rows, "wall_s": round(wall, 1), "texts_per_s": round(rows / wall),
            "peak_rss_tree_mib": round(tree_peak / 2**20), "peak_rss_largest_mib": round(largest_kib / 1024)}


def predict_command(run_dir: Path, source: Path, output: Path, processes: int = 1) -> list[str]:
    launcher = [TORCHRUN, "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    # --run-dir: torchrun would read --run as its own --run-path.
    return [*launcher, "-m", "budgetlora.cli", "predict", "--run-dir", str(run_dir), "--input", str(source),
            "--output", str(output)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--shared-rows", type=int, default=100_000, help="rows of the CSV predicted by 1 and 2 "
                        "processes (0: skip)")
    args = parser.parse_args()
    texts = short_texts()
    results = []
    with tempfile.TemporaryDirectory(prefix="budgetlora-stream-") as tmp:
        folder = Path(tmp)
        run_dir = tiny_run(folder)

        startup: dict[int, float] = {}  # processes -> wall time of 100 texts: imports, model load, rendezvous

        def run(source: Path, rows: int, label: str, processes: int = 1, output: str = "out.csv") -> None:
            figures = measure(predict_command(run_dir, source, folder / output, processes), rows, folder / "log.txt")
            if processes not in startup:
                startup[processes], label = figures["wall_s"], f"{label} (start-up)"
            beyond = figures["wall_s"] - startup[processes]
            results.append({"input": label, "processes": processes, **figures,
                            "texts_per_s_after_startup": round(rows / beyond) if beyond > 0 else None})
            print(results[-1], flush=True)

        for rows in [100, *sorted(args.sizes)]:
            source = write_jsonl(folder / f"texts-{rows}.jsonl", texts, rows)
            run(source, rows, f"{rows:,} texts, JSONL")
            source.unlink()
        if args.shared_rows and TORCHRUN is not None:
            source = write_csv(folder / "texts.csv", texts, args.shared_rows)
            run(write_csv(folder / "start.csv", texts, 100), 100, "100 texts, CSV", 2)
            for processes in (1, 2):
                run(source, args.shared_rows, f"{args.shared_rows:,} texts, CSV", processes, f"out-{processes}.csv")
            identical = (folder / "out-1.csv").read_bytes() == (folder / "out-2.csv").read_bytes()
            print(f"1 and 2 processes wrote {'the same bytes' if identical else 'DIFFERENT FILES'}")
            results[-1]["identical_to_1_process"] = identical
    print()
    print(f"CPU: {os.cpu_count()} cores, one thread per process; tiny model (width 32, 2 layers), roberta-base "
          f"tokenizer, max_length 64, eval_batch_size 256")
    print(markdown_table(
        ["input", "processes", "wall", "texts/s", "texts/s after start-up", "peak RSS, process tree",
         "peak RSS, largest process"],
        [[r["input"], r["processes"], f"{r['wall_s']} s", f"{r['texts_per_s']:,}",
          f"{r['texts_per_s_after_startup']:,}" if r["texts_per_s_after_startup"] else "",
          f"{r['peak_rss_tree_mib']} MiB", f"{r['peak_rss_largest_mib']} MiB"] for r in results]))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
