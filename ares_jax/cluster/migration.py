"""Live migration of a running request between decode replicas, after Llumnix: the protocol's
one state machine, shared by the live cluster core (any transport) and the simulator.

The request keeps decoding on the source while its filled pages are copied in stages:

1. the destination reserves the request's pages (plus headroom);
2. each stage copies the pages filled since the last one (never the page being written), at
   most ``stage_pages`` at a time so a long request's first pass never holds up the source;
3. once at most ``final_stage_pages`` pages remain uncopied, or after ``max_stages`` passes, the
   stop-and-copy stage detaches the request from the source, copies the rest, and the
   destination adopts it. Only this stage stalls the request, and its size is bounded.

``next_stage`` is the pure decision (what to copy next, or give up); the drivers carry it out.
Every migration ends in an explicit outcome; an abort frees the destination's pages and leaves
the request decoding on the source exactly where it was.
"""

from __future__ import annotations

import collections
import dataclasses
import enum

from ares_jax.config import config
from ares_jax.paging import pages_for


class MigrationOutcome(enum.Enum):
    COMMITTED = "committed"
    ABORTED_SOURCE = "aborted_source"  # the request finished, was cancelled or preempted
    ABORTED_DESTINATION = "aborted_destination"  # no room, or the transfer failed


@config
class MigrationConfig:
    # Stop-and-copy once this few pages remain uncopied.
    final_stage_pages: int = 2
    # Catch-up passes (each copies what was filled since the last) before stop-and-copy.
    max_stages: int = 3
    # Pages copied per stage at most; only completed passes count towards max_stages.
    stage_pages: int = 64
    # Extra pages the destination reserves so the request can grow while copies run.
    headroom_pages: int = 1
    # Wall-clock limit for the whole migration before the destination gives up.
    timeout_s: float = 30.0
    # At most this many migrations start per 60 s, cluster-wide; the scheduler drops the rest
    # of a policy's moves (0: no cap). A deployment that rations its migration link trades P99
    # TPOT for bytes this way (docs/results_sim.md, "What ARES's migrations buy").
    max_starts_per_minute: int = 0

    def __post_init__(self) -> None:
        if self.max_starts_per_minute < 0:
            raise ValueError("migration.max_starts_per_minute must be >= 0 (0: no cap), "
                             f"not {self.max_starts_per_minute}")


class StartLimiter:
    """``MigrationConfig.max_starts_per_minute`` over a sliding 60 s window. The scheduler core
    and the simulator ask it (``full``) before a start and ``record`` every start made, so both
    start the same migrations."""

    WINDOW_S = 60.0

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._starts: collections.deque[float] = collections.deque()

    def full(self, now: float) -> bool:
        """True if ``per_minute`` migrations started in the 60 s up to ``now``."""
        if not self.per_minute:
            return False
        while self._starts and self._starts[0] <= now - self.WINDOW_S:
            self._starts.popleft()
        return len(self._starts) >= self.per_minute

    def record(self, now: float) -> None:
        if self.per_minute:
            self._starts.append(now)


@dataclasses.dataclass
class MigrationRecord:
    request_id: str
    src: int  # replica id
    dst: int
    started_at: float
    stages: int = 0
    copied_pages: int = 0
    reserved_pages: int = 0  # held at the destination
    bytes_moved: int = 0
    outcome: MigrationOutcome | None = None
    reason: str = ""
    finished_at: float | None = None
    # Stop-and-copy window: the request decodes nowhere between these two instants.
    detached_at: float | None = None
    adopted_at: float | None = None
    # The copy stage in flight, if any.
    in_flight: Stage | None = None

    @property
    def active(self) -> bool:
        return self.outcome is None

    @property
    def downtime_s(self) -> float | None:
        if self.detached_at is None or self.adopted_at is None:
            return None
        return self.adopted_at - self.detached_at


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """Copy pages [start, end); ``final``: detach first (stop-and-copy) and commit after."""

    start: int
    end: int
    final: bool
    completes_pass: bool  # the copy catches up with the source's filled pages


@dataclasses.dataclass(frozen=True, kw_only=True)
class GiveUp:
    outcome: MigrationOutcome
    reason: str


def next_stage(rec: MigrationRecord, *, num_cached: int, page_size: int, cfg: MigrationConfig,
               now: float) -> Stage | GiveUp:
    """What a migration does next, from how far it got and the source's KV length now."""
    if now - rec.started_at > cfg.timeout_s:
        return GiveUp(outcome=MigrationOutcome.ABORTED_DESTINATION,
                      reason=f"migration exceeded {cfg.timeout_s} s")
    used = pages_for(num_cached, page_size)
    filled = num_cached // page_size
    if used - rec.copied_pages <= cfg.final_stage_pages or rec.stages >= cfg.max_stages:
        return Stage(start=rec.copied_pages, end=used, final=True, completes_pass=True)
    end = max(rec.copied_pages, min(filled, rec.copied_pages + cfg.stage_pages))
    return Stage(start=rec.copied_pages, end=end, final=False, completes_pass=end == filled)


def reservation_pages(num_cached: int, page_size: int, cfg: MigrationConfig) -> int:
    """Pages the destination reserves up front: the KV, the next token, and headroom."""
    return pages_for(num_cached + 1, page_size) + cfg.headroom_pages
