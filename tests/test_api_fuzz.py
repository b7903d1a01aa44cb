"""Fuzzing the HTTP API: whatever a client sends, a real uvicorn server answers below 500 and stays healthy.

A tiny run is trained once for the module and served by uvicorn on 127.0.0.1 (as in test_serve.py), with small
limits (MAX_TEXTS texts of MAX_CHARS characters) so that hypothesis reaches both sides of every limit cheaply.
Each property runs as an inner hypothesis test (no example database) and is followed
by a health check: GET /health answers 200 and a valid request is still classified.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

pytest.importorskip("hypothesis", reason="the API fuzz tests need hypothesis (pip install -e '.[dev]')")

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from budgetlora.config import RunConfig, from_dict  # noqa: E402
from budgetlora.serve import create_app  # noqa: E402
from budgetlora.train import train  # noqa: E402

from .conftest import LABELS, isolated_cache, tiny_config_dict, write_news_csv  # noqa: E402
from .test_serve import running  # noqa: E402

MAX_TEXTS, MAX_CHARS = 4, 300
BODY_LIMIT = MAX_TEXTS * (12 * MAX_CHARS + 8) + 1024  # as create_app derives it
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
SOME = settings(FUZZ, max_examples=100)
OK_BODY = {"texts": ["Stocks rallied on Wall Street as oil prices fell."]}


# --- one trained run, served by real uvicorn servers --------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path,
            news_rows: list[tuple[str, int]]) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-run")
    values = tiny_config_dict(tiny_roberta_dir, folder / "runs", {"train": {"max_steps": 2}})
    values["data"]["train"] = str(write_news_csv(folder / "news.csv", news_rows))
    with isolated_cache(folder):
        return train(from_dict(RunConfig, values)).run_dir


@pytest.fixture(scope="module")
def url(run_dir: Path) -> Iterator[str]:
    """The fuzzed server: a 1 ms batch window, so that the many valid examples are answered quickly."""
    with running(create_app(run_dir, max_texts=MAX_TEXTS, max_chars=MAX_CHARS, batch_window_ms=1)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as session:
        yield session


def assert_no_server_error(answer: httpx.Response) -> None:
    assert answer.status_code < 500, f"{answer.request.method} {answer.request.url} -> {answer.status_code}: " \
                                     f"{answer.text[:300]!r} (request body {answer.request.content[:300]!r})"
    if answer.status_code >= 400 and answer.request.method != "HEAD":
        assert "detail" in answer.json(), answer.text[:300]  # FastAPI's error shape: {"detail": str | [errors]}


def assert_valid_answer(answer: httpx.Response, texts: list[str]) -> None:
    assert answer.status_code == 200, answer.text[:300]
    body = answer.json()
    assert set(body) == {"labels", "label_names", "probabilities"}
    assert len(body["labels"]) == len(body["label_names"]) == len(body["probabilities"]) == len(texts)
    for label, name, probabilities in zip(body["labels"], body["label_names"], body["probabilities"], strict=True):
        assert LABELS[label] == name and len(probabilities) == len(LABELS)
        assert all(math.isfinite(p) and 0 <= p <= 1 for p in probabilities)
        assert math.isclose(sum(probabilities), 1, abs_tol=1e-5)


def assert_healthy(client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    assert_valid_answer(client.post("/predict", json=OK_BODY), OK_BODY["texts"])


def post_json(client: httpx.Client, body: Any, *, ascii_only: bool = True) -> httpx.Response:
    """POST `body` serialised by json.dumps (NaN and Infinity included, as Python's json writes them)."""
    content = json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    answer = client.post("/predict", content=content, headers={"content-type": "application/json"})
    assert_no_server_error(answer)
    return answer


def is_valid_request(body: Any) -> bool:
    """What the API promises to classify: {"texts": [1..MAX_TEXTS non-blank texts of 1..MAX_CHARS characters]}."""
    if not isinstance(body, dict) or set(body) != {"texts"} or not isinstance(body["texts"], list):
        return False
    texts = body["texts"]
    return 1 <= len(texts) <= MAX_TEXTS and all(
        isinstance(t, str) and 1 <= len(t) <= MAX_CHARS and t.strip() for t in texts)


# --- strategies ---------------------------------------------------------------------------------------------------

# Any unicode scalar value (lone surrogates: see the tests below), weighted towards the awkward ones.
AWKWARD = "\x00\x01\x08\x0b\x0c\x1b\x1f\x7f\x85\xa0\u00ad\u200b\u200d\u2028\u2029\u202e\ufeff\ufffd\U0001f600" \
          "\U0010ffff \t\r\n\\\"'<>&%{}[]"
CHARS = st.characters(exclude_categories=["Cs"]) | st.sampled_from(AWKWARD)
TEXT = st.one_of(
    st.text(CHARS, max_size=40),
    st.text(CHARS, min_size=MAX_CHARS - 2, max_size=MAX_CHARS + 2),  # both sides of the length limit
    st.sampled_from(["", " ", "\t\n", "\u3000", "\u200b", "\x00", "\ufeff", "a" * 20_000]),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), TEXT)  # NaN and Infinity: see the tests below
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
                    max_leaves=15)
