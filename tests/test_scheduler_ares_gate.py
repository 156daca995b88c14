"""ARES's balancing gate and dispatch fallback, on cases small enough to compute by hand."""

from __future__ import annotations

import dataclasses

import pytest
from test_scheduler_policies import KV_COST, PAGE, pending, replica, req

from ares_jax.scheduler import (
    AresConfig,
    ClusterSnapshot,
    PolicyState,
    ReplicaView,
    TransferCost,
    make_policy,
)

ONE_MS_STALL = TransferCost(kv_bytes_per_token=1, link_gbytes_per_s=1e3, stall_ms=1.0)


# Every gate off (the first version), so that each test turns on the one it checks.
UNGATED = AresConfig(memory_target=1.0, horizon_steps=8192, memory_horizon_steps=8192,
                     net_gain=False, balance_noise_z=0.0, scale_migrations_with_gap=False,
                     dispatch_min_gain=0.0, dispatch_fallback_min_replicas=2,
                     oom_delay_steps=0)


def ares(**overrides: object) -> object:
    cfg = dataclasses.replace(UNGATED, **overrides)
    return make_policy("ares", cost=KV_COST, transfer=ONE_MS_STALL, ares=cfg)


def _three_and_one() -> ClusterSnapshot:
    big = 100_000
    return ClusterSnapshot.from_views(
        0.0,
        [replica(0, tuple(req(f"s{i}", 1000, 3000.0) for i in range(3)), capacity=big),
         replica(1, (req("d", 1000, 3000.0),), capacity=big)],
    )


def test_net_gain_charges_the_destination() -> None:
    # step = KV. Samples at t = 0, 1024, 2048 see everyone alive (rem 3000), 1024 steps apart.
    # Per sample, sum B * step: source 3 * 3(1000+t) -> 2 * 2(1000+t), destination
    # 1 * (1000+t) -> 2 * 2(1000+t): the cluster saves 2(1000+t), 12,144 * 1024 = 12.4M in all.
    # The source-only count: (6072 - 4048) * (3000 own + 6000 others) = 18.2M.
    one = {"max_migrations_per_round": 1, "recoup_factor": 15e6}  # 15M x (1 ms stall + ~0)
    snap = _three_and_one()
    assert len(ares(**one).reschedule(snap, PolicyState())[0].migrations) == 1
    assert ares(**one, net_gain=True).reschedule(snap, PolicyState())[0].migrations == ()
    lower = one | {"recoup_factor": 12e6}
    assert len(ares(**lower, net_gain=True).reschedule(snap, PolicyState())[0].migrations) == 1


def test_noise_gate_needs_the_worst_replica_to_stand_out() -> None:
    # Two replicas: worst - median is half the gap, sigma = 1.4826 x half the gap: 0.67 sigma.
    snap = _three_and_one()
    two = {"balance_noise_min_replicas": 2}
    assert ares(balance_noise_z=3.0, **two).reschedule(snap, PolicyState())[0].migrations == ()
    assert len(ares(balance_noise_z=0.5, **two).reschedule(snap, PolicyState())[0]
               .migrations) >= 1
    # Below the minimum replica count the gate is off.
    assert len(ares(balance_noise_z=3.0).reschedule(snap, PolicyState())[0].migrations) >= 1


def test_migrations_per_round_scale_with_the_gap() -> None:
    snap = ClusterSnapshot.from_views(
        0.0,
        [replica(0, tuple(req(f"s{i}", 1000, 3000.0) for i in range(8)), capacity=100_000),
         replica(1, capacity=100_000)],
    )
    full = ares(max_migrations_per_round=2).reschedule(snap, PolicyState())[0]
    assert len(full.migrations) == 2
    # gap 8x the threshold: still the full bound; a threshold just under the gap allows 1.
    scaled = ares(max_migrations_per_round=2, scale_migrations_with_gap=True)
    assert len(scaled.reschedule(snap, PolicyState())[0].migrations) == 2
    tight = ares(max_migrations_per_round=2, scale_migrations_with_gap=True,
                 balance_threshold=0.0, balance_threshold_ms=0.99 * 8 * 2024)
    assert len(tight.reschedule(snap, PolicyState())[0].migrations) == 1


def test_dispatch_falls_back_to_least_load_when_prediction_gains_nothing() -> None:
    # Same running load on both; replica 0 also has a queued request. The forecast ignores the
    # queue (equal TPOT: ARES takes the first), least-load avoids it.
    queued = ReplicaView(replica_id=0, role="decode", kv_capacity_tokens=10_000, page_size=PAGE,
                         running=(req("a", 500, 1000.0),), queued=(req("q", 100),))
    snap = ClusterSnapshot.from_views(
        0.0, [queued, replica(1, (req("b", 500, 1000.0),))], [pending("new", 100, 1000.0)]
    )
    assert ares().dispatch(snap, PolicyState())[0].dispatch_map() == {"new": 0}
    fallback = ares(dispatch_min_gain=0.02, dispatch_fallback="least-load")
    assert fallback.dispatch(snap, PolicyState())[0].dispatch_map() == {"new": 1}
    via_llumnix = ares(dispatch_min_gain=0.02, dispatch_fallback="llumnix")
    assert via_llumnix.dispatch(snap, PolicyState())[0].dispatch_map() == {"new": 1}
    few = ares(dispatch_min_gain=0.02, dispatch_fallback_min_replicas=3)
    assert few.dispatch(snap, PolicyState())[0].dispatch_map() == {"new": 0}
    with pytest.raises(ValueError, match="dispatch_fallback"):
        ares(dispatch_min_gain=0.02, dispatch_fallback="static").dispatch(snap, PolicyState())


def test_overflow_delay_moves_out_of_the_replica_that_fills_first() -> None:
    # Both replicas' predicted peaks pass capacity (10,000), so the OOM guard has nowhere to
    # move anything. Replica 0 (8,000 + 2t) fills at step 1,000, replica 1 (2,500 + t) at
    # 7,500. Moving A gives 0: 4,000 + t (never full before B finishes at 5,000) and
    # 1: 6,500 + 2t (full at 1,750): the first OOM moves from step 1,000 to 1,750.
    snap = ClusterSnapshot.from_views(
        0.0,
        [replica(0, (req("A", 4000, 5000.0), req("B", 4000, 5000.0))),
         replica(1, (req("C", 2500, 8000.0),))],
    )
    quiet = {"balance_threshold_ms": 1e12}
    moves = ares(**quiet, oom_delay_steps=2000).reschedule(snap, PolicyState())[0].migrations
    assert [(m.request_id, m.src, m.dst) for m in moves] == [("A", 0, 1)]
    # Off, or the fill is further away than the setting: nothing moves.
    assert ares(**quiet, oom_delay_steps=0).reschedule(snap, PolicyState())[0].migrations == ()
    assert ares(**quiet, oom_delay_steps=900).reschedule(snap, PolicyState())[0].migrations == ()


def test_overflow_delay_never_brings_the_first_oom_forward() -> None:
    # Replica 1 (5,100 + t) fills at 4,900; taking A or B (4,000 + t more) it would fill at
    # 450, before replica 0's 1,000: no move.
    snap = ClusterSnapshot.from_views(
        0.0,
        [replica(0, (req("A", 4000, 5000.0), req("B", 4000, 5000.0))),
         replica(1, (req("C", 5100, 5000.0),))],
    )
    policy = ares(balance_threshold_ms=1e12, oom_delay_steps=2000)
    assert policy.reschedule(snap, PolicyState())[0].migrations == ()

