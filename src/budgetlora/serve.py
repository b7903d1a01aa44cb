"""The `serve` stage: a trained run behind an HTTP API (FastAPI + uvicorn), with micro-batching.

Concurrent requests are queued; one background worker takes what arrives within `batch_window_ms` of the first and
runs it through the merged model as one batch, in a thread, so the event loop keeps accepting requests meanwhile.
Limits are checked before anything is queued: request bodies over a byte size derived from max_texts x max_chars get
413; an empty list, too many texts, an empty, blank or too long text get 422 with pydantic's message.

No `from __future__ import annotations` here: FastAPI must resolve the request model defined inside create_app.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .infer import run_predictor
from .modeling import load_run_model

# A batch never grows past this many texts (or one request's max_texts, if larger): bounded memory and latency.
MAX_BATCH_TEXTS = 256


class PredictResponse(BaseModel):
    labels: list[int] = Field(description="predicted class index per text, in request order")
    label_names: list[str] = Field(description="predicted class name per text")
    probabilities: list[list[float]] = Field(description="softmax over the classes (labels.json order) per text")


@dataclass
class BatchStats:
    """Counters of the batch worker, kept in app.state.batch_stats."""

    batches: int = 0
    requests: int = 0
    texts: int = 0
    largest_batch_requests: int = 0


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future


@dataclass
class MicroBatcher:
    """An asyncio queue of requests and the one worker task that runs them through `predict` together."""

    predict: Callable[[list[str]], np.ndarray]
    window_s: float
    max_batch_texts: int
    stats: BatchStats = field(default_factory=BatchStats)
    _queue: asyncio.Queue[_Job] | None = None
    _task: asyncio.Task | None = None
    _held: _Job | None = None  # taken from the queue but did not fit the last batch: first in the next one

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # uvicorn finishes open requests before the lifespan ends; anything still queued is failed, not left hanging.
        waiting = [self._held] if self._held else []
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for job in waiting:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    async def submit(self, texts: list[str]) -> np.ndarray:
        """Queue `texts`; their logits once a batch holding them has run."""
        if not self.alive or self._queue is None:
            raise HTTPException(503, "the batch worker is not running")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(texts, future))
        return await future

    async def _collect(self) -> list[_Job]:
        assert self._queue is not None
        first, self._held = self._held or await self._queue.get(), None
        await asyncio.sleep(self.window_s)  # the window: requests arriving meanwhile join this batch
        jobs, size = [first], len(first.texts)
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if size + len(job.texts) > self.max_batch_texts:
                self._held = job
                break
            jobs.append(job)
            size += len(job.texts)
        return [job for job in jobs if not job.future.done()]  # a client that went away cancelled its future

    async def _run(self) -> None:
        while True:
            jobs = await self._collect()
            if not jobs:
                continue
            try:
                logits = await asyncio.to_thread(self.predict, [text for job in jobs for text in job.texts])
            except Exception as error:  # handed to each waiting request (a 500); the worker serves the next batch
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            self.stats.batches += 1
            self.stats.requests += len(jobs)
            self.stats.texts += len(logits)
            self.stats.largest_batch_requests = max(self.stats.largest_batch_requests, len(jobs))
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(logits[start:start + len(job.texts)])
                start += len(job.texts)


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


def create_app(run_dir: Path, *, max_texts: int = 64, max_chars: int = 2000, batch_window_ms: float = 5) -> FastAPI:
    """The API of a trained run: POST /predict, GET /health, and FastAPI's /openapi.json and /docs."""
    if max_texts < 1 or max_chars < 1 or batch_window_ms < 0:
        raise ValueError(f"serve limits: max_texts and max_chars must be >= 1 and batch_window_ms >= 0, got "
                         f"{max_texts}, {max_chars}, {batch_window_ms}")
    run_dir = Path(run_dir)
    model, config, label_names = load_run_model(run_dir, merge=True)  # a broken run fails here, not per request
    batcher = MicroBatcher(run_predictor(model, config), batch_window_ms / 1000, max(MAX_BATCH_TEXTS, max_texts))
    PredictRequest = _request_model(max_texts, max_chars)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"budgetlora: {run_dir.name}", lifespan=lifespan,
                  description=f"Text classification into {', '.join(label_names)} (model.head: {config.model.head}).")
    app.state.batch_stats = batcher.stats
    # 12 bytes a character: the longest JSON escape (a surrogate pair); the rest is the list's own syntax.
    app.add_middleware(BodySizeLimit, limit=max_texts * (12 * max_chars + 8) + 1024)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input back, and that fails (a 500) for NaN, lone surrogates and bodies that
        # are not UTF-8. The location and message say what is wrong without it.
        detail = [{"loc": [str(part) for part in item.get("loc", ())], "type": str(item.get("type", "")),
                   "msg": str(item.get("msg", "")).encode("utf-8", "replace").decode("utf-8")}
                  for item in error.errors()]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        if not batcher.alive:
            raise HTTPException(503, "the batch worker is not running")
        return {"status": "ok", "run": run_dir.name, "label_names": label_names, "max_texts": max_texts,
                "max_chars": max_chars, "batches": batcher.stats.batches}

    @app.post("/predict", response_model=PredictResponse)
    async def predict_texts(request: PredictRequest) -> PredictResponse:  # type: ignore[valid-type]
        logits = (await batcher.submit(request.texts)).astype(np.float64)
        probabilities = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        labels = logits.argmax(-1).tolist()
        return PredictResponse(labels=labels, label_names=[label_names[i] for i in labels],
                               probabilities=probabilities.tolist())

    return app


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8000, **limits: Any) -> None:
    """Serve the run with uvicorn until interrupted; `limits` are create_app's keyword arguments."""
    import uvicorn

    uvicorn.run(create_app(run_dir, **limits), host=host, port=port)
