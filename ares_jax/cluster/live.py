"""The live scheduler loop of the in-process cluster.

It is the serving loop with two additions, both decided by a pure policy from
``ares_jax.scheduler`` over a snapshot of the real engines:
- dispatch: which decode replica takes each prefilled request;
- rescheduling: every ``reschedule_every`` iterations, which running requests to migrate.
Migrations are carried out in stages by ``MigrationManager`` between decode steps.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence

import numpy as np

from ares_jax.cluster.config import ClusterConfig
from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.loop import ServingLoop, least_loaded
from ares_jax.engine.outputs import StreamChunk
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.types import PrefillResult
from ares_jax.model.tokenizer import Tokenizer
from ares_jax.scheduler import (
    ClusterSnapshot,
    LinearStepCost,
    PendingDispatch,
    PolicyState,
    ReplicaView,
    RequestView,
    TransferCost,
    make_policy,
)
from ares_jax.transfer.migration import MigrationManager, MigrationOutcome


class ClusterLoop(ServingLoop):
    def __init__(self, prefill: PrefillEngine, decoders: Sequence[DecodeEngine],
                 tokenizer: Tokenizer | None, cluster: ClusterConfig) -> None:
        super().__init__(prefill, decoders, tokenizer, dispatch=self._dispatch)
        self.cluster = cluster
        a, b, c = cluster.step_cost_abc
        self.cost = LinearStepCost(a=a, b=b, c=c)
        self.transfer_cost = TransferCost(kv_bytes_per_token=prefill.cfg.kv_bytes_per_token,
                                          link_gbytes_per_s=cluster.link_gbytes_per_s)
        self.policy = self._make_policy(cluster.policy)
        self.dispatch_policy = self._make_policy(cluster.dispatch_policy or cluster.policy)
        self.policy_state = PolicyState()
        self.migrations = MigrationManager(self.decoders, cluster.migration)
        self.last_migrated: dict[str, float] = {}
        self.iterations = 0
        self.fallback_dispatches = 0
        # (batch, kv_tokens, ms) per replica step, for the online cost refit.
        self.step_samples: collections.deque[tuple[int, int, float]] = \
            collections.deque(maxlen=512)
        # Per request: seconds of its replica's step time per token, plus migration stalls.
        self.replica_time: dict[str, float] = collections.defaultdict(float)
        self.on_step.append(self._record_step)

    def _make_policy(self, name: str):
        return make_policy(name, cost=self.cost, transfer=self.transfer_cost,
                           ares=self.cluster.ares)

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, pending: Sequence[PendingDispatch] = ()) -> ClusterSnapshot:
        now = time.perf_counter()
        replicas = []
        for i, engine in enumerate(self.decoders):
            running = []
            for rid, st in engine.slots.items():
                tracker = self.trackers.get(rid)
                pred = tracker.predicted_remaining if tracker is not None else None
                running.append(RequestView(
                    request_id=rid, prompt_tokens=len(st.request.prompt_ids),
                    generated_tokens=st.generated, kv_tokens=st.num_cached,
                    max_tokens=st.request.params.max_tokens, predicted_remaining=pred,
                    migrating=self.migrations.is_migrating(rid),
                    last_migrated_at=self.last_migrated.get(rid)))
            reserved = sum(len(engine.allocator.pages(rid))
                           for rid in engine.allocator.owners() if rid not in engine.slots)
            replicas.append(ReplicaView(
                replica_id=i, role="decode",
                kv_capacity_tokens=engine.allocator.capacity * engine.page_size,
                page_size=engine.page_size, running=tuple(running),
                reserved_kv_tokens=reserved * engine.page_size))
        return ClusterSnapshot.from_views(now, replicas, pending)

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, result: PrefillResult, engines: Sequence[DecodeEngine]) -> int | None:
        req = result.request
        pending = PendingDispatch(
            request_id=req.request_id, kv_tokens=result.num_tokens,
            generated_tokens=len(req.resumed_ids) + 1, max_tokens=req.params.max_tokens,
            predicted_remaining=result.predicted_remaining)
        decisions, self.policy_state = self.dispatch_policy.dispatch(
            self.snapshot([pending]), self.policy_state)
        target = decisions.dispatch_map().get(req.request_id)
        if target is not None and engines[target].can_admit(result.num_tokens):
            return int(target)
        # The policy chose a replica that cannot take it right now (e.g. static round-robin
        # onto a full replica): place it where it fits rather than drop or stall it.
        self.fallback_dispatches += 1
        return least_loaded(result, engines)

    # ------------------------------------------------------------------ the loop

    def step(self) -> list[StreamChunk]:
        events = super().step()
        self.iterations += 1
        for rec in self.migrations.advance():
            if rec.outcome is MigrationOutcome.COMMITTED:
                self.location[rec.request_id] = rec.dst
                self.last_migrated[rec.request_id] = time.perf_counter()
                self.replica_time[rec.request_id] += (rec.adopted_at or 0) - \
                    (rec.detached_at or 0)
        if self.policy.migrates and self.iterations % self.cluster.reschedule_every == 0:
            self._reschedule()
        if len(self.step_samples) >= self.cluster.refit_after_steps and \
                self.iterations % self.cluster.refit_after_steps == 0:
            self._refit_cost()
        return events

    def _reschedule(self) -> None:
        decisions, self.policy_state = self.policy.reschedule(self.snapshot(), self.policy_state)
        for m in decisions.migrations:
            rid = str(m.request_id)
            if self.migrations.is_migrating(rid) or self.location.get(rid) != m.src:
                continue
            self.migrations.start(rid, int(m.src), int(m.dst))

    def _record_step(self, idx: int, out) -> None:
        engine = self.decoders[idx]
        elapsed = self.last_step_seconds[idx]
        kv = sum(st.num_cached for st in engine.slots.values())
        self.step_samples.append((len(out.request_ids), kv, elapsed * 1e3))
        for rid in out.request_ids:
            self.replica_time[rid] += elapsed

    def _refit_cost(self) -> None:
        rows = np.asarray(self.step_samples)
        if np.ptp(rows[:, 0]) == 0 or np.ptp(rows[:, 1]) == 0:
            return  # a degenerate design matrix: keep the current fit
        fit = LinearStepCost.fit_linear(rows)
        if fit.a > 0 and fit.b >= 0 and fit.c >= 0:
            self.cost = fit
            self.policy = self._make_policy(self.cluster.policy)
            self.dispatch_policy = self._make_policy(
                self.cluster.dispatch_policy or self.cluster.policy)

    def _retire(self, rid: str, abort: bool = False) -> None:
        self.migrations.abort(rid, "the request finished")
        super()._retire(rid, abort)

    def check_no_leaks(self) -> None:
        for d in self.decoders:
            owners = set(d.allocator.owners())
            stray = owners - set(d.slots) - set(self.migrations.active)
            if stray:
                raise AssertionError(f"pages held by requests that are not running: {stray}")

    def stats(self) -> dict[str, float | int]:
        hist = self.migrations.history
        done = [r for r in hist if r.outcome is MigrationOutcome.COMMITTED]
        return {
            "migrations_committed": len(done),
            "migrations_aborted": len(hist) - len(done),
            "migration_bytes": int(sum(r.bytes_moved for r in hist)),
            "fallback_dispatches": self.fallback_dispatches,
        }
