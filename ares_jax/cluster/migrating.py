"""The scheduler core's half that drives live migrations (a mixin of ``ClusterCore``).

Every ``reschedule_every`` iterations the policy proposes moves; ``start_migration`` reserves
the destination's pages; each iteration ``_advance_migrations`` asks the one state machine
(``cluster/migration.py``: ``next_stage``) what to copy next and has the replicas export and
import it (any transport); the stop-and-copy stage detaches the request from its source, and
once its last pages landed the destination adopts it. Every migration ends in a named outcome;
an abort frees the destination's pages and leaves the request decoding on its source.

The state it reads and writes (requests' locations, trackers, detached states, counters, the
decision log, the replica handles) belongs to ``ClusterCore``.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from ares_jax.cluster.config import ClusterConfig
from ares_jax.cluster.migration import (
    GiveUp,
    MigrationOutcome,
    MigrationRecord,
    Stage,
    StartLimiter,
    next_stage,
    reservation_pages,
)
from ares_jax.cluster.snapshot import build_snapshot
from ares_jax.engine.outputs import RequestTracker
from ares_jax.engine.slots import DecodeLoad
from ares_jax.paging import pages_for
from ares_jax.replica.handle import ReplicaHandle
from ares_jax.replica.types import Detached, ImportDone
from ares_jax.scheduler import PolicyState

log = logging.getLogger("ares_jax.scheduler")


class Migrations:
    """Starts, advances, commits and aborts migrations (see the module docstring)."""

    # Provided by ClusterCore.
    cluster: ClusterConfig
    clock: Callable[[], float]
    page_size: int
    iterations: int
    policy: object
    policy_state: PolicyState
    by_id: dict[int, ReplicaHandle]
    decode_pos: dict[int, int]
    location: dict[str, int]
    inserting: dict[str, int]
    trackers: dict[str, RequestTracker]
    detached: dict[str, Detached]
    migrations: dict[str, MigrationRecord]
    migration_history: collections.deque[MigrationRecord]
    start_limiter: StartLimiter
    last_migrated: dict[str, float]
    replica_time: dict[str, float]
    decisions: collections.deque[tuple]
    counters: dict[str, float]

    def loads(self) -> dict[int, DecodeLoad]:
        raise NotImplementedError

    def _reschedule(self) -> None:
        loads = self.loads()
        snap = build_snapshot(self, loads, (), with_table=True)
        decisions, self.policy_state = self.policy.reschedule(snap, self.policy_state)
        for m in decisions.migrations:
            rid = str(m.request_id)
            if rid in self.migrations or self.location.get(rid) != m.src or \
                    rid in self.inserting:
                continue
            now = self.clock()
            if self.start_limiter.full(now):  # migration.max_starts_per_minute
                self.counters["migrations_capped"] += 1
                continue
            if self.start_migration(rid, int(m.src), int(m.dst), loads).active:
                self.start_limiter.record(now)

    def start_migration(self, rid: str, src: int, dst: int,
                        loads: dict | None = None) -> MigrationRecord:
        """Begin moving a running request; returns its record (already ended if it cannot
        start: no room at the destination, or the request is not on ``src``)."""
        rec = MigrationRecord(rid, src, dst, started_at=self.clock())
        if rid in self.migrations:
            raise ValueError(f"request {rid} is already migrating")
        if src == dst or dst not in self.decode_pos:
            return self._end(rec, MigrationOutcome.ABORTED_DESTINATION, "bad destination")
        if self.location.get(rid) != src or rid in self.inserting:
            return self._end(rec, MigrationOutcome.ABORTED_SOURCE, "not running on source")
        loads = loads or {}
        dst_load = loads.get(dst) or self.by_id[dst].load()
        if dst_load.free_slots <= 0:
            return self._end(rec, MigrationOutcome.ABORTED_DESTINATION, "no free slot")
        kv = self._kv_tokens(rid, src, loads.get(src))
        pages = reservation_pages(kv, self.page_size, self.cluster.migration)
        if not self.by_id[dst].reserve(rid, pages):
            return self._end(rec, MigrationOutcome.ABORTED_DESTINATION,
                             f"{pages} pages not free on replica {dst}")
        rec.reserved_pages = pages
        self.decisions.append((self.iterations, "migrate", rid, src, dst))
        self.migrations[rid] = rec
        self.counters["migrations_started"] += 1
        return rec

    def _kv_tokens(self, rid: str, replica: int, load=None) -> int:
        load = load or self.by_id[replica].load()
        try:
            return int(load.kv_tokens[load.request_ids.index(rid)])
        except ValueError:
            return 0

    def _advance_migrations(self) -> None:
        for rid in list(self.migrations):
            rec = self.migrations[rid]
            if rec.in_flight is None:
                try:
                    self._next_stage(rec)
                except Exception as err:  # noqa: BLE001 - e.g. an RPC to a replica failed
                    self._abort_migration(rid, MigrationOutcome.ABORTED_DESTINATION,
                                          f"{type(err).__name__}: {err}")

    def _next_stage(self, rec: MigrationRecord) -> None:
        rid = rec.request_id
        src, dst = self.by_id[rec.src], self.by_id[rec.dst]
        kv = self._kv_tokens(rid, rec.src)
        decision = next_stage(rec, num_cached=kv, page_size=self.page_size,
                              cfg=self.cluster.migration, now=self.clock())
        if isinstance(decision, GiveUp):
            self._abort_migration(rid, decision.outcome, decision.reason)
            return
        if not decision.final:
            if decision.end > rec.reserved_pages:
                # The request grew past the reservation (a remote source's load lags it by a
                # few steps): hold the pages this stage writes, plus headroom, first.
                more = decision.end - rec.reserved_pages + self.cluster.migration.headroom_pages
                if not dst.reserve(rid, more):
                    self._abort_migration(rid, MigrationOutcome.ABORTED_DESTINATION,
                                          "no room at the destination as the request grew")
                    return
                rec.reserved_pages += more
            if decision.end > decision.start:
                rec.in_flight = decision
                dst.import_kv(rid, decision.start, src.export(
                    rid, decision.start, decision.end, to=dst.info))
            elif decision.completes_pass:
                rec.stages += 1
            return
        state = src.detach(rid)
        if state is None:
            self._abort_migration(rid, MigrationOutcome.ABORTED_SOURCE,
                                  "the request left the source during migration")
            return
        rec.detached_at = self.clock()
        self.detached[rid] = state
        used = pages_for(state.num_cached, self.page_size)
        need = pages_for(state.num_cached + 1, self.page_size)
        reserved = rec.reserved_pages
        if need > reserved:
            if not dst.reserve(rid, need - reserved):
                self._abort_migration(rid, MigrationOutcome.ABORTED_DESTINATION,
                                      "no room at the destination for the last pages")
                return
            rec.reserved_pages = need
        rec.in_flight = Stage(start=rec.copied_pages, end=used, final=True, completes_pass=True)
        dst.import_kv(rid, rec.copied_pages, src.export(rid, rec.copied_pages, used,
                                                        to=dst.info))

    def _on_imported(self, ev: ImportDone) -> None:
        rid = ev.request_id
        rec = self.migrations.get(rid)
        if rec is None or rec.in_flight is None or rec.dst != ev.replica_id:
            return  # abandoned meanwhile; its destination pages were released then
        stage, rec.in_flight = rec.in_flight, None
        if not ev.ok:
            self._abort_migration(rid, MigrationOutcome.ABORTED_DESTINATION, ev.error)
            return
        rec.bytes_moved += ev.nbytes
        rec.copied_pages = max(rec.copied_pages, stage.end)
        if stage.completes_pass:
            rec.stages += 1
        if not stage.final:
            return
        state = self.detached.pop(rid)
        src, dst = self.by_id[rec.src], self.by_id[rec.dst]
        try:
            dst.adopt(self.trackers[rid].request, state)
        except Exception as err:  # noqa: BLE001 - the source still has every page
            self.detached[rid] = state
            self._abort_migration(rid, MigrationOutcome.ABORTED_DESTINATION,
                                  f"adopt failed: {type(err).__name__}: {err}")
            return
        src.release(rid)
        rec.adopted_at = self.clock()
        self.location[rid] = rec.dst
        self.last_migrated[rid] = rec.adopted_at
        self.replica_time[rid] += rec.adopted_at - (rec.detached_at or rec.adopted_at)
        self.trackers[rid].metrics.num_migrations += 1
        del self.migrations[rid]
        self._end(rec, MigrationOutcome.COMMITTED, "")

    def _abort_migration(self, rid: str, outcome: MigrationOutcome, reason: str) -> None:
        """Abandon ``rid``'s migration, if any: the destination's pages are freed and the
        request goes on decoding on its source (reattached if it was detached)."""
        rec = self.migrations.pop(rid, None)
        if rec is None:
            return
        state = self.detached.pop(rid, None)
        if state is not None and rid in self.trackers:
            self.by_id[rec.src].reattach(rid)
        rec.in_flight = None
        self.by_id[rec.dst].release(rid)
        self._end(rec, outcome, reason)

    def _end(self, rec: MigrationRecord, outcome: MigrationOutcome,
             reason: str) -> MigrationRecord:
        rec.outcome, rec.reason, rec.finished_at = outcome, reason, self.clock()
        if outcome is not MigrationOutcome.COMMITTED:
            log.info("migration of %s from %d to %d ended %s: %s", rec.request_id, rec.src,
                     rec.dst, outcome.value, reason)
        self.decisions.append((self.iterations, "migration_end", rec.request_id, rec.dst,
                               outcome.value))
        self.migration_history.append(rec)
        self.counters[f"migrations_{'committed' if outcome is MigrationOutcome.COMMITTED else 'aborted'}"] += 1  # noqa: E501
        self.counters["migration_bytes"] += rec.bytes_moved
        return rec
