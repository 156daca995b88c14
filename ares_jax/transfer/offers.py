"""The source side's ledger of outstanding offers: acknowledgement, release and expiry.

Every transport keeps one ``OfferBook``. An offer leaves the book exactly once, by ``ack``,
``release``, expiry or ``close``; the transport's ``drop(uuid)`` hook then lets go of the
block (for ``jax.experimental.transfer``, by replacing the runtime's entry). Expiry runs on one
daemon thread per book, which also calls the transport's periodic ``tick`` (the runtime sweeps
its own expired entries only when its table is touched).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import threading
import time
from collections.abc import Callable

from ares_jax.transfer.kv_transport import ExpiryCallback, KvTicket, uuid_of

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Offer:
    uuid: int
    expires_at: float  # time.monotonic()
    on_expire: ExpiryCallback | None
    payload: object = None  # what LocalTransport hands out; None for the runtime transport


class OfferBook:
    """Thread-safe: offers come from the serving loop, acks from gRPC handlers."""

    def __init__(self, *, drop: Callable[[int], None], tick: Callable[[], None] | None = None,
                 tick_interval_s: float = 1.0, name: str = "kv-offers") -> None:
        self._drop = drop
        self._tick = tick
        self._tick_interval_s = tick_interval_s
        self._name = name
        self._offers: dict[int, Offer] = {}
        self._heap: list[tuple[float, int]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def add(self, offer: Offer) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the transport is closed")
            if offer.uuid in self._offers:
                raise ValueError(f"uuid {offer.uuid} is already offered")
            self._offers[offer.uuid] = offer
            heapq.heappush(self._heap, (offer.expires_at, offer.uuid))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name=self._name)
                self._thread.start()
            self._cond.notify_all()

    def get(self, uuid: int) -> Offer | None:
        with self._cond:
            return self._offers.get(uuid)

    def wait_for(self, uuid: int, timeout_s: float) -> Offer | None:
        """The offer under ``uuid``, waiting up to ``timeout_s`` for it to appear."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while uuid not in self._offers and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._offers.get(uuid)

    def remove(self, uuid: int) -> bool:
        """Drop an offer (ack or release); False if it was not outstanding."""
        with self._cond:
            offer = self._offers.pop(uuid, None)
        if offer is None:
            return False
        self._drop(uuid)
        return True

    def __len__(self) -> int:
        with self._cond:
            return len(self._offers)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            uuids = list(self._offers)
            self._offers.clear()
            self._heap.clear()
            self._cond.notify_all()
        for uuid in uuids:
            self._drop(uuid)

    def _run(self) -> None:
        next_tick = time.monotonic() + self._tick_interval_s
        while True:
            expired: list[Offer] = []
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, uuid = heapq.heappop(self._heap)
                    offer = self._offers.get(uuid)
                    # A stale heap entry (acked or released since) is skipped.
                    if offer is not None and offer.expires_at <= now:
                        del self._offers[uuid]
                        expired.append(offer)
                wake = next_tick if self._tick is not None else float("inf")
                if self._heap:
                    wake = min(wake, self._heap[0][0])
                if not expired and now < wake:
                    self._cond.wait(None if wake == float("inf") else wake - now)
                    continue
            # Callbacks run outside the lock: they free pages and may call back into us.
            for offer in expired:
                self._drop(offer.uuid)
                if offer.on_expire is not None:
                    try:
                        offer.on_expire(offer.uuid)
                    except Exception:  # noqa: BLE001 - one bad owner must not stop expiry
                        log.exception("on_expire(%d) failed", offer.uuid)
            if self._tick is not None and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self._tick_interval_s
                try:
                    self._tick()
                except Exception:  # noqa: BLE001
                    log.exception("transport tick failed")


class BookedOffers:
    """The seam's source-side calls that only read or change the transport's ``OfferBook``."""

    _book: OfferBook

    def ack(self, ticket_or_uuid: KvTicket | int) -> bool:
        return self._book.remove(uuid_of(ticket_or_uuid))

    def release(self, uuid: int) -> bool:
        return self._book.remove(uuid)

    def pending_offers(self) -> int:
        return len(self._book)
