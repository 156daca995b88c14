"""Each policy on snapshots small enough to compute by hand."""

from __future__ import annotations

import dataclasses

import numpy as np

from ares_jax.scheduler import (
    AresConfig,
    ClusterSnapshot,
    LinearStepCost,
    PendingDispatch,
    PolicyState,
    ReplicaView,
    RequestView,
    TransferCost,
    make_policy,
)

PAGE = 16
KV_COST = LinearStepCost(a=0.0, b=0.0, c=1.0)  # step time proportional to KV: easy to reason
FAST_LINK = TransferCost(kv_bytes_per_token=1, link_gbytes_per_s=1e3, stall_ms=0.0)


def req(rid: str, kv: int, rem: float | None = None, *, true: int | None = None,
        max_tokens: int = 100_000, migrated_at: float | None = None) -> RequestView:
    return RequestView(request_id=rid, prompt_tokens=kv, generated_tokens=1, kv_tokens=kv,
                       max_tokens=max_tokens, predicted_remaining=rem, true_remaining=true,
                       last_migrated_at=migrated_at)


def replica(rid: int, running: tuple[RequestView, ...] = (), capacity: int = 10_000,
            reserved: int = 0) -> ReplicaView:
    return ReplicaView(replica_id=rid, role="decode", kv_capacity_tokens=capacity,
                       page_size=PAGE, running=running, reserved_kv_tokens=reserved)


def pending(rid: str, kv: int, rem: float | None = None, true: int | None = None
            ) -> PendingDispatch:
    return PendingDispatch(request_id=rid, kv_tokens=kv, generated_tokens=1, max_tokens=100_000,
                           predicted_remaining=rem, true_remaining=true)


def ares(**overrides: float) -> object:
    cfg = dataclasses.replace(
        AresConfig(memory_target=1.0, horizon_steps=8192, memory_horizon_steps=8192), **overrides
    )
    return make_policy("ares", cost=KV_COST, transfer=FAST_LINK, ares=cfg)


def test_snapshot_from_views_aggregates() -> None:
    snap = ClusterSnapshot.from_views(
        1.0,
        [replica(7, (req("a", 20), req("b", 16)), reserved=32),
         ReplicaView(replica_id=9, role="prefill", kv_capacity_tokens=1, page_size=PAGE)],
    )
    assert snap.num_replicas == 1 and snap.replica_ids.tolist() == [7]
    assert snap.running_kv_tokens.tolist() == [36]
    assert snap.used_tokens.tolist() == [32 + 16 + 32]  # 20 tokens use 2 pages
    assert snap.table().id_at(1) == "b"


def test_static_round_robin_carries_its_cursor() -> None:
    snap = ClusterSnapshot.from_views(0.0, [replica(i) for i in (10, 11, 12)],
                                      [pending(f"r{i}", 10) for i in range(4)])
    policy = make_policy("static", cost=KV_COST, transfer=FAST_LINK)
    decisions, state = policy.dispatch(snap, PolicyState(round_robin_next=2))
    assert [d.replica_id for d in decisions.dispatches] == [12, 10, 11, 12]
    assert state.round_robin_next == 0
    assert policy.reschedule(snap, state)[0].migrations == ()


def test_least_load_counts_what_it_just_placed() -> None:
    snap = ClusterSnapshot.from_views(
        0.0,
        [replica(0, (req("x", 160),)), replica(1, (req("y", 48),)), replica(2, (req("z", 80),))],
        [pending("p", 40), pending("q", 40)],
    )
    policy = make_policy("least-load", cost=KV_COST, transfer=FAST_LINK)
    decisions, _ = policy.dispatch(snap, PolicyState())
    # p -> replica 1 (48 used), which then holds 48 + 48 = 96 > 80, so q -> replica 2.
    assert decisions.dispatch_map() == {"p": 1, "q": 2}


