"""Per-request deadlines: which requests' callers have stopped waiting.

The scheduler core checks once per iteration; a heap keeps that O(1) while no deadline has
passed, however many requests carry one. A request past its deadline ends with
``finish_reason = DEADLINE`` (its stream's last chunk), and the core frees it everywhere, as
for an abort: the waiting queue, a prefill in flight, a held KV block, a decode slot, a
migration's reservation.
"""

from __future__ import annotations

import heapq
import itertools

from ares_jax.engine.types import Request

# The finish reason of a request that ran past its deadline. The front doors turn it into
# their own error: gRPC DEADLINE_EXCEEDED, HTTP 504 (or an error event mid-stream).
DEADLINE = "deadline"


class Deadlines:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Request]] = []
        self._seq = itertools.count()  # ties broken by arrival, never by comparing Requests

    def add(self, request: Request) -> None:
        if request.deadline is not None:
            heapq.heappush(self._heap, (request.deadline, next(self._seq), request))

    def expired(self, now: float) -> list[Request]:
        """Requests whose deadline is at or before ``now``, each once. The caller checks that
        each is still the live request of its id (it may have finished, and its id been
        reused, since)."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def __len__(self) -> int:
        return len(self._heap)
