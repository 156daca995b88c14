"""The HTTP front door of the scheduler process: the OpenAI-compatible server of
``ares_jax.frontend`` over ``SchedulerBackend``, which submits to the scheduler's
``CoreRunner`` exactly as the gRPC ``Generate`` handler does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from ares_jax.engine.outputs import StreamChunk
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import Request
from ares_jax.frontend.backend import BackendClosed
from ares_jax.frontend.server import HTTPServerThread
from ares_jax.serving.scheduler_server import Scheduler


class SchedulerBackend:
    """``GenerationBackend`` over a scheduler whose replicas are other processes."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler

    @property
    def model_name(self) -> str:
        return self.s.model_name

    @property
    def tokenizer(self):
        return self.s.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.s.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.s.max_model_len

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       prompt_text: str | None = None, *, deadline: float | None = None
                       ) -> AsyncIterator[StreamChunk]:
        runner = self.s.runner
        if runner is None:
            raise BackendClosed(f"the cluster is not ready: {self.s.registered()} of "
                                f"{self.s.expect} replicas registered")
        aloop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamChunk | None] = asyncio.Queue()
        request = Request(request_id=request_id, prompt_ids=[int(t) for t in prompt_ids],
                          params=params, arrival_time=time.perf_counter(), deadline=deadline)
        # Raises ValueError / Overloaded before anything streams (submit waits for the core).
        await asyncio.to_thread(runner.submit, request, prompt_text,
                                lambda ch: aloop.call_soon_threadsafe(queue.put_nowait, ch))
        finished = False
        try:
            while True:
                chunk = await queue.get()
                if chunk is None:
                    raise BackendClosed(f"request {request_id} ended without finishing (the "
                                        "scheduler is shutting down)")
                finished = chunk.finished
                yield chunk
                if finished:
                    return
        finally:
            if not finished:  # the client left, or the stream broke: free it everywhere
                runner.abort(request_id)

    async def abort(self, request_id: str) -> None:
        if self.s.runner is not None:
            self.s.runner.abort(request_id)

    def health(self) -> tuple[bool, dict]:
        runner = self.s.runner
        links = {address: link.alive for address, link in self.s.links.items()}
        ok = runner is not None and runner.error is None and all(links.values())
        return ok, {"registered": self.s.registered(), "expected": self.s.expect,
                    "replica_processes": links,
                    "core_error": None if runner is None or runner.error is None
                    else repr(runner.error)}

    def cluster_state(self) -> dict:
        return self.s.cluster_state()


def start_http(scheduler: Scheduler, host: str, port: int) -> HTTPServerThread:
    """Serve the OpenAI-compatible API, /metrics, /cluster and the live page on a thread."""
    return HTTPServerThread(SchedulerBackend(scheduler), host, port).start()
