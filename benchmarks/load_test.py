"""Load test of `budgetlora serve`: a real uvicorn server on 127.0.0.1, many concurrent clients, real AG News texts.

    python benchmarks/load_test.py                        # a tiny random RoBERTa run, trained first (seconds)
    python benchmarks/load_test.py --run runs/my-run      # a trained run folder
    python benchmarks/load_test.py --requests 500 --clients 8 --texts 1 4

Each of --clients clients (httpx.AsyncClient, one connection each) sends requests back to back until --requests
have been sent in all; each request holds 1 to 8 (--texts) texts drawn from ../shared/data/ag_news/test.csv (the
original headerless AG News test split: title + description, as budgetlora reads it). It stops by itself, and prints
a markdown table: errors (any status but 200, any transport error, any answer without one label per text), latency
percentiles, throughput in requests and texts a second, and the server's micro-batching counters
(app.state.batch_stats). The exit status is 1 when any request failed.

Without --run, a tiny random-weight RoBERTa (2 layers, hidden size 32, roberta-base's real tokenizer from
../shared/data/roberta-base-tokenizer) is trained for a few steps on AG News rows into a temporary folder, as the
tests do: the numbers then measure the serving stack (HTTP, validation, queue, batching, tokenizer) far more than
the model. Without that tokenizer folder the benchmark is skipped with a message (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from shared_data import AG_NEWS_TEST, AG_NEWS_TRAIN, TOKENIZER
from table import markdown_table


def skip(message: str) -> None:
    print(f"load test skipped: {message}")
    sys.exit(0)


def read_ag_news_texts(path: Path) -> list[str]:
    """Texts of the original AG News CSV (no header: class, title, description), joined as budgetlora joins them."""
    with path.open(newline="", encoding="utf-8") as handle:
        return [f"{title} {description}".strip() for _, title, description in csv.reader(handle)]


def train_tiny_run(folder: Path) -> Path:
    """A tiny random RoBERTa with roberta-base's tokenizer, trained for 8 steps on 400 AG News rows."""
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    from budgetlora.config import AG_NEWS_LABELS, RunConfig, from_dict
    from budgetlora.train import train

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    labels = list(AG_NEWS_LABELS)
    config = RobertaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=520, type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, initializer_range=0.2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    torch.manual_seed(0)
    model_dir = folder / "tiny-roberta"
    RobertaForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    source = AG_NEWS_TRAIN if AG_NEWS_TRAIN.is_file() else AG_NEWS_TEST
    with source.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if rows and rows[0] == ["text", "label"]:  # the train subset has a header; the original test.csv has none
        rows = [[row[0], int(row[1])] for row in rows[1:401]]
    else:
        rows = [[f"{title} {description}", int(cls) - 1] for cls, title, description in rows[:400]]
    data = folder / "train.csv"
    with data.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["text", "label"], *rows])
    values = {
        "name": "load-test", "runs_dir": str(folder / "runs"), "budget": 1_000_000,
        "model": {"name": str(model_dir), "max_length": 128},
        "data": {"train": str(data), "validation_fraction": 0.1},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]},
        "train": {"max_steps": 8, "batch_size": 16, "eval_batch_size": 64, "precision": "fp32", "logging_steps": 4},
    }
    return train(from_dict(RunConfig, values)).run_dir


