"""Live migration of running requests between decode engines, after Llumnix.

A migration runs in stages interleaved with decode steps (the serving loop calls ``advance``
between steps), so the request keeps decoding on the source while its filled pages are copied:

1. ``start``: the destination pre-allocates the request's pages (plus headroom).
2. Each stage copies the pages filled since the last stage, except the one being written, at
   most ``stage_pages`` per call so that the source's steps are never held up for long.
3. Once at most ``final_stage_pages`` pages remain, or after ``max_stages`` stages, the final
   stop-and-copy stage detaches the request from the source, copies the rest, and the
   destination adopts it. Only this stage stalls the request, and its size is bounded, so the
   downtime does not grow with the sequence length.

Every path ends in an explicit outcome. An abort frees the destination's pages and leaves the
request decoding on the source exactly where it was.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax

from ares_jax.config import config
from ares_jax.engine.kv_pool import OutOfPages, pages_for
from ares_jax.transfer.errors import TransferError

if TYPE_CHECKING:
    from ares_jax.engine.decode import DecodeEngine


class MigrationOutcome(enum.Enum):
    COMMITTED = "committed"
    ABORTED_SOURCE = "aborted_source"  # the request finished, was cancelled or preempted
    ABORTED_DESTINATION = "aborted_destination"  # no room, or the transfer failed


@config
class MigrationConfig:
    final_stage_pages: int = 2
    # Catch-up rounds (each copies what was filled since the last) before stop-and-copy.
    max_stages: int = 3
    # Pages copied per advance() at most, so that a long request's first full pass does not
    # stall the source's next step for long; only completed passes count as stages.
    stage_pages: int = 64
    headroom_pages: int = 1
    # Wall-clock limit for the whole migration before the destination gives up.
    timeout_s: float = 30.0


@dataclasses.dataclass
class MigrationRecord:
    request_id: str
    src: int
    dst: int
    started_at: float
    stages: int = 0
    copied_pages: int = 0
    bytes_moved: int = 0
    outcome: MigrationOutcome | None = None
    reason: str = ""
    finished_at: float | None = None
    # Stop-and-copy window: the request decodes nowhere between these two instants.
    detached_at: float | None = None
    adopted_at: float | None = None

    @property
    def active(self) -> bool:
        return self.outcome is None


# (source, destination, request id, first page, end page) -> bytes moved
CopyFn = Callable[["DecodeEngine", "DecodeEngine", str, int, int], int]


def pow2_chunks(start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) as (first, count) runs of power-of-two length, largest first
    (257 pages = 256 + 1): exactly the shapes ``export_pages`` buckets to."""
    chunks, pos = [], start
    while pos < end:
        n = 1 << ((end - pos).bit_length() - 1)
        chunks.append((pos, n))
        pos += n
    return chunks


def copy_pages(src: DecodeEngine, dst: DecodeEngine, rid: str, start: int, end: int) -> int:
    """Copy pages [start, end) of ``rid`` from ``src`` to the same page indices at ``dst``, in
    power-of-two chunks: no padding crosses the link, and few shapes are compiled. Returns the
    bytes moved."""
    moved = 0
    for pos, n in pow2_chunks(start, end):
        k, v = src.export_pages(rid, pos, pos + n)
        dst.import_pages(rid, pos, k, v, n)
        moved += k.nbytes + v.nbytes
    return moved


