"""The `serve` stage: a trained run behind an HTTP API (FastAPI + uvicorn), with fair micro-batching.

Concurrent requests are pooled; one background worker runs micro-batches of at most `batch_texts` texts through the
merged model, in a thread, so the event loop keeps accepting requests meanwhile. Every pending request has a share
of each micro-batch, so a request of thousands of texts is split over many, and a small one sent meanwhile rides in
the next one. When the worker is idle, it waits `batch_window_ms` after the first request for others to join.
Limits are checked before anything is queued: request bodies over a byte size derived from max_texts x max_chars get
413; an empty list, too many texts, an empty, blank or too long text get 422 with pydantic's message. /docs and
/redoc load their JavaScript and CSS from this server (fastapi-offline's copies), so they work offline.

No `from __future__ import annotations` here: FastAPI must resolve the request model defined inside create_app.
"""

import asyncio
import contextlib
import copy
import errno
import logging
import math
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import runfolder
from .config import ConfigError

log = logging.getLogger(__name__)

# The most texts in one micro-batch: a larger request is split, so others wait behind at most about this many.
MAX_BATCH_TEXTS = 256
# How often a waiting request checks that its client is still connected.
DISCONNECT_POLL_S = 0.1
# A longer batch window would make every request outlast common client timeouts.
MAX_BATCH_WINDOW_MS = 60_000


class ServeError(ConfigError):
    """A serve option is out of range, or the server cannot listen on its address (a user error in the CLI)."""


def _limit_problems(max_texts: int, max_chars: int, batch_window_ms: float, batch_texts: int) -> list[str]:
    problems = [f"{flag}: must be at least 1, got {value}"
                for flag, value in (("--max-texts", max_texts), ("--max-chars", max_chars),
                                    ("batch_texts", batch_texts)) if value < 1]
    if not (math.isfinite(batch_window_ms) and 0 <= batch_window_ms <= MAX_BATCH_WINDOW_MS):
        problems.append(f"--batch-window-ms: must be 0-{MAX_BATCH_WINDOW_MS}, got {batch_window_ms}")
    return problems


def _refuse(problems: list[str]) -> None:
    if problems:
        raise ServeError("; ".join(problems))


def _address_problems(host: str, port: int) -> list[str]:
    problems = [] if host.strip() else ["--host: must not be empty (127.0.0.1, or 0.0.0.0 for every interface)"]
    return problems if 0 <= port <= 65535 else [*problems, f"--port: must be 0-65535, got {port}"]


