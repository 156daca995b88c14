"""The seam between the HTTP front door and whatever generates tokens.

``GenerationBackend`` is what the server needs: an async token stream per request, abort,
health and a JSON picture of the cluster. The multi-process scheduler implements it across
processes; ``LoopBackend`` implements it here over an in-process serving loop
(``ares_jax.cluster.ServingLoop``, e.g. ``LLM(...).loop``).

LoopBackend flow: the loop is not thread-safe, so one background thread owns it. Callers post
commands (add, abort, close) to an inbox under a condition variable; the thread drains the inbox,
calls ``loop.step()`` while there is work and sleeps on the condition otherwise. Each accepted
request has an asyncio queue on the caller's event loop; the thread hands chunks to it with
``call_soon_threadsafe``. A submission's ValueError/Overloaded travels back through a future
before the first chunk, so the HTTP layer can still answer 400/429.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ares_jax.engine.outputs import StreamChunk
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import Request
from ares_jax.model.tokenizer import Tokenizer
from ares_jax.serving.runner import Overloaded  # one "full, retry later" for every door

log = logging.getLogger(__name__)

# How often the loop thread refreshes its published cluster state while it is busy.
STATE_PERIOD_S = 0.25


class BackendClosed(RuntimeError):
    """The backend has shut down (or its loop failed); nothing more will be served."""


@runtime_checkable
class GenerationBackend(Protocol):
    """What the HTTP server needs from the serving side."""

    model_name: str
    max_model_len: int
    tokenizer: Tokenizer | None
    vocab_size: int

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 prompt_text: str | None = None, *, deadline: float | None = None
                 ) -> AsyncIterator[StreamChunk]:
        """An async generator of one StreamChunk per token, the last with ``finished=True`` and
        ``output``. Raises ValueError (naming the problem) or Overloaded before the first chunk.
        Closing it early (client gone) aborts the request everywhere. Past ``deadline``
        (``time.perf_counter()`` seconds) the request is freed everywhere and its last chunk
        has ``finish_reason = "deadline"``."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def health(self) -> tuple[bool, dict]: ...

    def cluster_state(self) -> dict: ...


def model_name_for(source: str) -> str:
    """A served model id from a checkpoint path: the embedded GGUF is "SmolLM2-135M-Instruct";
    otherwise the file stem or directory name."""
    path = Path(source)
    if path.name == "config.json":
        path = path.parent
    name = path.stem if path.suffix == ".gguf" else path.name
    if path.suffix == ".gguf" and name.startswith("SmolLM2-135M-Instruct"):
        return "SmolLM2-135M-Instruct"
    return name or "model"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Stream:
    """Where the loop thread delivers one request's chunks."""

    aloop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: StreamChunk | BaseException) -> None:
        # RuntimeError: the consumer's event loop has closed, so nobody is listening.
        with contextlib.suppress(RuntimeError):
            self.aloop.call_soon_threadsafe(self.queue.put_nowait, item)


