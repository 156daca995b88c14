"""Simulator invariants: conservation, determinism, memory safety, migration accounting."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import pytest

from ares_jax.scheduler import (
    ClusterSnapshot,
    Decisions,
    LinearStepCost,
    Migration,
    PolicyState,
    StaticPolicy,
)
from ares_jax.sim.config import SimClusterConfig, SimConfig
from ares_jax.sim.metrics import compare_to_baselines, summarize, tpot_ms
from ares_jax.sim.simulator import Simulator, simulate
from ares_jax.sim.workloads import Workload

# Linear costs need no data files: these tests run without ../shared/data.
COST = LinearStepCost(a=6.31, b=0.0129, c=4.12e-5, prefill_tokens=(128.0, 16384.0),
                      prefill_times_ms=(7.6, 440.0))


def synthetic(n: int = 300, seed: int = 1, rate: float = 20.0, long: bool = False) -> Workload:
    rng = np.random.default_rng(seed)
    out = rng.lognormal(7.5 if long else 5.5, 1.0, n).astype(np.int64) + 1
    return Workload(
        name="synthetic",
        arrival_s=np.cumsum(rng.exponential(1.0 / rate, n)),
        prompt_tokens=rng.integers(16, 2000, n),
        output_tokens=np.minimum(out, 8000),
        max_tokens=8192,
    )


def config(decode: int = 4, scale: float = 1.0, **cluster: float) -> SimConfig:
    return SimConfig(cluster=SimClusterConfig(decode_replicas=decode, prefill_replicas=1,
                                           kv_capacity_scale=scale, **cluster))


def run(workload: Workload, policy, cfg: SimConfig) -> Simulator:  # noqa: ANN001
    sim = Simulator(workload, policy, cfg, cost=COST)
    sim.result = sim.run()
    return sim


def assert_conserved(sim: Simulator) -> None:
    result = sim.result
    assert (result.finish_count == 1).all(), "every request finishes exactly once"
    # Each decode step emits one token per running request; the prefill emits the first.
    assert result.counters["decode_tokens"] == int((result.output_tokens - 1).sum())
    for rep in sim.decode:  # every page came back: no KV created or lost
        assert rep.used_pages == 0 and rep.reserved_pages == 0 and not rep.running
    assert not sim.active
    assert np.all(result.finish_s >= result.first_token_s)
    assert np.all(result.first_token_s >= result.arrival_s)


@pytest.mark.parametrize("policy", ["static", "least-load", "llumnix", "ares", "ares-oracle"])
def test_every_policy_conserves_requests_and_kv(policy: str) -> None:
    cfg = config(scale=0.02)  # ~9k tokens per replica: preemptions and migrations happen
    result = simulate(synthetic(long=True), policy, cfg, cost=COST)
    assert (result.finish_count == 1).all()
    assert result.counters["decode_tokens"] == int((result.output_tokens - 1).sum())
    assert result.counters["preemptions"] > 0


def test_conservation_with_internal_state_checks() -> None:
    sim = run(synthetic(long=True), StaticPolicy(), config(scale=0.02))
    assert_conserved(sim)


def test_same_seed_same_run() -> None:
    w = synthetic(200)
    # The seed moves the predictions; they decide placements when ARES's own score is used.
    cfg = config()
    cfg = dataclasses.replace(cfg, ares=dataclasses.replace(cfg.ares, dispatch_min_gain=0.0))
    a = simulate(w, "ares", cfg, cost=COST)
    b = simulate(w, "ares", cfg, cost=COST)
    np.testing.assert_array_equal(a.finish_s, b.finish_s)
    assert a.counters == b.counters
    c = simulate(w, "ares", dataclasses.replace(cfg, seed=7), cost=COST)
    assert not np.array_equal(a.finish_s, c.finish_s) or a.counters != c.counters


def test_tight_memory_preempts_and_never_overcommits() -> None:
    cfg = config(decode=2, scale=0.01)
    sim = run(synthetic(150, long=True, rate=50.0), StaticPolicy(), cfg)
    result = sim.result
    assert result.counters["oom_events"] > 0
    assert result.counters["preemptions"] >= result.counters["oom_events"]
    assert result.preemptions_per_request.sum() == result.counters["preemptions"]
    assert result.counters["clipped_requests"] > 0  # some requests exceed a whole replica
    assert (result.prompt_tokens + result.output_tokens <= result.kv_capacity_tokens).all()
    assert_conserved(sim)


def test_roomy_memory_has_no_preemption() -> None:
    result = simulate(synthetic(100), "static", config(), cost=COST)
    assert result.counters["preemptions"] == 0 and result.counters["oom_events"] == 0


class ShuffleEverything:
    """Test policy: round-robin dispatch, and every round each replica sends one running
    request to the next replica (exercises staged migration heavily, aborts included)."""

    name = "shuffle"
    needs_request_table: ClassVar[bool] = False
    migrates: ClassVar[bool] = True

    def dispatch(self, snapshot: ClusterSnapshot, state: PolicyState):  # noqa: ANN201
        return StaticPolicy().dispatch(snapshot, state)

    def reschedule(self, snapshot: ClusterSnapshot, state: PolicyState):  # noqa: ANN201
        table = snapshot.table()
        moves = []
        for pos in range(snapshot.num_replicas):
            rows = np.flatnonzero((table.replica == pos) & ~table.migrating)
            if rows.size:
                dst = int(snapshot.replica_ids[(pos + 1) % snapshot.num_replicas])
                moves.append(Migration(request_id=table.id_at(int(rows[0])),
                                       src=int(snapshot.replica_ids[pos]), dst=dst))
        return Decisions(migrations=tuple(moves)), state


def test_migration_accounting() -> None:
    cfg = dataclasses.replace(config(scale=0.05, link_gbytes_per_s=0.5), reschedule_period_s=0.1)
    sim = run(synthetic(200, long=True), ShuffleEverything(), cfg)
    c = sim.result.counters
    assert c["migrations_completed"] > 20
    assert c["migrations_started"] == (c["migrations_completed"] + c["migrations_aborted"])
    # The stages copy each page once: bytes moved = pages that arrived x bytes per page.
    assert c["bytes_moved_completed"] == c["migrated_pages"] * sim.page * sim.kv_bytes
    assert sim.result.migrations_per_request.sum() == c["migrations_completed"]
    assert_conserved(sim)


def test_summary_fields() -> None:
    cfg = config()
    result = simulate(synthetic(100), "least-load", cfg, cost=COST)
    s = summarize(result, cfg.slo)
    assert s["requests"] == 100 and 0.0 <= s["slo_attainment"] <= 1.0
    assert s["tpot_ms_p50"] <= s["tpot_ms_p90"] <= s["tpot_ms_p99"]
    assert s["tpot_ms_p50"] >= COST.a  # a step can be no faster than the fixed cost
    single = np.isnan(tpot_ms(result))
    assert np.array_equal(single, result.output_tokens == 1)
    assert result.timeline.kv_fraction.shape[1] == 4


class RecordingSimulator(Simulator):
    """Records the KV of every preemption victim and every prefill batch's tokens."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.victim_kv: list[int] = []
        self.prefilled: list[int] = []

    def _preempt(self, rep, r: int) -> None:  # noqa: ANN001
        self.victim_kv.append(int(self.kv_off[r]) + rep.steps)
        super()._preempt(rep, r)

    def _start_prefill(self, p) -> None:  # noqa: ANN001
        before = list(p.batch)
        super()._start_prefill(p)
        self.prefilled.extend(r for r in p.batch if r not in before)