def test_llumnix_dispatches_on_freeness() -> None:
    cap = 100 * PAGE
    snap = ClusterSnapshot.from_views(
        0.0,
        [replica(0, tuple(req(f"a{i}", 10 * PAGE) for i in range(5)), capacity=cap),  # 50/5=10
         replica(1, (req("b", 80 * PAGE),), capacity=cap),  # 20 free / 1 = 20
         replica(2, tuple(req(f"c{i}", 2 * PAGE) for i in range(10)), capacity=cap)],  # 8
        [pending("p", PAGE), pending("q", PAGE)],
    )
    decisions, _ = make_policy("llumnix", cost=KV_COST, transfer=FAST_LINK).dispatch(
        snap, PolicyState())
    # p -> 1 (freeness 20), leaving it 19 / 2 = 9.5 < 10, so q -> 0.
    assert decisions.dispatch_map() == {"p": 1, "q": 0}


def test_llumnix_migrates_shortest_request_only_if_gap_shrinks() -> None:
    cap = 100 * PAGE
    busy = replica(0, (req("big", 60 * PAGE), req("small", 2 * PAGE), req("mid", 10 * PAGE),
                       req("m2", 26 * PAGE)), capacity=cap)  # 2 free blocks / 4 = 0.5 < 3
    idle = replica(1, (req("z", 40 * PAGE), req("w", 0 * PAGE + 1)), capacity=cap)
    policy = make_policy("llumnix", cost=KV_COST, transfer=FAST_LINK)
    decisions, _ = policy.reschedule(ClusterSnapshot.from_views(0.0, [busy, idle]), PolicyState())
    assert [(m.request_id, m.src, m.dst) for m in decisions.migrations] == [("small", 0, 1)]
    # One huge request: moving it would swap the imbalance and widen the gap, so it stays.
    lone = replica(0, (req("huge", 98 * PAGE),), capacity=cap)  # freeness 2
    roomy = replica(1, (req("r", 90 * PAGE),), capacity=cap)  # freeness 10
    decisions, _ = policy.reschedule(ClusterSnapshot.from_views(0.0, [lone, roomy]), PolicyState())
    assert decisions.migrations == ()


def _memory_trap(pred_rem: float = 4000.0) -> ClusterSnapshot:
    """Replica 0 holds little KV now but one request that will grow; replica 1 holds more KV
    that is about to finish. A new request (1000 KV, 4000 remaining) overflows replica 0 at
    step 4000: (2000 + 4000) + (1000 + 4000) = 11000 > 10000, and fits replica 1."""
    return ClusterSnapshot.from_views(
        0.0,
        [replica(0, (req("grow", 2000, 7000.0, true=7000),)),
         replica(1, (req("s1", 2500, 10.0, true=10), req("s2", 2496, 10.0, true=10)))],
        [pending("new", 1000, pred_rem, true=4000)],
    )


def test_ares_dispatch_puts_memory_first() -> None:
    snap = _memory_trap()
    least, _ = make_policy("least-load", cost=KV_COST, transfer=FAST_LINK).dispatch(
        snap, PolicyState())
    assert least.dispatch_map() == {"new": 0}  # current load is misleading
    decisions, _ = ares().dispatch(snap, PolicyState())
    assert decisions.dispatch_map() == {"new": 1}


def test_ares_oracle_reads_true_lengths() -> None:
    # The prediction says the new request is short (fits replica 0 and is cheaper there);
    # the truth (4000 remaining) overflows replica 0.
    snap = _memory_trap(pred_rem=100.0)
    decisions, _ = ares().dispatch(snap, PolicyState())
    assert decisions.dispatch_map() == {"new": 0}
    oracle_cfg = AresConfig(memory_target=1.0, horizon_steps=8192, memory_horizon_steps=8192)
    oracle = make_policy("ares-oracle", cost=KV_COST, transfer=FAST_LINK, ares=oracle_cfg)
    assert oracle.dispatch(snap, PolicyState())[0].dispatch_map() == {"new": 1}


def test_ares_dispatch_prefers_lower_predicted_tpot_when_all_fit() -> None:
    snap = ClusterSnapshot.from_views(
        0.0,
        [replica(0, (req("a", 500, 1000.0),)), replica(1, (req("b", 500, 10.0),))],
        [pending("new", 100, 1000.0)],
    )
    # Same KV now, but replica 1's request leaves after 10 steps: lower predicted TPOT.
    fine = ares(horizon_steps=1000, samples=11)  # samples every 100 steps
    assert fine.dispatch(snap, PolicyState())[0].dispatch_map() == {"new": 1}