class Server:
    """uvicorn in a thread, on a free port of 127.0.0.1 held from bind to shutdown."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


async def load(url: str, requests: list[list[str]], clients: int) -> tuple[list[float], list[str], float]:
    """Send `requests` from `clients` concurrent clients; latencies (s) of the good ones, errors, and wall time."""
    queue = list(reversed(requests))
    latencies: list[float] = []
    errors: list[str] = []

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=1)) as session:
            while queue:
                texts = queue.pop()
                start = time.perf_counter()
                try:
                    answer = await session.post("/predict", json={"texts": texts})
                except httpx.HTTPError as error:
                    errors.append(f"{type(error).__name__}: {error}")
                    continue
                elapsed = time.perf_counter() - start
                if answer.status_code != 200:
                    errors.append(f"{answer.status_code}: {answer.text[:200]}")
                elif len(answer.json()["labels"]) != len(texts):
                    errors.append(f"{len(answer.json()['labels'])} labels for {len(texts)} texts")
                else:
                    latencies.append(elapsed)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, errors, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained run folder (default: train a tiny random RoBERTa run first)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--texts", type=int, nargs=2, default=[1, 8], metavar=("MIN", "MAX"),
                        help="texts a request, drawn uniformly")
    parser.add_argument("--max-texts", type=int, default=64, help="the server's limit (serve --max-texts)")
    parser.add_argument("--max-chars", type=int, default=2000, help="the server's limit (serve --max-chars)")
    parser.add_argument("--batch-window-ms", type=float, default=5.0, help="serve --batch-window-ms")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not AG_NEWS_TEST.is_file():
        skip(f"needs the AG News test split at {AG_NEWS_TEST}")
    if not args.run and not (TOKENIZER / "tokenizer.json").is_file():
        skip(f"no --run given, and roberta-base's tokenizer to build a tiny run with is absent ({TOKENIZER})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from budgetlora.serve import create_app

    corpus = [text[: args.max_chars] for text in read_ag_news_texts(AG_NEWS_TEST)]
    draw = random.Random(args.seed)
    low, high = args.texts
    requests = [draw.sample(corpus, draw.randint(low, min(high, args.max_texts))) for _ in range(args.requests)]

    with tempfile.TemporaryDirectory(prefix="budgetlora-load-") as scratch:
        os.environ.setdefault("BUDGETLORA_CACHE", str(Path(scratch) / "cache"))
        if args.run:
            run_dir, model = Path(args.run), args.run
        else:
            started = time.perf_counter()
            torch.set_num_threads(1)  # a 32-wide model gains nothing from intra-op threads (see tests/conftest.py)
            run_dir = train_tiny_run(Path(scratch))
            model = f"tiny random RoBERTa (2 layers, hidden 32), trained in {time.perf_counter() - started:.0f} s"
        app = create_app(run_dir, max_texts=args.max_texts, max_chars=args.max_chars,
                         batch_window_ms=args.batch_window_ms)
        with Server(app) as server:
            httpx.post(f"{server.url}/predict", json={"texts": corpus[:2]}, timeout=60)  # warm-up, not counted
            before = {key: getattr(app.state.batch_stats, key) for key in ("batches", "requests", "texts")}
            latencies, errors, wall = asyncio.run(load(server.url, requests, args.clients))
            health = httpx.get(f"{server.url}/health", timeout=10).status_code
        stats = app.state.batch_stats

    sent_texts = sum(len(texts) for texts in requests)
    batches = stats.batches - before["batches"]
    served = stats.requests - before["requests"]
    ms = np.percentile(np.array(latencies) * 1000, [50, 95, 99]) if latencies else [float("nan")] * 3
    print(f"model: {model}; run: {run_dir}")
    print(f"{args.requests} requests ({sent_texts} texts, {low}-{high} a request) from {args.clients} concurrent "
          f"clients; batch window {args.batch_window_ms:g} ms; torch threads {torch.get_num_threads()}\n")
    print(markdown_table(["measure", "value"], [
        ["requests sent", args.requests],
        ["errors (non-200, transport, wrong answer length)", len(errors)],
        ["zero-error check", "PASS" if not errors and len(latencies) == args.requests else "FAIL"],
        ["GET /health afterwards", health],
        ["latency p50 (ms)", round(float(ms[0]), 1)],
        ["latency p95 (ms)", round(float(ms[1]), 1)],
        ["latency p99 (ms)", round(float(ms[2]), 1)],
        ["wall time (s)", round(wall, 2)],
        ["throughput (requests/s)", round(len(latencies) / wall, 1)],
        ["throughput (texts/s)", round(sent_texts / wall, 1) if not errors else "n/a (errors)"],
        ["batches run", batches],
        ["requests a batch (mean)", round(served / batches, 2) if batches else 0],
        ["texts a batch (mean)", round((stats.texts - before["texts"]) / batches, 1) if batches else 0],
        ["largest batch (requests)", stats.largest_batch_requests],
    ]))
    for error in errors[:5]:
        print(f"error: {error}")
    return 1 if errors or health != 200 else 0


if __name__ == "__main__":
    sys.exit(main())
