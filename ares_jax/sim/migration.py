"""KV migration between decode replicas: Llumnix's staged protocol, as a mixin of the simulator.

The destination reserves pages for the request's current KV; copy stages run while the request
keeps decoding on the source; when the new KV since the last stage fits in
``migration_last_stage_max_blocks`` pages, the request leaves the source at its next step
boundary and is out of both batches for the final copy plus a fixed stall; it is abandoned after
``migration_max_stages`` stages, when the destination runs out of pages, or when the request
finishes or is preempted meanwhile. Bytes moved count every stage, completed or not.

``MigrationMixin`` holds only the protocol; the state it reads and writes (replicas, per-request
offsets, counters, the event heap) belongs to ``Simulator``.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import numpy as np

from ares_jax.sim.replica import DecodeReplica, pages_for

if TYPE_CHECKING:
    from ares_jax.scheduler.cost import TransferCost
    from ares_jax.sim.config import SimConfig

# Event kinds of the simulator's heap.
PREFILL_DONE, STEP_DONE, TRANSFER_DONE, STAGE_DONE, FINAL_DONE, RESCHEDULE, SAMPLE = range(7)


class ActiveMigration:
    __slots__ = ("req", "src", "dst", "stage", "copied", "reserved", "bytes")

    def __init__(self, req: int, src: int, dst: int, copied: int, reserved: int) -> None:
        self.req, self.src, self.dst = req, src, dst
        self.stage, self.copied, self.reserved = 1, copied, reserved
        self.bytes = 0


class MigrationMixin:
    """Starts, advances, completes and aborts migrations (see the module docstring)."""

    # Provided by Simulator.
    cfg: SimConfig
    now: float
    page: int
    watermark_pages: int
    kv_bytes: int
    mig_transfer: TransferCost
    mig_starts: collections.deque[float]
    decode: list[DecodeReplica]
    active: dict[int, ActiveMigration]
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
        pages = pages_for(kv, self.page)
        if pages > dest.free_pages - self.watermark_pages:
            self.counters["migrations_rejected"] += 1
            return
        cap = self.cfg.cluster.migrations_per_minute
        if cap:
            starts = self.mig_starts
            while starts and starts[0] <= self.now - 60.0:
                starts.popleft()
            if len(starts) >= cap:
                self.counters["migrations_capped"] += 1
                return
            starts.append(self.now)
        self.decode[src].copying += 1
        dest.copying += 1
        dest.used_pages += pages
        dest.reserved_pages += pages
        mig = self.active[r] = ActiveMigration(r, src, dst, kv, pages)
        mig.bytes = kv * self.kv_bytes
        self.migrating[r] = True
        self.counters["migrations_started"] += 1
        self._push(self.now + self.mig_transfer.copy_ms(kv) / 1e3, STAGE_DONE, 0, r)

    def _reserve(self, mig: ActiveMigration, pages: int) -> bool:
        dest = self.decode[mig.dst]
        extra = pages - mig.reserved
        if extra > dest.free_pages:
            return False
        if extra > 0:
            dest.used_pages += extra
            dest.reserved_pages += extra
            mig.reserved = pages
        return True

    def _stage_done(self, r: int) -> None:
        mig = self.active.get(r)
        if mig is None:
            return  # aborted meanwhile
        src = self.decode[mig.src]
        kv_now = int(self.kv_off[r]) + src.steps
        delta = kv_now - mig.copied
        c = self.cfg.cluster
        if pages_for(delta, self.page) <= c.migration_last_stage_max_blocks:
            # The step in progress may still add one token before the request leaves.
            if not self._reserve(mig, pages_for(kv_now + 1, self.page)):
                self._abort_migration(r)
                return
            src.leaving.append(r)
        elif mig.stage >= c.migration_max_stages or not self._reserve(
            mig, pages_for(kv_now, self.page)
        ):
            self._abort_migration(r)
        else:
            mig.stage += 1
            mig.copied = kv_now
            mig.bytes += delta * self.kv_bytes
            self._push(self.now + self.mig_transfer.copy_ms(delta) / 1e3, STAGE_DONE, 0, r)

    def _depart(self, src: DecodeReplica) -> None:
        for r in src.leaving:
            mig = self.active[r]
            kv = self._leave(src, r)
            delta = kv - mig.copied
            mig.copied = kv
            mig.bytes += delta * self.kv_bytes
            stall_ms = self.mig_transfer.copy_ms(delta) + self.mig_transfer.stall_ms
            self._push(self.now + stall_ms / 1e3, FINAL_DONE, 0, r)
        src.leaving.clear()

    def _final_done(self, r: int) -> None:
        mig = self.active.pop(r)
        dest = self.decode[mig.dst]
        self.decode[mig.src].copying -= 1
        dest.copying -= 1
        need = pages_for(self.kv_cur[r], self.page)
        dest.used_pages -= mig.reserved - need  # the reservation becomes the request's pages
        dest.reserved_pages -= mig.reserved
        self.migrating[r] = False
        self.last_migrated[r] = self.now
        self.req_migrations[r] += 1
        self.counters["migrations_completed"] += 1
        self.counters["bytes_moved_completed"] += mig.bytes
        self.counters["migrated_kv_tokens"] += self.kv_cur[r]
        self._joins(dest, r)

    def _abort_migration(self, r: int) -> None:
        mig = self.active.pop(r)
        dest = self.decode[mig.dst]
        self.decode[mig.src].copying -= 1
        dest.copying -= 1
        dest.used_pages -= mig.reserved
        dest.reserved_pages -= mig.reserved
        self.migrating[r] = False
        self.counters["migrations_aborted"] += 1
        self.counters["bytes_moved_aborted"] += mig.bytes
        src = self.decode[mig.src]
        if r in src.leaving:
            src.leaving.remove(r)
        self._admit(dest)
