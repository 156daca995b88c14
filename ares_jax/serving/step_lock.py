"""The lock of a replica process's engines, with a hand-off for the step loop.

The step loop takes the lock for a decode step, lets go, and takes it again at once; Python's
locks are not fair, so the thread that just released one (and still holds the GIL) nearly
always wins it back. A gRPC handler waiting to run a command (a migration's copy stage, an
insert) could wait for hundreds of steps. ``StepLock`` counts the threads waiting, and
``yield_to_waiters`` lets the step loop step aside until they have had their turn.
"""

from __future__ import annotations

import threading
import time

HANDOFF_WAIT_S = 0.01  # the step loop waits at most this long for waiters to get in


class StepLock:
    """A re-entrant lock that knows how many threads are waiting for it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._count = threading.Lock()
        self._waiting = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self._count:
            self._waiting += 1
        try:
            return self._lock.acquire(blocking, timeout)
        finally:
            with self._count:
                self._waiting -= 1

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> StepLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def waiting(self) -> int:
        return self._waiting

    def yield_to_waiters(self) -> None:
        """Called without the lock: sleep (releasing the GIL) while others wait for it, so
        that they take it before the caller does again."""
        deadline = time.monotonic() + HANDOFF_WAIT_S
        while self._waiting and time.monotonic() < deadline:
            time.sleep(0.0002)
