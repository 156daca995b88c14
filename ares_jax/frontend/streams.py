"""One choice's backend stream, and the plumbing around client disconnects.

Flow of a request: the handler builds one ``Choice`` per prompt, ``start_all`` opens a backend
stream for each and waits for its first chunk (so a ValueError or Overloaded still becomes a
4xx before any byte is sent), then the handler either collects the streams or relays them as
SSE. Whatever happens after that (finish, client gone, error), ``ChoiceStream.close`` ends the
backend stream and calls ``backend.abort`` for a request that did not finish, so its KV pages
are freed on every process it touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

from fastapi import Request

from ares_jax.cluster.deadlines import DEADLINE
from ares_jax.engine.outputs import RequestOutput, StreamChunk
from ares_jax.engine.sampling import SamplingParams
from ares_jax.frontend.backend import GenerationBackend
from ares_jax.frontend.errors import DeadlineExceeded, from_backend_value_error
from ares_jax.frontend.metrics import ServerMetrics

T = TypeVar("T")
# Tasks that must outlive a cancelled request handler (aborts); referenced until done.
_BACKGROUND: set[asyncio.Future] = set()


def _spawn(coro: Awaitable[None]) -> asyncio.Future:
    task = asyncio.ensure_future(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


@dataclasses.dataclass(frozen=True, kw_only=True)
class Choice:
    """One prompt of a request: it becomes one backend request and one choice."""

    index: int
    request_id: str
    prompt_ids: list[int]
    prompt_text: str | None
    params: SamplingParams
    deadline: float | None = None  # time.perf_counter() seconds; None: no deadline


class ChoiceStream:
    """A started backend stream (its first chunk already received)."""

    def __init__(self, backend: GenerationBackend, metrics: ServerMetrics, choice: Choice,
                 agen: AsyncIterator[StreamChunk], first: StreamChunk) -> None:
        self.backend, self.metrics, self.choice = backend, metrics, choice
        self._agen, self._first = agen, first
        self.tokens: list[StreamChunk] = []
        self.output: RequestOutput | None = None
        self.finished = False
        self.text_offset = 0  # completions' streamed logprobs.text_offset
        self._sent = ""  # text streamed so far
        self._held = ""  # text held back: it may begin a stop string
        self._closed = False

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        """Every chunk, the first included; records the final output."""
        chunk: StreamChunk | None = self._first
        while chunk is not None:
            if chunk.finish_reason == DEADLINE:  # freed everywhere by the backend already
                self.finished, self.output = True, chunk.output
                if chunk.output is not None:
                    self.metrics.observe_finished(chunk.output)
                raise DeadlineExceeded(_deadline_message(chunk))
            self.tokens.append(chunk)
            if chunk.finished:
                self.finished, self.output = True, chunk.output
                if chunk.output is not None:
                    self.metrics.observe_finished(chunk.output)
            yield chunk
            if chunk.finished:
                return
            chunk = await anext(self._agen, None)

    def stream_text(self, chunk: StreamChunk) -> str:
        """The text to send for ``chunk``; call once per chunk, in order.

        Text that could be the start of a stop string is held back until the next token
        shows whether it is one (vLLM does the same), so a stream never shows text that the
        full answer does not have. On the last chunk the rest of the final text is sent:
        ``output.text`` is authoritative (it is already cut at the stop string)."""
        out = chunk.output
        if chunk.finished and out is not None and out.text.startswith(self._sent):
            text = out.text[len(self._sent):]
        else:
            text = self._held + chunk.text_delta
            keep = 0 if chunk.finished else _stop_prefix_len(text, self.choice.params.stop)
            text, self._held = text[: len(text) - keep], text[len(text) - keep:]
        self._sent += text
        return text

    async def collect(self) -> ChoiceStream:
        async for _ in self.chunks():
            pass
        return self

    async def close(self) -> None:
        """End the backend stream; a request that did not finish is aborted.

        This runs in ``finally`` blocks of cancelled tasks (client gone), where any await may
        raise CancelledError again; the abort is therefore its own task, started first and
        shielded, so that it completes whatever happens to this one."""
        if self._closed:
            return
        self._closed = True
        abort = None
        if not self.finished:
            self.metrics.observe_aborted(len(self.tokens))
            abort = _spawn(self.backend.abort(self.choice.request_id))
        with contextlib.suppress(Exception):
            await self._agen.aclose()  # the seam: leaving the stream aborts the request too
        if abort is not None:
            await asyncio.shield(abort)


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper start of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


async def start_one(backend: GenerationBackend, metrics: ServerMetrics, choice: Choice,
                    prompt_field: str) -> ChoiceStream:
    # The deadline is passed only when set, so backends without deadlines keep working.
    extra = {} if choice.deadline is None else {"deadline": choice.deadline}
    agen = backend.generate(choice.request_id, choice.prompt_ids, choice.params,
                            choice.prompt_text, **extra)
    try:
        first = await anext(agen)
    except ValueError as exc:
        raise from_backend_value_error(exc, prompt_field) from exc
    except BaseException:
        with contextlib.suppress(Exception):
            await agen.aclose()
        raise
    metrics.observe_accepted(len(choice.prompt_ids))
    if first.finish_reason == DEADLINE:  # before the first token: still time for a 504
        if first.output is not None:
            metrics.observe_finished(first.output)
        raise DeadlineExceeded(_deadline_message(first))
    return ChoiceStream(backend, metrics, choice, agen, first)


def _deadline_message(chunk: StreamChunk) -> str:
    why = chunk.output.error if chunk.output is not None and chunk.output.error else \
        "deadline exceeded"
    return f"{why}; the request's timeout passed and it was cancelled"


async def start_all(backend: GenerationBackend, metrics: ServerMetrics,
                    choices: Sequence[Choice], prompt_field: str) -> list[ChoiceStream]:
    """Start every choice concurrently; if one is refused, close the others and re-raise."""
    if len(choices) == 1:
        return [await start_one(backend, metrics, choices[0], prompt_field)]
    tasks = [asyncio.ensure_future(start_one(backend, metrics, c, prompt_field))
             for c in choices]
    try:
        results = await asyncio.gather(*tasks, return_exceptions=True)
    except BaseException:  # cancelled (client gone): nothing may keep running
        for t in tasks:
            t.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        for s in done:
            if isinstance(s, ChoiceStream):
                await s.close()
        raise
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for r in results:
            if isinstance(r, ChoiceStream):
                await r.close()
        raise errors[0]
    return results  # type: ignore[return-value]


async def close_all(streams: Sequence[ChoiceStream]) -> None:
    for s in streams:
        await s.close()


async def merged(streams: Sequence[ChoiceStream]) -> AsyncIterator[tuple[ChoiceStream,
                                                                          StreamChunk]]:
    """Chunks of several streams as they come (one stream: no tasks needed)."""
    if len(streams) == 1:
        async for chunk in streams[0].chunks():
            yield streams[0], chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(s: ChoiceStream) -> None:
        try:
            async for chunk in s.chunks():
                await queue.put((s, chunk, None))
            await queue.put((s, None, None))
        except Exception as exc:  # noqa: BLE001 - relayed to the consumer
            await queue.put((s, None, exc))

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            s, chunk, err = await queue.get()
            if err is not None:
                raise err
            if chunk is None:
                left -= 1
                continue
            yield s, chunk
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ClientGone(Exception):
    """The client disconnected before a non-streaming answer was ready."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` unless the client disconnects first; then cancel it (its ``finally``
    blocks abort the backend requests) and raise ClientGone. Non-streaming handlers need this:
    nothing else notices a client that leaves while the answer is being generated."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we were cancelled ourselves: stop both and pass it on
        await _cancel(task, watcher)
        raise
    if task.done():
        await _cancel(watcher)
        return task.result()
    await _cancel(task)
    raise ClientGone()


async def _cancel(*tasks: asyncio.Future) -> None:
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(BaseException):
            await t
