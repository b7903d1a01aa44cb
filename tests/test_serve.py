"""Serving: a real uvicorn server on 127.0.0.1 over a tiny trained run, called with httpx."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import signal
import socket
import subprocess
import sys
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

from budgetlora.cli import main
from budgetlora.config import RunConfig, from_dict
from budgetlora.modeling import predict_logits
from budgetlora.runfolder import load
from budgetlora.serve import ServeError, create_app, serve
from budgetlora.train import train

from .conftest import LABELS, ctrl_c_as_in_a_terminal, isolated_cache, tiny_config_dict, write_news_csv

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
    run = load(server.run_dir)

    def logits(texts: list[str]) -> np.ndarray:
        return predict_logits(run.model, run.tokenizer, texts, max_length=run.config.model.max_length, batch_size=1,
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


def test_a_body_not_sent_as_json_gives_415(server: Server) -> None:
    """Valid JSON sent as text/plain (or a form) was a 422 saying "a valid dictionary": not what to do about it."""
    body = json.dumps({"texts": ["stocks fell"]})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        answer = httpx.post(f"{server.url}/predict", content=body, headers=headers)
        assert answer.status_code == 415, (content_type, answer.text)
        assert "send the body as JSON with Content-Type: application/json" in answer.json()["detail"]
    answer = httpx.post(f"{server.url}/predict", content=body,
                        headers={"content-type": "application/json; charset=utf-8"})
    assert answer.status_code == 200
    # A +json type FastAPI parses as JSON: an invalid body there is a 422 saying what is wrong, not a 415.
    answer = httpx.post(f"{server.url}/predict", content=json.dumps({"texts": []}),
                        headers={"content-type": "application/vnd.api+json"})
    assert answer.status_code == 422


def test_openapi_schema_documents_predict(server: Server) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/predict", "/health"} <= set(schema["paths"])
    assert "post" in schema["paths"]["/predict"]
    request = schema["components"]["schemas"]["PredictRequest"]["properties"]["texts"]
    assert (request["minItems"], request["maxItems"]) == (1, MAX_TEXTS)
    assert request["items"]["maxLength"] == MAX_CHARS
    assert set(schema["components"]["schemas"]["PredictResponse"]["properties"]) == {
        "labels", "label_names", "probabilities"}


def test_openapi_schema_documents_the_error_answers(server: Server) -> None:
    responses = httpx.get(f"{server.url}/openapi.json").json()["paths"]["/predict"]["post"]["responses"]
    assert {"200", "413", "415", "422", "503"} <= set(responses)
    assert "max_texts x max_chars" in responses["413"]["description"]
    assert responses["413"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorMessage"}
    assert responses["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/InvalidRequest"}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_their_scripts_and_styles_from_the_server_itself(server: Server, page: str) -> None:
    answer = httpx.get(f"{server.url}{page}")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", answer.text), "a CDN (or any other host) is named: blank offline"
    assets = re.findall(r'(?:src|href)="([^"]+)"', answer.text)
    assert any(url.endswith(".js") for url in assets), assets
    for url in assets:
        assert url.startswith("/"), url
        asset = httpx.get(f"{server.url}{url}")
        assert asset.status_code == 200 and len(asset.content) > 1000, (url, asset.status_code)


def test_a_large_request_does_not_hold_up_a_small_one(server: Server, news_rows: Rows, expected: Logits) -> None:
    # 2,000 texts in micro-batches of 16: the large request needs 125 of them, a 1-text one sent meanwhile rides in
    # the next one. Completion order, not wall-clock time, is what is asserted.
    app = create_app(server.run_dir, max_texts=2000, max_chars=MAX_CHARS, batch_window_ms=1, batch_texts=16)
    large, small = [text for text, _ in news_rows] * 10, [news_rows[7][0]]
    finished: list[str] = []

    async def send(client: httpx.AsyncClient, name: str, texts: list[str]) -> httpx.Response:
        answer = await client.post("/predict", json={"texts": texts})
        finished.append(name)
        return answer

    async def large_then_small(base: str) -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            large_answer = asyncio.create_task(send(client, "large", large))
            while app.state.batch_stats.batches < 2:  # the large request is being served
                assert not large_answer.done(), large_answer.result().text
                await asyncio.sleep(0.005)
            small_answer = await send(client, "small", small)
            return await large_answer, small_answer

    with running(app) as base:
        large_answer, small_answer = asyncio.run(large_then_small(base))
    assert finished == ["small", "large"]
    assert app.state.batch_stats.largest_batch_requests == 2  # the small one shared a micro-batch with the large
    assert small_answer.status_code == 200 and large_answer.status_code == 200, large_answer.text
    check_answer(small_answer.json(), expected(small))
    answer = large_answer.json()
    picked = list(range(0, len(large), 97))  # texts from many micro-batches: the parts are put back in order
    check_answer({key: [answer[key][i] for i in picked] for key in answer}, expected([large[i] for i in picked]))


@pytest.mark.parametrize(("options", "message"), [
    ({"port": 70000}, "--port: must be 0-65535, got 70000"),
    ({"port": -1}, "--port: must be 0-65535, got -1"),
    ({"host": " "}, "--host: must not be empty"),
    ({"max_texts": 0}, "--max-texts: must be at least 1, got 0"),
    ({"max_chars": -5}, "--max-chars: must be at least 1, got -5"),
    ({"batch_window_ms": -1.0}, "--batch-window-ms: must be 0-60000, got -1.0"),
    ({"batch_window_ms": float("nan")}, "--batch-window-ms: must be 0-60000, got nan"),
    ({"port": 70000, "max_texts": 0}, "--port: .*; --max-texts: "),
])
def test_out_of_range_options_are_refused_before_the_run_is_loaded(tmp_path: Path, options: dict,
                                                                   message: str) -> None:
    with pytest.raises(ServeError, match=message):  # not the missing run's error: the options come first
        serve(tmp_path / "no-run", **options)


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServeError, match=f"--port: 127.0.0.1:{port} is already in use"):
            serve(tmp_path / "no-run", port=port)


def test_the_cli_prints_one_line_for_a_bad_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--run", str(tmp_path / "no-run"), "--port", "70000"]) == 2
    error = capsys.readouterr().err
    assert error == "budgetlora: error: --port: must be 0-65535, got 70000\n"


def test_the_cli_serves_a_run_until_ctrl_c(server: Server, tmp_path: Path) -> None:
    # --port 0: the system picks a free port and serve logs it (a port found free here could be taken by another
    # test worker before serve binds it).
    command = [sys.executable, "-m", "budgetlora.cli", "serve", "--run", str(server.run_dir), "--port", "0"]
    stdout = (tmp_path / "stdout").open("w")
    process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True,
                               preexec_fn=ctrl_c_as_in_a_terminal)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True)
    reader.start()
    try:
        output, port, deadline = "", None, time.monotonic() + 90
        while port is None:
            assert process.poll() is None and time.monotonic() < deadline, f"serve did not start: {output}"
            with contextlib.suppress(queue.Empty):
                output += lines.get(timeout=1)
            if found := re.search(r"on http://127\.0\.0\.1:(\d+) \(API docs: http://127\.0\.0\.1:\1/docs\)", output):
                port = int(found[1])
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, f"serve did not start: {output}"
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        reader.join(timeout=30)
        while not lines.empty():
            output += lines.get()
        # uvicorn shuts down cleanly, then re-raises the SIGINT: the CLI's exit status for Ctrl-C, 130.
        assert process.returncode == 130, output
        assert port != 0 and "Application shutdown complete" in output, output
        assert '"GET /health HTTP/1.1" 200' in output  # uvicorn's access log: a log, on stderr
        stdout.close()
        assert (tmp_path / "stdout").read_text() == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_bad_limits_and_missing_runs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="--max-texts: must be at least 1, got 0"):
        create_app(tmp_path, max_texts=0)
    with pytest.raises(ServeError, match="batch_texts: must be at least 1, got 0"):
        create_app(tmp_path, batch_texts=0)
    with pytest.raises(FileNotFoundError, match="is not a budgetlora run folder"):
        create_app(tmp_path / "nope")


def test_a_request_whose_client_went_away_is_dropped(server: Server, news_rows: Rows) -> None:
    """A client that times out is gone: its texts were predicted to the end, and retries piled up unread work."""
    app = create_app(server.run_dir, max_texts=20_000, max_chars=MAX_CHARS, batch_window_ms=1, batch_texts=16)
    texts = [text for text, _ in news_rows] * 100  # 1,250 micro-batches
    stats = app.state.batch_stats
    with running(app) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/predict", json={"texts": texts}, timeout=httpx.Timeout(60, read=1.0))
        time.sleep(0.5)  # the handler's next check finds the client gone
        dropped_at = stats.batches
        time.sleep(1.0)
        assert stats.batches <= dropped_at + 1 and stats.batches < 1_250 and stats.requests == 0
        assert httpx.post(f"{base}/predict", json={"texts": texts[:1]}, timeout=60).status_code == 200