@pytest.mark.parametrize("policy", [StaticPolicy(), ShuffleEverything()], ids=["static", "shuffle"])
def test_local_preemption_recomputes_on_the_decode_replica(policy) -> None:  # noqa: ANN001
    w = synthetic(long=True)
    cfg = dataclasses.replace(config(scale=0.02, preemption="local"), reschedule_period_s=0.2)
    sim = RecordingSimulator(w, policy, cfg, cost=COST)
    sim.result = sim.run()
    c = sim.result.counters
    assert c["preemptions"] > 0 and len(sim.victim_kv) == c["preemptions"]
    # Every victim's KV was recomputed where it ran, none of it on a prefill replica.
    assert c["recomputed_tokens_local"] == sum(sim.victim_kv)
    assert sorted(sim.prefilled) == list(range(len(w)))
    assert_conserved(sim)
    # Same run with prefill-side recompute: victims go back through a prefill replica.
    back = RecordingSimulator(w, policy, dataclasses.replace(
        cfg, cluster=dataclasses.replace(cfg.cluster, preemption="prefill")), cost=COST)
    back.result = back.run()
    assert back.result.counters["recomputed_tokens_local"] == 0
    assert len(back.prefilled) == len(w) + back.result.counters["preemptions"]


def test_unknown_preemption_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="cluster.preemption"):
        SimClusterConfig(preemption="swap")


def test_compare_to_baselines_by_hand() -> None:
    rows = [{"case": c, "variant": v, "p99": x} for c, v, x in (
        ("a", "ll", 10.0), ("a", "lx", 20.0), ("a", "new", 5.0),
        ("b", "ll", 40.0), ("b", "lx", 30.0), ("b", "new", 60.0),
        ("c", "ll", 1.0))]  # case c lacks a baseline: skipped
    out = compare_to_baselines(rows, ["ll", "lx", "new"], ["ll", "lx"], metric="p99")
    # new: 5/10 and 60/30 -> sqrt(0.5 * 2) = 1; ll: 10/10, 40/30; lx: 20/10, 30/30.
    assert out["new"] == {"geomean_ratio": pytest.approx(1.0), "cases_below_1": 1, "cases": 2}
    assert out["ll"]["geomean_ratio"] == pytest.approx((4 / 3) ** 0.5)
    assert out["lx"]["geomean_ratio"] == pytest.approx(2 ** 0.5)
    assert out["ll"]["cases_below_1"] == out["lx"]["cases_below_1"] == 0