class MigrationManager:
    """Carries out migrations between ``engines`` (indices as in the serving loop)."""

    def __init__(self, engines: Sequence[DecodeEngine], config: MigrationConfig | None = None,
                 copy_fn: CopyFn = copy_pages, clock: Callable[[], float] = time.perf_counter
                 ) -> None:
        self.engines = list(engines)
        self.config = config or MigrationConfig()
        self.copy_fn = copy_fn
        self.clock = clock
        self.active: dict[str, MigrationRecord] = {}
        self.history: list[MigrationRecord] = []

    def is_migrating(self, request_id: str) -> bool:
        return request_id in self.active

    def start(self, request_id: str, src: int, dst: int) -> MigrationRecord:
        """Begin migrating; returns the record (already aborted if it cannot start)."""
        rec = MigrationRecord(request_id, src, dst, started_at=self.clock())
        if request_id in self.active:
            raise ValueError(f"request {request_id} is already migrating")
        s, d = self.engines[src], self.engines[dst]
        if src == dst:
            return self._finish(rec, MigrationOutcome.ABORTED_DESTINATION, "source is the "
                                "destination")
        state = s.slots.get(request_id)
        if state is None:
            return self._finish(rec, MigrationOutcome.ABORTED_SOURCE, "not running on source")
        if d.free_slots() <= 0:
            return self._finish(rec, MigrationOutcome.ABORTED_DESTINATION, "no free slot")
        need = pages_for(state.num_cached + 1, s.page_size) + self.config.headroom_pages
        try:
            d.reserve(request_id, need)
        except OutOfPages as err:
            return self._finish(rec, MigrationOutcome.ABORTED_DESTINATION, str(err))
        self.active[request_id] = rec
        return rec

    def advance(self) -> list[MigrationRecord]:
        """Run one stage of every active migration; returns those that ended."""
        ended = []
        for rid in list(self.active):
            rec = self.active[rid]
            try:
                self._stage(rec)
            except (TransferError, OutOfPages, ValueError, IndexError, RuntimeError) as err:
                self._abort_destination(rec, f"{type(err).__name__}: {err}")
            if rec.outcome is not None:
                ended.append(rec)
        return ended

    def _stage(self, rec: MigrationRecord) -> None:
        src, dst = self.engines[rec.src], self.engines[rec.dst]
        state = src.slots.get(rec.request_id)
        if state is None:
            self._abort_source(rec, "the request left the source during migration")
            return
        if self.clock() - rec.started_at > self.config.timeout_s:
            raise TransferError(f"migration exceeded {self.config.timeout_s} s")
        used = pages_for(state.num_cached, src.page_size)
        filled = state.num_cached // src.page_size
        final = used - rec.copied_pages <= self.config.final_stage_pages or \
            rec.stages >= self.config.max_stages
        if not final:
            end = min(filled, rec.copied_pages + self.config.stage_pages)
            rec.bytes_moved += self.copy_fn(src, dst, rec.request_id, rec.copied_pages, end)
            rec.copied_pages = max(rec.copied_pages, end)
            if end == filled:
                rec.stages += 1
            return
        # Stop-and-copy: nothing decodes this request until the destination adopts it.
        rec.detached_at = self.clock()
        have = len(dst.allocator.pages(rec.request_id))
        need = pages_for(state.num_cached + 1, dst.page_size)
        if need > have:
            dst.reserve(rec.request_id, need - have)
        rec.bytes_moved += self.copy_fn(src, dst, rec.request_id, rec.copied_pages, used)
        rec.copied_pages = used
        rec.stages += 1
        jax.block_until_ready((dst.pool.k, dst.pool.v))  # the copy landed before we commit
        src.slots.pop(rec.request_id)
        try:
            dst.adopt(state.request, num_cached=state.num_cached, last_token=state.last_token,
                      generated=state.generated)
        except Exception:
            src.slots[rec.request_id] = state  # the source still has every page: resume there
            raise
        src.allocator.free(rec.request_id)
        rec.adopted_at = self.clock()
        self._finish(rec, MigrationOutcome.COMMITTED, "")

    def _abort_source(self, rec: MigrationRecord, reason: str) -> None:
        self.engines[rec.dst].allocator.free(rec.request_id)
        self._finish(rec, MigrationOutcome.ABORTED_SOURCE, reason)

    def _abort_destination(self, rec: MigrationRecord, reason: str) -> None:
        dst = self.engines[rec.dst]
        if rec.request_id in dst.slots:  # failed after adopt: keep it where it now runs
            return
        dst.allocator.free(rec.request_id)
        self._finish(rec, MigrationOutcome.ABORTED_DESTINATION, reason)

    def abort(self, request_id: str, reason: str = "cancelled") -> None:
        """Give up a migration in flight (e.g. its destination is being drained)."""
        rec = self.active.get(request_id)
        if rec is not None:
            self._abort_destination(rec, reason)

    def _finish(self, rec: MigrationRecord, outcome: MigrationOutcome,
                reason: str) -> MigrationRecord:
        rec.outcome, rec.reason, rec.finished_at = outcome, reason, self.clock()
        self.active.pop(rec.request_id, None)
        self.history.append(rec)
        return rec