KEYS = st.sampled_from(["texts", "text", "Texts", "texts ", "inputs", "", "labels", "__proto__"]) | st.text(max_size=8)


# --- properties ---------------------------------------------------------------------------------------------------

def test_arbitrary_json_bodies(client: httpx.Client) -> None:
    @FUZZ
    @given(JSON)
    def check(body: Any) -> None:
        answer = post_json(client, body)
        assert (answer.status_code == 200) == is_valid_request(body), answer.text[:300]

    check()
    assert_healthy(client)


def test_arbitrary_texts(client: httpx.Client) -> None:
    """Unicode, control characters, empty, blank, huge: 200 with one answer a text, or 422 (413 when huge)."""

    @FUZZ
    @given(st.lists(TEXT, max_size=MAX_TEXTS + 2), st.booleans())
    def check(texts: list[str], ascii_only: bool) -> None:
        answer = post_json(client, {"texts": texts}, ascii_only=ascii_only)
        if is_valid_request({"texts": texts}):
            assert_valid_answer(answer, texts)
        else:
            assert answer.status_code in (413, 422), answer.text[:300]

    check()
    assert_healthy(client)


def test_wrong_types_missing_and_extra_fields(client: httpx.Client) -> None:
    valid_texts = st.lists(st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=30),
                           min_size=1, max_size=MAX_TEXTS)

    @SOME
    @given(st.one_of(
        st.dictionaries(KEYS, JSON, max_size=4),  # anything under any key, "texts" missing or not
        st.builds(lambda texts, extra: {"texts": texts, **extra}, valid_texts,
                  st.dictionaries(KEYS.filter(lambda k: k != "texts"), JSON, min_size=1, max_size=3)),
        st.builds(lambda value: {"texts": value}, JSON),  # the right key, any value
        st.builds(lambda items: {"texts": items}, st.lists(JSON, min_size=1, max_size=MAX_TEXTS)),
    ))
    def check(body: dict) -> None:
        answer = post_json(client, body)
        assert (answer.status_code == 200) == is_valid_request(body), answer.text[:300]
        if answer.status_code == 422 and "texts" in body and set(body) != {"texts"}:
            assert any(error["type"] == "extra_forbidden" for error in answer.json()["detail"]), answer.text[:300]

    check()
    assert_healthy(client)


CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "application/json; charset=latin-1",
                 "application/vnd.api+json", "text/plain", "text/json", "application/xml", "application/octet-stream",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz", "multipart/form-data",
                 "", "garbage", ";;;", "application/", "application/json; boundary=\x7f"]


