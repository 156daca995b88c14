"""The simulator migrates with the live protocol (``cluster/migration.next_stage``), timed.

One request is moved once between two decode replicas, so every stage can be checked by hand:
the passes it copies, stop-and-copy after ``max_stages`` (not Llumnix's abandon), the bytes as
whole pages, the downtime as the last copy plus the stall, the timeout, and that the request
finishes with exactly its tokens and every page comes back.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
from test_sim_simulator import assert_conserved, config, run

from ares_jax.cluster import ClusterConfig, ClusterCore
from ares_jax.cluster.migration import MigrationConfig, MigrationOutcome
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import Request
from ares_jax.paging import pages_for
from ares_jax.replica.simulated import SimulatedDecodeReplica, SimulatedPrefillReplica
from ares_jax.scheduler import ClusterSnapshot, Decisions, Dispatch, Migration, PolicyState
from ares_jax.sim.simulator import Simulator
from ares_jax.sim.workloads import Workload

PROMPT, OUTPUT = 1000, 600


class MoveOnce:
    """Test policy: everything to replica 0; at the first round, request 0 to replica 1.
    ``kv_at_move`` keeps the KV the request had when the move was decided."""

    name = "move-once"
    needs_request_table: ClassVar[bool] = False
    migrates: ClassVar[bool] = True
    kv_at_move: int = -1

    def dispatch(self, snapshot: ClusterSnapshot, state: PolicyState):  # noqa: ANN201
        return Decisions(dispatches=tuple(Dispatch(request_id=p.request_id, replica_id=0)
                                          for p in snapshot.pending)), state

    def reschedule(self, snapshot: ClusterSnapshot, state: PolicyState):  # noqa: ANN201
        if state.round_robin_next:  # used here as "already moved"
            return Decisions(), state
        table = snapshot.table()
        rows = np.flatnonzero(table.replica == 0)
        if not rows.size:
            return Decisions(), state
        move = Migration(request_id=table.id_at(int(rows[0])), src=0, dst=1)
        self.kv_at_move = int(table.kv_tokens[rows[0]])
        return Decisions(migrations=(move,)), dataclasses.replace(state, round_robin_next=1)


def one_request(prompt: int = PROMPT) -> Workload:
    return Workload(name="one", arrival_s=np.zeros(1), prompt_tokens=np.array([prompt]),
                    output_tokens=np.array([OUTPUT]), max_tokens=4096)


def migrate(link_gbytes_per_s: float, migration: MigrationConfig,
            policy: MoveOnce | None = None, prompt: int = PROMPT) -> Simulator:
    cfg = config(decode=2, link_gbytes_per_s=link_gbytes_per_s, migration=migration)
    sim = run(one_request(prompt), policy or MoveOnce(), cfg)
    assert_conserved(sim)
    assert int(sim.result.finish_count[0]) == 1
    return sim


def test_fast_link_one_pass_then_stop_and_copy() -> None:
    sim = migrate(50.0, MigrationConfig(final_stage_pages=16, stage_pages=128))
    (rec,) = sim.migration_history
    assert rec.outcome is MigrationOutcome.COMMITTED and (rec.src, rec.dst) == (0, 1)
    # One stage copies every filled page (~67 of them, under stage_pages): a pass. The copy is
    # faster than a decode step, so at most one page is left: the stop-and-copy follows.
    assert rec.stages == 2
    page, kv_bytes = sim.page, sim.kv_bytes
    assert rec.bytes_moved == rec.copied_pages * page * kv_bytes  # whole pages, each once
    assert sim.result.counters["bytes_moved_completed"] == rec.bytes_moved
    # The request left the source with the KV it had then: the last copy took every page.
    assert rec.copied_pages >= pages_for(PROMPT, page)
    # Downtime: the last copy (at most final_stage_pages) plus the fixed stall.
    downtime, cost = rec.downtime_s, sim.mig_transfer
    assert downtime is not None
    assert cost.stall_ms / 1e3 <= downtime <= (cost.copy_ms(16 * page) + cost.stall_ms) / 1e3
    assert int(sim.result.migrations_per_request[0]) == 1


def test_slow_link_stops_and_copies_after_max_stages() -> None:
    # At 0.2 GB/s a pass of ~70 pages takes ~0.7 s, during which the request fills ~7 more
    # pages; with final_stage_pages=0 the remainder never gets small enough, so after two
    # passes the protocol stops and copies (Llumnix's simulator used to abandon here).
    mcfg = MigrationConfig(final_stage_pages=0, max_stages=2, stage_pages=1 << 20)
    sim = migrate(0.2, mcfg)
    (rec,) = sim.migration_history
    assert rec.outcome is MigrationOutcome.COMMITTED
    assert rec.stages == 3  # two catch-up passes, then the final one
    assert rec.bytes_moved == rec.copied_pages * sim.page * sim.kv_bytes


def test_stage_pages_splits_a_pass() -> None:
    sim = migrate(50.0, MigrationConfig(final_stage_pages=2, stage_pages=16))
    (rec,) = sim.migration_history
    assert rec.outcome is MigrationOutcome.COMMITTED
    # Only a completed pass counts: five stages of at most 16 pages (the ~67 filled ones) are
    # one pass; one page is left, so the stop-and-copy follows.
    assert rec.stages == 2
    # With the default 64-page stages the first stage stops short of the ~67 filled pages
    # (no pass completed), and the 4 left go in the stop-and-copy.
    sim = migrate(50.0, MigrationConfig(final_stage_pages=16))
    (rec,) = sim.migration_history
    assert rec.outcome is MigrationOutcome.COMMITTED and rec.stages == 1


def test_timeout_leaves_the_request_on_its_source() -> None:
    sim = migrate(0.2, MigrationConfig(final_stage_pages=0, timeout_s=0.3))
    (rec,) = sim.migration_history
    assert rec.outcome is MigrationOutcome.ABORTED_DESTINATION
    assert "exceeded" in rec.reason
    assert int(sim.result.migrations_per_request[0]) == 0
    assert sim.result.counters["migrations_aborted"] == 1
    # It finished on its source with its whole output (assert_conserved checked the pages).
    assert sim.result.counters["decode_tokens"] == OUTPUT - 1


def test_the_scheduler_core_migrates_the_same_way() -> None:
    """The same move through the live core (over simulated replicas, one copy stage per
    iteration) and through the simulator (stages timed by a 50 GB/s link) takes the same
    passes and copies the same pages: both run ``next_stage``. The request is moved with its
    KV mid-page, so the one or two decode steps the stages take add no page."""
    mcfg = MigrationConfig()  # the live defaults: 64-page stages, stop-and-copy at 2 left
    policy, prompt = MoveOnce(), PROMPT + 8
    sim = migrate(50.0, mcfg, policy, prompt)
    (simulated,) = sim.migration_history
    kv = policy.kv_at_move
    assert 2 < kv % sim.page < sim.page - 4 and kv // sim.page > 64  # two stages, then final

    kw = dict(page_size=sim.page, max_model_len=8192, kv_bytes_per_token=sim.kv_bytes)
    decode = [SimulatedDecodeReplica(i, num_pages=512, max_num_seqs=4, **kw) for i in range(2)]
    core = ClusterCore([SimulatedPrefillReplica(2, **kw)], decode, None, vocab_size=1000,
                       cluster=ClusterConfig(policy="least-load", migration=mcfg))
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT, ignore_eos=True)
    core.add_request(Request(request_id="r0", prompt_ids=[5] * prompt, params=params))
    for _ in range(10 * OUTPUT):
        load = decode[0].load()
        if "r0" in load.request_ids and int(load.kv_tokens[0]) == kv:
            break
        core.step()
    rec = core.start_migration("r0", 0, 1)
    while rec.active:
        core.step()
    while core.has_work:
        core.step()

    assert rec.outcome is simulated.outcome is MigrationOutcome.COMMITTED
    assert (rec.stages, rec.copied_pages) == (simulated.stages, simulated.copied_pages)
    assert rec.bytes_moved == simulated.bytes_moved
    assert len(core.finished["r0"].token_ids) == OUTPUT
    assert all(h.load().used_pages == 0 for h in decode)


def test_the_scheduler_core_caps_migration_starts_per_minute() -> None:
    """``migration.max_starts_per_minute`` in the live core, as in the simulator: a policy
    that proposes two moves every round gets at most the cap started in any 60 s (a fake
    clock: one second per iteration); the rest are counted as capped, and nothing is lost."""
    from test_sim_simulator import ShuffleEverything

    def run_core(cap: int) -> ClusterCore:
        kw = dict(page_size=16, max_model_len=4096, kv_bytes_per_token=1024)
        decode = [SimulatedDecodeReplica(i, num_pages=512, max_num_seqs=4, **kw)
                  for i in range(2)]
        now = [0.0]
        core = ClusterCore([SimulatedPrefillReplica(2, **kw)], decode, None, vocab_size=1000,
                           cluster=ClusterConfig(policy="least-load", reschedule_every=1,
                                                 migration=MigrationConfig(
                                                     max_starts_per_minute=cap)),
                           clock=lambda: now[0])
        core.policy = ShuffleEverything()
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        for i in range(4):
            core.add_request(Request(request_id=f"r{i}", prompt_ids=[5] * 40, params=params))
        while core.has_work:
            core.step()
            now[0] += 1.0
        assert all(len(core.finished[f"r{i}"].token_ids) == 200 for i in range(4))
        assert all(h.load().used_pages == 0 for h in decode)
        return core

    capped = run_core(3)
    # (the iteration a migration started at is its second on the fake clock)
    starts = [float(d[0]) for d in capped.decisions if d[1] == "migrate"]
    assert starts and all(sum(s <= t < s + 60 for t in starts) <= 3 for s in starts)
    assert capped.counters["migrations_capped"] > 0
    assert capped.stats()["migrations_capped"] == capped.counters["migrations_capped"]
    free = run_core(0)
    assert free.counters["migrations_capped"] == 0
    assert sum(d[1] == "migrate" for d in free.decisions) > len(starts)
