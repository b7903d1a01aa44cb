"""Serving: a real uvicorn server on 127.0.0.1 over a tiny trained run, called with httpx."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from budgetlora.config import RunConfig, from_dict
from budgetlora.infer import predict_logits
from budgetlora.modeling import load_run_model, load_tokenizer
from budgetlora.serve import create_app
from budgetlora.train import train

from .conftest import LABELS, isolated_cache, tiny_config_dict, write_news_csv

Rows = list[tuple[str, int]]
Logits = Callable[[list[str]], np.ndarray]
MAX_TEXTS, MAX_CHARS = 8, 2000


@dataclass
class Server:
    url: str
    app: FastAPI
    run_dir: Path


@contextlib.contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread on a free port of 127.0.0.1; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with another process
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path, news_rows: Rows) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("serve-run")
    values = tiny_config_dict(tiny_roberta_dir, folder / "runs", {"train": {"max_steps": 4, "learning_rate": 5e-3}})
    values["data"]["train"] = str(write_news_csv(folder / "news.csv", news_rows))
    with isolated_cache(folder):
        run_dir = train(from_dict(RunConfig, values)).run_dir
    # A wide batch window, so that requests sent together reliably meet in one batch on a slow machine.
    app = create_app(run_dir, max_texts=MAX_TEXTS, max_chars=MAX_CHARS, batch_window_ms=100)
    with running(app) as base:
        yield Server(base, app, run_dir)


@pytest.fixture(scope="module")
def expected(server: Server) -> Logits:
    """Logits straight from predict_logits over the same merged model, one text at a time (no padding)."""
    model, config, _ = load_run_model(server.run_dir)
    tokenizer = load_tokenizer(config.model)

    def logits(texts: list[str]) -> np.ndarray:
        return predict_logits(model, tokenizer, texts, max_length=config.model.max_length, batch_size=1,
                              precision="fp32")

    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def check_answer(answer: dict, logits: np.ndarray) -> None:
    assert answer["labels"] == logits.argmax(-1).tolist()
    assert answer["label_names"] == [LABELS[i] for i in answer["labels"]]
    np.testing.assert_allclose(answer["probabilities"], softmax(logits), atol=1e-5, rtol=0)


def test_health(server: Server) -> None:
    answer = httpx.get(f"{server.url}/health")
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "ok" and body["label_names"] == LABELS
    assert (body["max_texts"], body["max_chars"]) == (MAX_TEXTS, MAX_CHARS)


def test_predict_matches_predict_logits(server: Server, news_rows: Rows, expected: Logits) -> None:
    texts = [text for text, _ in news_rows[5::25]]  # 8 real texts, 2 a class, some over max_length tokens
    answer = httpx.post(f"{server.url}/predict", json={"texts": texts}, timeout=30)
    assert answer.status_code == 200, answer.text
    check_answer(answer.json(), expected(texts))


def test_concurrent_requests_are_batched_together(server: Server, news_rows: Rows, expected: Logits) -> None:
    # 16 requests of 1 to 3 different texts each: every answer must be that of its own texts.
    requests = [[text for text, _ in news_rows[i * 12:i * 12 + 1 + i % 3]] for i in range(16)]
    before = server.app.state.batch_stats.requests

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/predict", json={"texts": texts}) for texts in requests))

    answers = asyncio.run(send_all())
    for texts, answer in zip(requests, answers, strict=True):
        assert answer.status_code == 200, answer.text
        check_answer(answer.json(), expected(texts))
    stats = server.app.state.batch_stats
    assert stats.requests - before == 16
    assert stats.largest_batch_requests > 1  # some batch ran several requests at once
    assert stats.batches < stats.requests


@pytest.mark.parametrize(("body", "message"), [
    ({"texts": []}, "List should have at least 1 item"),
    ({"texts": ["news"] * (MAX_TEXTS + 1)}, f"List should have at most {MAX_TEXTS} items"),
    ({"texts": ["ok", "x" * (MAX_CHARS + 1)]}, f"String should have at most {MAX_CHARS} characters"),
    ({"texts": ["ok", ""]}, "String should have at least 1 character"),
    ({"texts": ["ok", " \n\t"]}, r"texts\[1\] is blank"),
    ({"texts": "one text"}, "Input should be a valid list"),
    ({"text": ["a typo in the key"]}, "Field required"),
])
def test_limits_give_422_with_a_message(server: Server, body: dict, message: str) -> None:
    answer = httpx.post(f"{server.url}/predict", json=body)
    assert answer.status_code == 422
    messages = [error["msg"] for error in answer.json()["detail"]]
    assert any(re.search(message, text) for text in messages), messages


def test_oversized_bodies_give_413(server: Server) -> None:
    body = json.dumps({"texts": ["x" * MAX_CHARS] * 100}).encode()
    answer = httpx.post(f"{server.url}/predict", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert "over this server's limit" in answer.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield from (body[i:i + 65536] for i in range(0, len(body), 65536))

    answer = httpx.post(f"{server.url}/predict", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert "over this server's limit" in answer.json()["detail"]
    assert httpx.get(f"{server.url}/health").status_code == 200  # the server is fine afterwards


def test_openapi_schema_documents_predict(server: Server) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/predict", "/health"} <= set(schema["paths"])
    assert "post" in schema["paths"]["/predict"]
    request = schema["components"]["schemas"]["PredictRequest"]["properties"]["texts"]
    assert (request["minItems"], request["maxItems"]) == (1, MAX_TEXTS)
    assert request["items"]["maxLength"] == MAX_CHARS
    assert set(schema["components"]["schemas"]["PredictResponse"]["properties"]) == {
        "labels", "label_names", "probabilities"}


def test_bad_limits_and_missing_runs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_texts and max_chars must be >= 1"):
        create_app(tmp_path, max_texts=0)
    with pytest.raises(FileNotFoundError, match="is not a budgetlora run folder"):
        create_app(tmp_path / "nope")