class LoopBackend:
    """GenerationBackend over an in-process serving loop, driven by one owner thread.

    After construction the loop belongs to this backend: do not call ``LLM.generate`` (or the
    loop) from elsewhere until ``close()``.
    """

    def __init__(self, loop: Any, *, model_name: str, tokenizer: Tokenizer | None = None,
                 max_waiting: int = 256, retry_after_s: float = 1.0) -> None:
        self.loop = loop
        self.model_name = model_name
        self.tokenizer = tokenizer if tokenizer is not None else loop.tokenizer
        self.max_model_len = int(loop.max_model_len)
        self.vocab_size = int(loop.prefill_engine.cfg.vocab_size)
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self._cond = threading.Condition()
        self._inbox: collections.deque[tuple] = collections.deque()
        self._closing = False
        self._error: BaseException | None = None
        self._streams: dict[str, _Stream] = {}  # owned by the loop thread
        self._counters = collections.Counter()  # owned by the loop thread
        self._state: dict = {}
        self._state_at = 0.0
        self._index = itertools.count()
        self._thread = threading.Thread(target=self._run, name="ares-loop-owner", daemon=True)
        self._thread.start()

    @classmethod
    def from_llm(cls, llm: Any, *, model_name: str | None = None, **kwargs: Any) -> LoopBackend:
        """Serve ``llm.loop`` (an ``ares_jax.LLM``) under its model's name."""
        name = model_name or model_name_for(llm.model.source)
        return cls(llm.loop, model_name=name, tokenizer=llm.tokenizer, **kwargs)

    # ------------------------------------------------------------------ the seam

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       prompt_text: str | None = None, *, deadline: float | None = None
                       ) -> AsyncIterator[StreamChunk]:
        aloop = asyncio.get_running_loop()
        stream = _Stream(aloop=aloop, queue=asyncio.Queue())
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        request = Request(request_id=request_id, prompt_ids=[int(t) for t in prompt_ids],
                          params=params, arrival_time=time.perf_counter(),
                          index=next(self._index), deadline=deadline)
        self._post(("add", request, prompt_text, stream, accepted))
        try:
            await asyncio.wrap_future(accepted)  # ValueError / Overloaded / BackendClosed
        except asyncio.CancelledError:
            # Cancelled while the thread may already have queued it: the inbox is FIFO, so
            # this abort lands after the add.
            self._post(("abort", request_id))
            raise
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # the consumer left early (disconnect, cancel) or the loop failed
                self._post(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def health(self) -> tuple[bool, dict]:
        alive = self._thread.is_alive() and self._error is None and not self._closing
        state = self._state
        if hasattr(self.loop, "health") and state.get("_health") is not None:
            ok, detail = state["_health"]
            return ok and alive, dict(detail, loop_thread_alive=alive)
        replicas = state.get("replicas", [])
        detail = {"loop_thread_alive": alive, "replicas": len(replicas),
                  "healthy_replicas": sum(bool(r.get("healthy")) for r in replicas)}
        if self._error is not None:
            detail["error"] = repr(self._error)
        ok = alive and bool(replicas) and all(r.get("healthy") for r in replicas)
        return ok, detail

    def cluster_state(self) -> dict:
        """The state the loop thread last published (at most STATE_PERIOD_S old while busy):
        reading engine internals from this thread would race the loop."""
        return {k: v for k, v in self._state.items() if not k.startswith("_")}

    # ------------------------------------------------------------------ lifecycle

    def close(self, timeout: float = 30.0) -> None:
        """Abort everything (open streams end with BackendClosed) and join the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def __enter__(self) -> LoopBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the owner thread

    def _post(self, cmd: tuple) -> None:
        with self._cond:
            if self._closing or self._error is not None:
                if cmd[0] == "add":
                    cmd[4].set_exception(BackendClosed("the backend is shut down"))
                return
            self._inbox.append(cmd)
            self._cond.notify()

    def _run(self) -> None:
        try:
            self._publish_state()
            while True:
                with self._cond:
                    while not (self._inbox or self._closing or self.loop.has_work):
                        self._publish_state()
                        self._cond.wait(timeout=1.0)
                    cmds = list(self._inbox)
                    self._inbox.clear()
                    closing = self._closing
                for cmd in cmds:
                    self._apply(cmd)
                if closing:
                    self._shutdown(BackendClosed("the backend is shutting down"))
                    return
                if self.loop.has_work:
                    self._deliver(self.loop.step())
                if time.monotonic() - self._state_at > STATE_PERIOD_S:
                    self._publish_state()
        except BaseException as exc:  # a failed step: fail every stream rather than hang them
            log.exception("the serving loop failed")
            with self._cond:
                self._error = exc
                pending = list(self._inbox)
                self._inbox.clear()
            for cmd in pending:
                if cmd[0] == "add":
                    cmd[4].set_exception(BackendClosed(f"the serving loop failed: {exc!r}"))
            self._shutdown(BackendClosed(f"the serving loop failed: {exc!r}"))

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "abort":
            rid = cmd[1]
            if rid in self._streams:
                self.loop.abort(rid)
                self.loop.finished.pop(rid, None)
                del self._streams[rid]
                self._counters["requests_aborted"] += 1
            return
        _, request, prompt_text, stream, accepted = cmd
        if not accepted.set_running_or_notify_cancel():
            return
        if len(self.loop.waiting) >= self.max_waiting:
            accepted.set_exception(Overloaded(
                f"the server is overloaded: {len(self.loop.waiting)} requests are waiting "
                f"(max_waiting={self.max_waiting})", self.retry_after_s))
            return
        if request.request_id in self._streams:
            accepted.set_exception(
                ValueError(f"request id {request.request_id!r} is already in use"))
            return
        try:
            self.loop.add_request(request, prompt_text)
        except ValueError as exc:
            accepted.set_exception(exc)
            return
        self._streams[request.request_id] = stream
        accepted.set_result(None)

    def _deliver(self, chunks: list[StreamChunk]) -> None:
        for chunk in chunks:
            stream = self._streams.get(chunk.request_id)
            if stream is None:
                continue  # not ours (or already aborted by its consumer)
            stream.put(chunk)
            if chunk.finished:
                del self._streams[chunk.request_id]
                self.loop.finished.pop(chunk.request_id, None)
                self._counters["requests_finished"] += 1
                if chunk.output is not None:
                    self._counters["preemptions"] += chunk.output.metrics.num_preemptions

    def _shutdown(self, reason: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            try:
                self.loop.abort(rid)
                self.loop.finished.pop(rid, None)
            except Exception:  # the loop may be broken; still end the stream
                log.exception("abort of %s failed during shutdown", rid)
            stream.put(reason)
        self._streams.clear()
        self._publish_state()

    def _publish_state(self) -> None:
        """Called on the loop thread only. A failure here must not stop serving: the page and
        the gauges keep the last good state, and the failure is logged."""
        self._state_at = time.monotonic()
        try:
            state = dict(self.loop.cluster_state())  # the core's own (cluster/core.py)
            if hasattr(self.loop, "health"):
                state["_health"] = self.loop.health()
        except Exception:
            log.exception("could not read the cluster state")
            return
        self._state = state  # one reference swap: readers see the old or the new dict