def _listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, as uvicorn binds one, for uvicorn to serve on; a busy port fails here, early."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait for TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise ServeError(f"--port: {host}:{port} is already in use (another server?); choose another --port") \
                from None
        raise ServeError(f"--host/--port: cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


class PredictResponse(BaseModel):
    labels: list[int] = Field(description="predicted class index per text, in request order")
    label_names: list[str] = Field(description="predicted class name per text")
    probabilities: list[list[float]] = Field(description="softmax over the classes (the run's label order) per text")


class ErrorMessage(BaseModel):
    detail: str


class InvalidItem(BaseModel):
    loc: list[str] = Field(description='where in the body, e.g. ["body", "texts", "1"]')
    type: str
    msg: str


class InvalidRequest(BaseModel):
    detail: list[InvalidItem]


@dataclass
class BatchStats:
    """Counters of the batch worker, kept in app.state.batch_stats."""

    batches: int = 0
    requests: int = 0  # requests answered
    texts: int = 0
    largest_batch_requests: int = 0  # the most requests with texts in one micro-batch


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future
    sent: int = 0  # texts run so far
    logits: list[np.ndarray] = field(default_factory=list)  # theirs, one part a micro-batch

    @property
    def left(self) -> int:
        return len(self.texts) - self.sent


@dataclass
class MicroBatcher:
    """The pending requests and the one worker task that runs them through `predict`, a micro-batch at a time."""

    predict: Callable[[list[str]], np.ndarray]
    window_s: float
    batch_texts: int
    stats: BatchStats = field(default_factory=BatchStats)
    _pending: list[_Job] = field(default_factory=list)  # in turn order: those just served go to the back
    _arrived: asyncio.Event | None = None
    _task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # uvicorn finishes open requests before the lifespan ends; anything still pending is failed, not left hanging.
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._pending.clear()

    async def submit(self, texts: list[str]) -> np.ndarray:
        """Queue `texts`; their logits once the micro-batches holding them have run."""
        if not self.alive or self._arrived is None:
            raise HTTPException(503, "the batch worker is not running")
        job = _Job(texts, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._arrived.set()
        return await job.future

    def _next_batch(self) -> list[tuple[_Job, int]]:
        """(request, how many of its next texts) for the next micro-batch: a max-min fair share each, in turn order.

        Requests needing less than an equal share take all they need and leave the rest to the larger ones. When more
        requests wait than a micro-batch holds texts, the first `batch_texts` of them send one text each.
        """
        self._pending = [job for job in self._pending if not job.future.done()]  # the client went away: cancelled
        jobs = self._pending[:self.batch_texts]
        takes, room = [0] * len(jobs), self.batch_texts
        for rank, index in enumerate(sorted(range(len(jobs)), key=lambda i: jobs[i].left)):
            takes[index] = min(jobs[index].left, room // (len(jobs) - rank))  # >= 1: room never drops below jobs left
            room -= takes[index]
        return list(zip(jobs, takes, strict=True))

    async def _run(self) -> None:
        assert self._arrived is not None
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
                await asyncio.sleep(self.window_s)  # the window: requests arriving meanwhile join this micro-batch
            batch = self._next_batch()
            if not batch:
                continue
            texts = [text for job, take in batch for text in job.texts[job.sent:job.sent + take]]
            try:
                logits = await asyncio.to_thread(self.predict, texts)
            except Exception as error:  # handed to each request in it (a 500); the worker serves the next batch
                for job, _ in batch:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue  # done now: _next_batch drops them
            self.stats.batches += 1
            self.stats.texts += len(logits)
            self.stats.largest_batch_requests = max(self.stats.largest_batch_requests, len(batch))
            start = 0
            for job, take in batch:
                job.logits.append(logits[start:start + take])
                job.sent, start = job.sent + take, start + take
                if not job.left and not job.future.done():
                    job.future.set_result(np.concatenate(job.logits))
                    self.stats.requests += 1
            # Round robin: requests that arrived during this batch, or did not fit in it, go before those just served.
            served = {id(job) for job, _ in batch}
            waiting = [job for job in self._pending if id(job) not in served]
            self._pending = waiting + [job for job, _ in batch if job.left]


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, counted as it arrives (chunked uploads too)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # reading stops at the limit: an oversized body is never held in memory
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.limit:
                detail = f"request body over this server's limit of {self.limit} bytes (max_texts x max_chars)"
                return await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _request_model(max_texts: int, max_chars: int) -> type[BaseModel]:
    Text = Annotated[str, StringConstraints(min_length=1, max_length=max_chars)]

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")  # {"text": [...]} is a typo to report, not an empty request
        texts: list[Text] = Field(min_length=1, max_length=max_texts,
                                  description=f"1 to {max_texts} texts of 1 to {max_chars} characters each")

        @field_validator("texts")
        @classmethod
        def _not_blank(cls, texts: list[str]) -> list[str]:
            for index, text in enumerate(texts):
                if not text.strip():
                    raise ValueError(f"texts[{index}] is blank (only whitespace); send the text to classify")
            return texts

    return PredictRequest


def create_app(run_dir: Path, *, max_texts: int = 64, max_chars: int = 2000, batch_window_ms: float = 5,
               batch_texts: int = MAX_BATCH_TEXTS, precision: str | None = None) -> FastAPI:
    """The API of a trained run: POST /predict, GET /health, and FastAPI's /openapi.json, /docs and /redoc.
    `precision`: as runfolder.load takes it (None: the run's own train.precision)."""
    _refuse(_limit_problems(max_texts, max_chars, batch_window_ms, batch_texts))
    run_dir = Path(run_dir)
    run = runfolder.load(run_dir, precision=precision)  # a broken run fails here, not per request
    label_names = run.label_names
    batcher = MicroBatcher(run.predict, batch_window_ms / 1000, batch_texts)
    PredictRequest = _request_model(max_texts, max_chars)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPIOffline(title=f"budgetlora: {run_dir.name}", lifespan=lifespan,
                         description=f"Text classification into {', '.join(label_names)} "
                                     f"(model.head: {run.config.model.head}).")
    app.state.batch_stats = batcher.stats
    # 12 bytes a character: the longest JSON escape (a surrogate pair); the rest is the list's own syntax.
    body_limit = max_texts * (12 * max_chars + 8) + 1024
    app.add_middleware(BodySizeLimit, limit=body_limit)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        json_media = media_type == "application/json" or media_type.endswith("+json")  # what FastAPI parses as JSON
        if request.method == "POST" and not json_media:  # FastAPI said "a valid dictionary"
            return JSONResponse(status_code=415, content={"detail": f"send the body as JSON with Content-Type: "
                                                                    f"application/json (got {media_type or 'none'})"})
        # FastAPI's own handler echoes the input back, and that fails (a 500) for NaN, lone surrogates and bodies that
        # are not UTF-8. The location and message say what is wrong without it.
        detail = [{"loc": [str(part) for part in item.get("loc", ())], "type": str(item.get("type", "")),
                   "msg": str(item.get("msg", "")).encode("utf-8", "replace").decode("utf-8")}
                  for item in error.errors()]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.get("/health", responses={503: {"model": ErrorMessage, "description": "the batch worker is not running"}})
    async def health() -> dict[str, Any]:
        if not batcher.alive:
            raise HTTPException(503, "the batch worker is not running")
        return {"status": "ok", "run": run_dir.name, "label_names": label_names, "precision": run.precision,
                "max_texts": max_texts, "max_chars": max_chars, "batches": batcher.stats.batches}

    @app.post("/predict", response_model=PredictResponse, responses={
        413: {"model": ErrorMessage, "description": f"request body over {body_limit} bytes (max_texts x max_chars)"},
        415: {"model": ErrorMessage, "description": "a body that is not sent as application/json"},
        422: {"model": InvalidRequest, "description": "not a list of 1 to max_texts non-blank texts of at most "
                                                      "max_chars characters; each item says where and why"},
        503: {"model": ErrorMessage, "description": "the batch worker is not running"}})
    async def predict_texts(request: PredictRequest,  # type: ignore[valid-type]
                            http: Request) -> PredictResponse | Response:
        answer = asyncio.ensure_future(batcher.submit(request.texts))
        try:
            # A client that went away (timed out, closed) gets its texts dropped from the queue: without this its
            # request ran to the end, and clients retrying after a timeout piled up work no one read.
            while not (await asyncio.wait({answer}, timeout=DISCONNECT_POLL_S))[0]:
                if await http.is_disconnected():
                    return Response(status_code=499)  # nginx's "client closed request": no one reads it
        finally:  # gone, or this handler cancelled (shutdown): its future too, which the batch worker then drops
            answer.cancel()
        logits = answer.result().astype(np.float64)
        probabilities = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        labels = logits.argmax(-1).tolist()
        return PredictResponse(labels=labels, label_names=[label_names[i] for i in labels],
                               probabilities=probabilities.tolist())

    return app


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8000, *, max_texts: int = 64, max_chars: int = 2000,
          batch_window_ms: float = 5, precision: str | None = None) -> None:
    """Serve the run with uvicorn until interrupted. Options are checked and the port taken before the model loads."""
    import uvicorn

    _refuse(_address_problems(host, port) + _limit_problems(max_texts, max_chars, batch_window_ms, MAX_BATCH_TEXTS))
    with _listen_socket(host, port) as sock:
        app = create_app(run_dir, max_texts=max_texts, max_chars=max_chars, batch_window_ms=batch_window_ms,
                         precision=precision)
        # uvicorn names the address only when it binds the socket itself.
        url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
        log.info("serving %s on %s (API docs: %s/docs); Ctrl-C stops", Path(run_dir).name, url, url)
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=stderr_logging())).run(sockets=[sock])


def stderr_logging() -> dict[str, Any]:
    """uvicorn's logging config with its access log on stderr too (uvicorn writes it to stdout): logs on stderr,
    results on stdout, in every budgetlora command."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config