def test_non_json_bodies_and_wrong_content_types(client: httpx.Client) -> None:
    bodies = st.one_of(
        st.binary(max_size=300),  # invalid UTF-8 included
        st.text(max_size=300).map(lambda text: text.encode("utf-8", "surrogatepass")),
        st.just(json.dumps(OK_BODY).encode()),
        st.builds(lambda body, cut: body[:cut], st.just(json.dumps(OK_BODY).encode()), st.integers(0, 40)),
        st.sampled_from([b"texts=a&texts=b", b"--xyz\r\nContent-Disposition: form-data; name=\"texts\"\r\n\r\na\r\n"
                         b"--xyz--\r\n", b"<texts><t>a</t></texts>", b"\xef\xbb\xbf" + json.dumps(OK_BODY).encode(),
                         json.dumps(OK_BODY).encode("utf-16"), json.dumps(OK_BODY).encode("utf-32")]),
    )

    @SOME
    @given(bodies, st.sampled_from(CONTENT_TYPES) | st.none())
    def check(body: bytes, content_type: str | None) -> None:
        assume(is_json_type(content_type) or is_utf8(body))  # the other bodies: see the test below
        headers = {} if content_type is None else {"content-type": content_type}
        assert_no_server_error(client.post("/predict", content=body, headers=headers))

    check()
    assert_healthy(client)


def is_json_type(content_type: str | None) -> bool:
    """As FastAPI decides: application/json or application/*+json, parameters aside."""
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind.startswith("application/") and (kind == "application/json" or kind.endswith("+json"))


def is_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "FOO"]
PATHS = ["/", "/predict", "/predict/", "/Predict", "/predict/x", "/health", "/health/", "/docs", "/redoc",
         "/openapi.json", "/docs/oauth2-redirect", "//predict", "/predict?texts=a", "/predict;x", "/%00", "/..",
         "/../predict", "/" + "a" * 4000]


def test_wrong_methods_and_paths(client: httpx.Client) -> None:
    paths = st.sampled_from(PATHS) | st.text(max_size=40).map(lambda text: "/" + quote(text, safe="/?=&"))

    @SOME
    @given(st.sampled_from(METHODS), paths, st.sampled_from([None, b"", json.dumps(OK_BODY).encode()]))
    def check(method: str, path: str, body: bytes | None) -> None:
        answer = client.request(method, path, content=body, headers={"content-type": "application/json"})
        assert_no_server_error(answer)
        if path.split("?")[0] in ("/predict", "/health") and method not in ("POST", "GET", "HEAD"):
            assert answer.status_code == 405, (method, path, answer.status_code)

    check()
    assert_healthy(client)


# --- fixed edge cases: parser limits and encodings ----------------------------------------------------------------

EDGE_BODIES = {
    "empty body": b"",
    "null": b"null",
    "empty object": b"{}",
    "texts null": b'{"texts": null}',
    "duplicate key": b'{"texts": ["a"], "texts": 5}',
    "5000-digit integer": b'{"texts": ' + b"1" * 5000 + b"}",
    "nesting 3000 deep": b"[" * 3000 + b"]" * 3000,
    "nesting 3000 deep in texts": b'{"texts": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    "invalid UTF-8 in a text": b'{"texts": ["caf\xe9"]}',
    "truncated": b'{"texts": ["a"',
    "trailing garbage": b'{"texts": ["a"]} x',
    "JSON with a byte order mark": b"\xef\xbb\xbf" + json.dumps(OK_BODY).encode(),
    "UTF-16 JSON": json.dumps(OK_BODY).encode("utf-16"),
    "just under the body limit": json.dumps({"texts": ["x"], "pad": " " * (BODY_LIMIT - 40)}).encode(),
}


@pytest.mark.parametrize("body", list(EDGE_BODIES.values()), ids=list(EDGE_BODIES))
def test_edge_case_bodies(client: httpx.Client, body: bytes) -> None:
    answer = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert_no_server_error(answer)
    assert answer.status_code in (200, 400, 413, 422)


def test_the_longest_texts_in_the_widest_escape_fit_the_body_limit(client: httpx.Client) -> None:
    # MAX_TEXTS texts of MAX_CHARS astral characters, each sent as a 12-byte surrogate-pair escape: the largest
    # valid request; the body limit is sized to let it through.
    texts = ["\U0001f600" * MAX_CHARS] * MAX_TEXTS
    content = json.dumps({"texts": texts}).encode()
    assert len(content) <= BODY_LIMIT
    assert_valid_answer(client.post("/predict", content=content, headers={"content-type": "application/json"}), texts)


# --- malformed HTTP and clients that go away ----------------------------------------------------------------------

def raw_exchange(url: str, request: bytes, *, read: bool = True) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        if not read:
            return b""
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


