"""What is observed of a running simulation: the snapshots the policies read, the load timeline,
and the result (per-request times and counters), as a mixin of the simulator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ares_jax.scheduler.ares import estimate_remaining
from ares_jax.scheduler.load import coefficient_of_variation, forecast
from ares_jax.scheduler.state import ClusterSnapshot, PendingDispatch, RequestTable
from ares_jax.sim.migration import SAMPLE


@dataclass(frozen=True, kw_only=True, eq=False)
class Timeline:
    times_s: np.ndarray  # [T]
    kv_fraction: np.ndarray  # [T, D] used pages / capacity
    predicted_tpot_ms: np.ndarray  # [T, D] the load model's TPOT per replica
    tpot_cv: np.ndarray  # [T] coefficient of variation across replicas


@dataclass(frozen=True, kw_only=True, eq=False)
class SimResult:
    policy: str
    workload: str
    num_decode_replicas: int
    num_gpus: int
    kv_capacity_tokens: int
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    finish_count: np.ndarray  # how many times each request finished (must be all ones)
    preemptions_per_request: np.ndarray
    migrations_per_request: np.ndarray
    counters: dict[str, float]
    timeline: Timeline
    wall_s: float


def timeline_from_samples(
    samples: list[tuple[float, np.ndarray, np.ndarray]], num_replicas: int
) -> Timeline:
    """``samples``: (time, KV fraction per replica, predicted TPOT per replica) per tick."""
    t, d = len(samples), num_replicas
    tpot = np.array([s[2] for s in samples]).reshape(t, d)
    return Timeline(
        times_s=np.array([s[0] for s in samples]),
        kv_fraction=np.array([s[1] for s in samples]).reshape(t, d),
        predicted_tpot_ms=tpot,
        tpot_cv=np.array([coefficient_of_variation(row) for row in tpot]),
    )


class ObserverMixin:
    """Snapshots for the policies, timeline samples and the final result of ``Simulator``.

    The state read here (replicas, per-request arrays, counters, samples) is ``Simulator``'s;
    see its ``__init__``.
    """

    def _snapshot(
        self, pending: tuple[PendingDispatch, ...], *, with_table: bool
    ) -> ClusterSnapshot:
        reps = self.decode
        steps = np.fromiter((r.steps for r in reps), np.int64, len(reps))
        table = None
        if with_table:
            rows = np.flatnonzero(self.rep_of >= 0)
            rep = self.rep_of[rows]
            at = steps[rep]
            gen = self.gen_off[rows] + at
            out = self.output[rows]
            max_tokens = self.max_tokens[rows]
            table = RequestTable(
                request_ids=rows,
                replica=rep,
                generated_tokens=gen,
                kv_tokens=self.kv_off[rows] + at,
                max_tokens=max_tokens,
                predicted_remaining=self.predictor.predict(rows, gen, out, max_tokens),
                true_remaining=np.subtract(out, gen, dtype=np.float64),
                migrating=self.migrating[rows],
                last_migrated_at=self.last_migrated[rows],
            )
        count = len(reps)
        return ClusterSnapshot(
            now=self.now,
            replica_ids=np.arange(count, dtype=np.int64),
            page_size=self.page,
            kv_capacity_tokens=np.full(count, self.capacity_pages * self.page, np.int64),
            used_tokens=np.fromiter((r.used_pages for r in reps), np.int64, count) * self.page,
            running_kv_tokens=np.fromiter((r.running_kv() for r in reps), np.int64, count),
            batch_size=np.fromiter((len(r.running) for r in reps), np.int64, count),
            queued_kv_tokens=np.fromiter((r.queued_kv for r in reps), np.int64, count),
            queued_count=np.fromiter((len(r.queue) for r in reps), np.int64, count),
            requests=table,
            pending=pending,
        )

    def _sample(self) -> None:
        snap = self._snapshot((), with_table=True)
        table = snap.table()
        ares = self.cfg.ares
        fc = forecast(
            table.kv_tokens, estimate_remaining(table, ares), table.replica, snap.num_replicas,
            self.cost, horizon_steps=ares.horizon_steps, samples=ares.samples,
        )
        kv_fraction = snap.used_tokens / np.maximum(snap.kv_capacity_tokens, 1)
        self.samples.append((self.now, kv_fraction, fc.tpot_ms))
        if self.finished < len(self.arrival_list):
            self._push(self.now + self.cfg.sample_period_s, SAMPLE)

    def _result(self, wall_s: float) -> SimResult:
        d = len(self.decode)
        timeline = timeline_from_samples(self.samples, d)
        c = self.cfg.cluster
        return SimResult(
            policy=self.policy.name,
            workload=self.workload.name,
            num_decode_replicas=d,
            num_gpus=(c.prefill_replicas + c.decode_replicas) * c.tp,
            kv_capacity_tokens=self.capacity_pages * self.page,
            arrival_s=self.arrival,
            prompt_tokens=self.prompt,
            output_tokens=self.output,
            first_token_s=self.first_token,
            finish_s=self.finish,
            finish_count=self.finish_count,
            preemptions_per_request=self.req_preemptions,
            migrations_per_request=self.req_migrations,
            counters=dict(self.counters),
            timeline=timeline,
            wall_s=wall_s,
        )
