"""KV migration between decode replicas in the simulator: the live system's protocol, timed.

The decisions are ``cluster/migration.py``'s, the same pure ``next_stage`` the scheduler core
runs over real replicas, with the same ``MigrationConfig`` (``cluster.migration`` here): the
destination reserves ``reservation_pages`` up front; copy stages of at most ``stage_pages``
filled pages run while the request keeps decoding on the source; once at most
``final_stage_pages`` remain uncopied, or after ``max_stages`` completed passes, the request
leaves the source at its next step boundary and is out of both batches for the last copy plus
a fixed stall, then joins the destination's batch. A migration is abandoned (the destination's
pages freed, the request still decoding on its source) when the destination runs out of pages
as the request grows, when it exceeds ``timeout_s`` of simulated time, or when the request
finishes or is preempted meanwhile. Bytes count whole pages of completed copies, as the live
``ImportDone`` does.

What only the simulator adds is time: a stage takes ``bytes / link`` (``mig_transfer``), and
while a migration is in flight both its replicas step ``1 + migration_slowdown`` times slower.

``MigrationMixin`` holds only the protocol's driving; the state it reads and writes (replicas,
per-request offsets, counters, the event heap) belongs to ``Simulator``.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import numpy as np

from ares_jax.cluster.migration import (
    GiveUp,
    MigrationOutcome,
    MigrationRecord,
    Stage,
    StartLimiter,
    next_stage,
    reservation_pages,
)
from ares_jax.paging import pages_for
from ares_jax.sim.replica import DecodeReplica

if TYPE_CHECKING:
    from ares_jax.scheduler.cost import TransferCost
    from ares_jax.sim.config import SimConfig

NO_ROOM = MigrationOutcome.ABORTED_DESTINATION

# Event kinds of the simulator's heap.
PREFILL_DONE, STEP_DONE, TRANSFER_DONE, STAGE_DONE, FINAL_DONE, RESCHEDULE, SAMPLE = range(7)


class MigrationMixin:
    """Starts, advances, completes and aborts migrations (see the module docstring)."""

    # Provided by Simulator.
    cfg: SimConfig
    now: float
    page: int
    watermark_pages: int
    kv_bytes: int
    mig_transfer: TransferCost
    start_limiter: StartLimiter
    decode: list[DecodeReplica]
    active: dict[int, MigrationRecord]
    migration_history: collections.deque[MigrationRecord]
    counters: dict[str, float]
    kv_cur: list[int]
    rep_of: np.ndarray
    kv_off: np.ndarray
    migrating: np.ndarray
    last_migrated: np.ndarray
    req_migrations: np.ndarray

    def _push(self, t: float, kind: int, a: int = 0, b: int = 0) -> None:
        raise NotImplementedError

    def _leave(self, rep: DecodeReplica, r: int) -> int:
        raise NotImplementedError

    def _joins(self, rep: DecodeReplica, r: int) -> None:
        raise NotImplementedError

    def _admit(self, rep: DecodeReplica) -> None:
        raise NotImplementedError

    def _start_migration(self, r: int, src: int, dst: int) -> None:
        ok = 0 <= dst < len(self.decode) and src != dst
        if not ok or self.rep_of[r] != src or self.migrating[r]:
            self.counters["migrations_rejected"] += 1
            return
        dest = self.decode[dst]
        kv = int(self.kv_off[r]) + self.decode[src].steps
        pages = reservation_pages(kv, self.page, self.cfg.cluster.migration)
        if pages > dest.free_pages - self.watermark_pages:
            self.counters["migrations_rejected"] += 1
            return
        if self.start_limiter.full(self.now):
            self.counters["migrations_capped"] += 1
            return
        self.start_limiter.record(self.now)
        self.decode[src].copying += 1
        dest.copying += 1
        self._hold(dest, pages)
        rec = self.active[r] = MigrationRecord(str(r), src, dst, started_at=self.now,
                                               reserved_pages=pages)
        self.migrating[r] = True
        self.counters["migrations_started"] += 1
        self._next_stage(r, rec)

    def _hold(self, dest: DecodeReplica, pages: int) -> None:
        dest.used_pages += pages
        dest.reserved_pages += pages

    def _grow_reservation(self, rec: MigrationRecord, pages: int) -> bool:
        """Hold ``pages`` more at the destination; False if they are not free."""
        dest = self.decode[rec.dst]
        if pages > dest.free_pages:
            return False
        self._hold(dest, pages)
        rec.reserved_pages += pages
        return True

    def _next_stage(self, r: int, rec: MigrationRecord) -> None:
        mcfg = self.cfg.cluster.migration
        while True:  # a pass with nothing new to copy only counts, then decides again
            kv = int(self.kv_off[r]) + self.decode[rec.src].steps
            decision = next_stage(rec, num_cached=kv, page_size=self.page, cfg=mcfg,
                                  now=self.now)
            if isinstance(decision, GiveUp):
                self._abort_migration(r, decision.outcome, decision.reason)
                return
            if decision.final:
                # Stop-and-copy once the step in progress ends (``_depart``).
                self.decode[rec.src].leaving.append(r)
                return
            if decision.end > rec.reserved_pages and not self._grow_reservation(
                    rec, decision.end - rec.reserved_pages + mcfg.headroom_pages):
                self._abort_migration(r, NO_ROOM, "no room at the destination as the "
                                      "request grew")
                return
            if decision.end > decision.start:
                rec.in_flight = decision
                tokens = (decision.end - decision.start) * self.page
                self._push(self.now + self.mig_transfer.copy_ms(tokens) / 1e3, STAGE_DONE, 0, r)
                return
            if decision.completes_pass:
                rec.stages += 1

    def _copied(self, rec: MigrationRecord, stage: Stage) -> None:
        rec.bytes_moved += (stage.end - stage.start) * self.page * self.kv_bytes
        rec.copied_pages = max(rec.copied_pages, stage.end)
        if stage.completes_pass:
            rec.stages += 1

    def _stage_done(self, r: int) -> None:
        rec = self.active.get(r)
        if rec is None or rec.in_flight is None:
            return  # aborted meanwhile
        stage, rec.in_flight = rec.in_flight, None
        self._copied(rec, stage)
        self._next_stage(r, rec)

    def _depart(self, src: DecodeReplica) -> None:
        """The stop-and-copy stage: the leaving requests detach at this step boundary."""
        leaving, src.leaving = src.leaving, []
        for r in leaving:
            rec = self.active[r]
            kv = self._leave(src, r)
            need = pages_for(kv + 1, self.page)
            if need > rec.reserved_pages and not self._grow_reservation(
                    rec, need - rec.reserved_pages):
                # No room for the last pages: back into the source's batch (reattach); the
                # pages it just freed there are still free.
                src.used_pages += pages_for(kv, self.page)
                self._joins(src, r)
                self._abort_migration(r, NO_ROOM, "no room at the destination for the "
                                      "last pages")
                continue
            rec.detached_at = self.now
            rec.in_flight = Stage(start=rec.copied_pages, end=pages_for(kv, self.page),
                                  final=True, completes_pass=True)
            tokens = (rec.in_flight.end - rec.in_flight.start) * self.page
            stall_ms = self.mig_transfer.copy_ms(tokens) + self.mig_transfer.stall_ms
            self._push(self.now + stall_ms / 1e3, FINAL_DONE, 0, r)

    def _final_done(self, r: int) -> None:
        rec = self.active.pop(r)
        stage, rec.in_flight = rec.in_flight, None
        self._copied(rec, stage)
        dest = self.decode[rec.dst]
        self.decode[rec.src].copying -= 1
        dest.copying -= 1
        need = pages_for(self.kv_cur[r], self.page)
        dest.used_pages -= rec.reserved_pages - need  # the reservation becomes its pages
        dest.reserved_pages -= rec.reserved_pages
        rec.adopted_at = rec.finished_at = self.now
        rec.outcome = MigrationOutcome.COMMITTED
        self.migration_history.append(rec)
        self.migrating[r] = False
        self.last_migrated[r] = self.now
        self.req_migrations[r] += 1
        self.counters["migrations_completed"] += 1
        self.counters["bytes_moved_completed"] += rec.bytes_moved
        self.counters["migrated_pages"] += rec.copied_pages
        self._joins(dest, r)

    def _abort_migration(self, r: int, outcome: MigrationOutcome, reason: str) -> None:
        """Abandon ``r``'s migration: the destination's pages are freed; the request goes on
        decoding on its source (or finishes, or is preempted, whatever ended it)."""
        rec = self.active.pop(r)
        rec.outcome, rec.reason, rec.finished_at = outcome, reason, self.now
        self.migration_history.append(rec)
        dest, src = self.decode[rec.dst], self.decode[rec.src]
        src.copying -= 1
        dest.copying -= 1
        dest.used_pages -= rec.reserved_pages
        dest.reserved_pages -= rec.reserved_pages
        self.migrating[r] = False
        self.counters["migrations_aborted"] += 1
        self.counters["bytes_moved_aborted"] += rec.bytes_moved
        if r in src.leaving:
            src.leaving.remove(r)
        self._admit(dest)
