"""``CoreRunner``: the scheduler core on a thread of its own, with a thread-safe front.

Callers (the gRPC ``Generate`` handler, the HTTP server, the Python ``LLM``-style client in
this process) ``submit`` a request and read its ``StreamChunk``s from a queue (or, with
``submit_batched``, each iteration's chunks for it as one list: one hand-off per iteration
instead of one per token); ``abort`` cancels it everywhere. The core is not thread-safe, so
every call on it happens on the runner's thread: submissions and aborts wait in an inbox and
are applied between iterations.

The thread iterates while there is work; when an iteration produced nothing (remote replicas
are busy stepping) it sleeps until a replica event, a submission or a short timeout wakes it,
so an idle or waiting scheduler does not spin.

**Bounded queue.** At most ``max_waiting`` requests wait for admission, counting those still
in the inbox (submitted, not yet applied by the core's thread), so concurrent submitters
cannot push the queue past its bound. Past it ``submit``/``enqueue`` raise ``Overloaded`` at
once, with a retry hint: the time the cluster takes, at the rate requests have been leaving
it lately, to drain half the queue (1 s to 30 s). Running requests are bounded by the decode
replicas' slots and held ones by the prefill replicas' pages, so nothing grows without bound.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from ares_jax.cluster.core import ClusterCore
from ares_jax.engine.outputs import StreamChunk
from ares_jax.engine.types import Request

log = logging.getLogger("ares_jax.scheduler")
IDLE_WAIT_S = 0.05
# Where a request's chunks go (called on the core's thread); None ends the stream.
Deliver = Callable[[StreamChunk | None], None]
# The same, an iteration at a time: the request's chunks of one iteration, in order.
DeliverBatch = Callable[[list[StreamChunk] | None], None]
BUSY_WAIT_S = 0.002
RATE_WINDOW_S = 10.0  # departures over this window estimate the drain rate for retry hints
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0


class Overloaded(RuntimeError):
    """The waiting queue is full; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CoreRunner:
    def __init__(self, core: ClusterCore, *, max_waiting: int = 1024) -> None:
        self.core = core
        self.max_waiting = max_waiting
        self.wake = threading.Event()
        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self._streams: dict[str, DeliverBatch] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards the inbox and the stream table
        self._thread = threading.Thread(target=self._run, name="scheduler-core", daemon=True)
        self.error: BaseException | None = None
        self.iterations = 0
        self._pending = 0  # submissions in the inbox, not yet in the core's queue
        # (monotonic time, requests finished so far), sampled by the core's thread.
        self._departures: collections.deque[tuple[float, int]] = collections.deque()
        self.refused = 0

    def start(self) -> CoreRunner:
        self._thread.start()
        return self

    # ------------------------------------------------------------------ the front

    def submit(self, request: Request, prompt_text: str | None = None,
               deliver: Deliver | None = None) -> queue.Queue[StreamChunk | None]:
        """Queue ``request``; its chunks go to ``deliver`` (called on the core's thread; None
        ends the stream), by default onto the returned queue. Raises ValueError (the request
        can never be served) or Overloaded, before anything is queued."""
        out: queue.Queue[StreamChunk | None] = queue.Queue()
        self._add(request, prompt_text, _per_chunk(deliver or out.put))
        return out

    def submit_batched(self, request: Request, prompt_text: str | None = None
                       ) -> queue.SimpleQueue[list[StreamChunk] | None]:
        """As ``submit``, but each item of the returned queue is the list of chunks one core
        iteration produced for the request (usually one; more when the core drained several
        step batches of its replica at once), then None."""
        out: queue.SimpleQueue[list[StreamChunk] | None] = queue.SimpleQueue()
        self._add(request, prompt_text, out.put)
        return out

    def _add(self, request: Request, prompt_text: str | None, sink: DeliverBatch) -> None:
        """Hand ``request`` to the core's thread and wait until the core took (or refused)
        it."""
        self.enqueue(request, prompt_text, sink).result(timeout=60)

    def enqueue(self, request: Request, prompt_text: str | None, sink: DeliverBatch
                ) -> Future[None]:
        """Hand ``request`` to the core's thread without waiting; the future resolves once
        the core took it (or raises why not). ``sink`` gets each iteration's chunks for it
        (on the core's thread), then None. Raises Overloaded at once when the queue is full."""
        with self._lock:
            waiting = len(self.core.waiting) + self._pending
            if waiting >= self.max_waiting:
                self.refused += 1
                raise Overloaded(f"the server is overloaded: {waiting} requests are waiting "
                                 f"(max_waiting={self.max_waiting}); retry later",
                                 self.retry_after_s(waiting))
            self._pending += 1
        accepted: Future[None] = Future()

        def add() -> None:
            with self._lock:
                self._pending -= 1
            try:
                self.core.add_request(request, prompt_text)
            except Exception as err:  # noqa: BLE001 - handed back to the caller
                accepted.set_exception(err)
                return
            self._streams[request.request_id] = sink
            accepted.set_result(None)

        try:
            self._call(add)
        except RuntimeError:
            with self._lock:
                self._pending -= 1
            raise
        return accepted

    def retry_after_s(self, waiting: int) -> float:
        """Seconds until half of ``waiting`` requests have left, at the recent departure
        rate; 1 s when there is no rate yet."""
        samples = list(self._departures)
        if len(samples) < 2 or samples[-1][1] == samples[0][1]:
            return RETRY_MIN_S
        rate = (samples[-1][1] - samples[0][1]) / max(samples[-1][0] - samples[0][0], 1e-3)
        return min(max(waiting / 2 / rate, RETRY_MIN_S), RETRY_MAX_S)

    def abort(self, request_id: str) -> None:
        def cancel() -> None:
            self.core.abort(request_id)
            self.core.finished.pop(request_id, None)
            sink = self._streams.pop(request_id, None)
            if sink is not None:
                sink(None)

        self._call(cancel)

    def call(self, fn: Callable[[ClusterCore], object], timeout: float = 30.0) -> object:
        """Run ``fn(core)`` on the core's thread and return its result (for stats, admin)."""
        result: Future[object] = Future()

        def run() -> None:
            try:
                result.set_result(fn(self.core))
            except Exception as err:  # noqa: BLE001
                result.set_exception(err)

        self._call(run)
        return result.result(timeout=timeout)

    def _call(self, fn: Callable[[], None]) -> None:
        if not self._thread.is_alive():
            raise RuntimeError(f"the scheduler core is not running ({self.error!r})")
        with self._lock:
            self._inbox.append(fn)
        self.wake.set()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    todo = list(self._inbox)
                    self._inbox.clear()
                for fn in todo:
                    fn()
                if not self.core.has_work:
                    self.wake.wait(IDLE_WAIT_S)
                    self.wake.clear()
                    self._fan_out(self.core.poll())  # e.g. a replica failing while idle
                    continue
                chunks = self.core.step()
                self.iterations += 1
                self._sample_departures()
                self._fan_out(chunks)
                if not chunks:
                    self.wake.wait(BUSY_WAIT_S)
                    self.wake.clear()
        except BaseException as err:  # the core failed: fail every stream, loudly
            self.error = err
            log.exception("the scheduler core stopped")
            for sink in self._streams.values():
                sink(None)
            raise
        finally:
            self._finish_streams()

    def _sample_departures(self) -> None:
        now = time.monotonic()
        if self._departures and now - self._departures[-1][0] < 0.5:
            return
        self._departures.append((now, self.core.counters["requests_finished"]))
        while now - self._departures[0][0] > RATE_WINDOW_S:
            self._departures.popleft()

    def _fan_out(self, chunks: list[StreamChunk]) -> None:
        """Hand each stream its chunks of this iteration in one call; a finished request's
        stream then ends (and the core forgets its output: the stream carried it)."""
        by_request: dict[str, list[StreamChunk]] = {}
        for ch in chunks:
            mine = by_request.get(ch.request_id)
            if mine is None:
                by_request[ch.request_id] = [ch]
            else:
                mine.append(ch)
        for rid, mine in by_request.items():
            sink = self._streams.get(rid)
            if sink is None:
                continue
            sink(mine)
            if mine[-1].finished:
                del self._streams[rid]
                sink(None)
                self.core.finished.pop(rid, None)

    def _finish_streams(self) -> None:
        deadline = time.monotonic() + 1.0
        while self._streams and time.monotonic() < deadline:
            _, sink = self._streams.popitem()
            sink(None)


def _per_chunk(deliver: Deliver) -> DeliverBatch:
    """A per-chunk ``deliver`` as a per-iteration sink."""

    def sink(chunks: list[StreamChunk] | None) -> None:
        if chunks is None:
            deliver(None)
            return
        for ch in chunks:
            deliver(ch)

    return sink