def _overflowing(migrated_at: float | None = None) -> ClusterSnapshot:
    # Replica 0's peak: just before step 4000, A (3000 + 4000) + C (1000 + 4000) = 12000 > 10000.
    return ClusterSnapshot.from_views(
        100.0,
        [replica(0, (req("A", 3000, 5000.0, migrated_at=migrated_at), req("B", 3000, 100.0),
                     req("C", 1000, 4000.0))),
         replica(1)],
    )


def test_ares_oom_guard_moves_the_longest_request_alive_at_the_peak() -> None:
    no_balancing = {"balance_threshold_ms": 1e12}
    decisions, _ = ares(**no_balancing).reschedule(_overflowing(), PolicyState())
    assert [(m.request_id, m.src, m.dst) for m in decisions.migrations] == [("A", 0, 1)]
    # A migrated 5 s ago and is cooling down (10 s): C goes instead (B is gone before the peak).
    decisions, _ = ares(**no_balancing).reschedule(_overflowing(95.0), PolicyState())
    assert [m.request_id for m in decisions.migrations] == ["C"]


def test_ares_balancing_respects_the_transfer_cost_gate() -> None:
    heavy = replica(0, tuple(req(f"r{i}", 2000, 3000.0) for i in range(4)), capacity=100_000)
    snap = ClusterSnapshot.from_views(0.0, [heavy, replica(1, capacity=100_000)])
    decisions, _ = ares(max_migrations_per_round=1).reschedule(snap, PolicyState())
    assert len(decisions.migrations) == 1 and decisions.migrations[0].dst == 1
    slow_link = TransferCost(kv_bytes_per_token=10**12, link_gbytes_per_s=1.0, stall_ms=0.0)
    slow = make_policy("ares", cost=KV_COST, transfer=slow_link,
                       ares=AresConfig(memory_target=1.0, horizon_steps=8192))
    assert slow.reschedule(snap, PolicyState())[0].migrations == ()


def test_ares_never_moves_a_request_already_migrating() -> None:
    busy = tuple(dataclasses.replace(req(f"r{i}", 2000, 3000.0), migrating=True) for i in range(4))
    snap = ClusterSnapshot.from_views(0.0, [replica(0, busy, capacity=100_000),
                                            replica(1, capacity=100_000)])
    assert ares().reschedule(snap, PolicyState())[0].migrations == ()


def test_policies_are_pure() -> None:
    snap = _memory_trap()
    before = snap.table().kv_tokens.copy()
    policy = ares()
    first = policy.dispatch(snap, PolicyState())
    assert policy.dispatch(snap, PolicyState()) == first
    np.testing.assert_array_equal(snap.table().kv_tokens, before)


def test_ares_holds_a_request_no_replica_has_memory_for() -> None:
    full = ClusterSnapshot.from_views(
        0.0,
        [replica(0, (req("a", 9000, 5000.0),)), replica(1, (req("b", 9500, 5000.0),))],
        [pending("new", 500, 1000.0)],
    )
    holding = ares(defer_when_full=True)
    decisions, _ = holding.dispatch(full, PolicyState())
    assert decisions.dispatches == ()  # held; the caller offers it again later
    forced = ares().dispatch(full, PolicyState())[0]
    assert forced.dispatch_map() == {"new": 0}  # smallest overflow
    with_idle = ClusterSnapshot.from_views(
        0.0, [*full_replicas(full), replica(2, capacity=1000)], full.pending)
    # The idle replica cannot hold the request's whole predicted life either, but it is idle.
    assert holding.dispatch(with_idle, PolicyState())[0].dispatch_map() == {"new": 2}


def full_replicas(snap: ClusterSnapshot) -> list[ReplicaView]:
    table = snap.table()
    return [replica(int(rid), tuple(req(str(table.id_at(i)), int(table.kv_tokens[i]),
                                        float(table.predicted_remaining[i]))
                                    for i in np.flatnonzero(table.replica == pos)))
            for pos, rid in enumerate(snap.replica_ids)]