MALFORMED_HTTP = {
    "garbage request line": b"GARBAGE\r\n\r\n",
    "bad content-length": b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "negative content-length": b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "bad chunk size": b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                      b"Content-Type: application/json\r\n\r\nZZ\r\nxx\r\n0\r\n\r\n",
    "body shorter than content-length": b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                        b"Content-Length: 1000\r\n\r\n{\"texts\": [",
    "header without colon": b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "HTTP/9.9": b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", list(MALFORMED_HTTP.values()), ids=list(MALFORMED_HTTP))
def test_malformed_http_is_refused_without_a_server_error(url: str, client: httpx.Client,
                                                          request_bytes: bytes) -> None:
    response = raw_exchange(url, request_bytes)
    status = response.split(b"\r\n", 1)[0]
    assert not status.startswith((b"HTTP/1.1 5", b"HTTP/1.0 5")), status  # a 4xx, or the connection closed
    assert_healthy(client)


def test_clients_that_go_away_mid_request(url: str, client: httpx.Client) -> None:
    body = json.dumps(OK_BODY).encode()
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    for _ in range(8):  # a whole request, then gone before the answer (the batch runs for nobody)
        raw_exchange(url, head.encode() + body, read=False)
    for _ in range(8):  # half a body, then gone
        raw_exchange(url, head.encode() + body[: len(body) // 2], read=False)

    async def cancelled() -> None:  # httpx gives up after 1 ms on requests that are queued or running
        async with httpx.AsyncClient(base_url=url, timeout=0.001) as impatient:
            await asyncio.gather(*(impatient.post("/predict", json=OK_BODY) for _ in range(16)),
                                 return_exceptions=True)

    asyncio.run(cancelled())
    time.sleep(0.2)
    assert_healthy(client)


# --- inputs that once made the server answer 500 (FastAPI's default handler echoed them back) ---------------------

NON_FINITE_BODIES = {
    "texts NaN": b'{"texts": NaN}',
    "Infinity in the list": b'{"texts": ["a", Infinity]}',
    "-Infinity under an extra key": b'{"texts": ["a"], "score": -Infinity}',
    "NaN under a misnamed key": b'{"text": [NaN]}',
}


@pytest.mark.parametrize("body", list(NON_FINITE_BODIES.values()), ids=list(NON_FINITE_BODIES))
def test_non_finite_numbers_are_refused_not_a_server_error(client: httpx.Client, body: bytes) -> None:
    answer = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert answer.status_code in (400, 422), (answer.status_code, answer.text[:300])


SURROGATE_TEXTS = ["\ud800", "lone low \udc00 surrogate", "reversed pair \ude00\ud83d", "\udfff" * 3]


@pytest.mark.parametrize("text", SURROGATE_TEXTS)
def test_lone_surrogates_are_refused_not_a_server_error(client: httpx.Client, text: str) -> None:
    content = json.dumps({"texts": ["fine", text]}).encode()  # ensure_ascii: "\ud800" as a JSON escape
    answer = client.post("/predict", content=content, headers={"content-type": "application/json"})
    assert answer.status_code == 422, (answer.status_code, answer.text[:300])


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/octet-stream", "multipart/form-data"])
def test_non_utf8_bodies_without_a_json_content_type_are_refused(client: httpx.Client,
                                                                 content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    answer = client.post("/predict", content=b"\x80 caf\xe9", headers=headers)
    assert answer.status_code in (400, 415, 422), (answer.status_code, answer.text[:300])


def test_a_refused_request_does_not_disturb_the_others_in_its_batch_window(run_dir: Path) -> None:
    app = create_app(run_dir, max_texts=MAX_TEXTS, max_chars=MAX_CHARS, batch_window_ms=300)  # all in one window
    bodies = [OK_BODY, {"texts": [" "]}, OK_BODY, {"texts": ["x" * (MAX_CHARS + 1)]}, OK_BODY]

    async def send_all(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as session:
            return await asyncio.gather(*(session.post("/predict", json=body) for body in bodies))

    with running(app) as base:
        answers = asyncio.run(send_all(base))
    assert [answer.status_code for answer in answers] == [200, 422, 200, 422, 200]
    stats = app.state.batch_stats
    assert stats.requests == 3 and stats.largest_batch_requests >= 2  # refused ones never reach the batch
