"""One scheduler core, two transports, the same decisions.

A scripted scenario (arrivals at given iterations, fixed output lengths, a length "head" that
predicts max_tokens - generated, a virtual clock) runs through ``ClusterCore`` twice: over
real engines of a tiny model on separate meshes (the in-process transport) and over simulated
replicas (no model). Every dispatch, fallback and migration decision, and every request's
placement, must be identical: the scheduler cannot tell what runs the model.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ares_jax.cluster import ClusterConfig, ClusterCore, ServingLoop
from ares_jax.cluster.migration import MigrationConfig
from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig, Request
from ares_jax.replica.simulated import SimulatedDecodeReplica, SimulatedPrefillReplica
from ares_jax.scheduler.ares import AresConfig

ECFG = EngineConfig(page_size=8, num_pages=40, max_num_seqs=8, max_model_len=256)
# Static round-robin dispatch piles long requests up; ARES rebalances with migrations.
CLUSTER = ClusterConfig(policy="ares", dispatch_policy="static", reschedule_every=2,
                        refit_after_steps=10**9, migration=MigrationConfig(),
                        ares=AresConfig(cooldown_s=0.5, horizon_steps=256))
DT = 0.05  # virtual seconds per iteration


def remaining_head(params, hidden, tap, generated, max_tokens):
    """A deterministic stand-in for the length head: exactly what is left."""
    return (max_tokens - generated).astype(jnp.float32)


def remaining(generated: np.ndarray, max_tokens: np.ndarray) -> np.ndarray:
    return (max_tokens - generated).astype(np.float32).astype(np.float64)


def scenario() -> list[tuple[int, Request]]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(10):
        n = int(rng.integers(6, 40))
        max_tokens = 72 if i % 3 == 0 else int(rng.integers(8, 24))
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        out.append((i // 2, Request(request_id=f"q{i}", prompt_ids=rng.integers(
            4, 500, size=n).tolist(), params=params, index=i)))
    return out


def drive(core: ClusterCore) -> ClusterCore:
    arrivals = scenario()
    it = 0
    core.clock = lambda: it * DT
    while arrivals or core.has_work:
        while arrivals and arrivals[0][0] <= it:
            core.add_request(arrivals.pop(0)[1])
        core.step()
        it += 1
        assert it < 2000, "the scenario did not finish"
    return core


@pytest.fixture(scope="module")
def in_process(tiny_model):
    # Every engine on one device: they share compiled steps, and placement is what is tested.
    head = (remaining_head, None)
    prefill = PrefillEngine(tiny_model, ECFG, head=head)
    decoders = [DecodeEngine(tiny_model, ECFG, head=head) for _ in range(3)]
    loop = drive(ServingLoop(prefill, decoders, None, CLUSTER))
    loop.check_no_leaks()
    return loop


def simulated(cfg) -> ClusterCore:
    kw = dict(page_size=ECFG.page_size, max_model_len=ECFG.max_model_len,
              kv_bytes_per_token=cfg.kv_bytes_per_token, eos_token_ids=cfg.eos_token_ids,
              predict=remaining)
    decode = [SimulatedDecodeReplica(i, num_pages=ECFG.num_pages,
                                     max_num_seqs=ECFG.max_num_seqs, **kw) for i in range(3)]
    prefill = SimulatedPrefillReplica(3, **kw)
    return drive(ClusterCore([prefill], decode, None, vocab_size=cfg.vocab_size,
                             cluster=CLUSTER))


def test_same_scenario_same_decisions(in_process, tiny_model):
    sim = simulated(tiny_model.cfg)
    kinds = {d[1] for d in in_process.decisions}
    assert {"dispatch", "migrate", "migration_end"} <= kinds, kinds  # the scenario exercises
    assert list(sim.decisions) == list(in_process.decisions)
    assert sim.stats() == in_process.stats()
    for rid, t in in_process.finished.items():
        s = sim.finished[rid]
        assert len(s.token_ids) == len(t.token_ids) == t.request.params.max_tokens
        assert s.metrics.num_preemptions == t.metrics.num_preemptions
        assert s.metrics.num_migrations == t.metrics.num_migrations
    for h in sim.decode:
        assert h.load().used_pages == 0


class SlowPrefill(SimulatedPrefillReplica):
    """A prefill replica whose results have not come back yet (a remote one, busy)."""

    def poll(self):
        return []


def test_abort_while_prefilling_is_safe(tiny_model):
    """A request aborted while its prefill is in flight must not break the next iteration
    (the core once looked its tracker up while budgeting admissions)."""
    cfg = tiny_model.cfg
    kw = dict(page_size=8, max_model_len=256, kv_bytes_per_token=cfg.kv_bytes_per_token)
    core = ClusterCore([SlowPrefill(1, **kw)],
                       [SimulatedDecodeReplica(0, num_pages=40, max_num_seqs=1, **kw)], None,
                       vocab_size=cfg.vocab_size, cluster=CLUSTER)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i in range(3):
        core.add_request(Request(request_id=f"r{i}", prompt_ids=[5, 6, 7], params=params))
    core.step()
    assert set(core.prefilling) == {"r0"}  # one decode slot: one admitted
    core.abort("r0")
    core.step()  # budgets admissions around the aborted, still-prefilling request
    assert core.finished["r0"].finish_reason == "abort"
    # The aborted request's slot is no longer promised: the next one goes to prefill.
    assert set(core.prefilling) == {"r0", "r1"}
    assert [r.request_id for r in core.waiting] == ["r2"]


def test_rows_from_a_replica_the_request_is_not_on_are_dropped_and_freed(tiny_model):
    """A ghost: a copy of a request running on a replica the core did not place it on (a
    command that outlived its replica's reset). Its rows must not reach the stream, and its
    pages are freed there."""
    from ares_jax.replica.types import Prefilled, TokenInfo

    cfg = tiny_model.cfg
    kw = dict(page_size=8, max_model_len=256, kv_bytes_per_token=cfg.kv_bytes_per_token)
    decode = [SimulatedDecodeReplica(i, num_pages=40, max_num_seqs=4, **kw) for i in range(2)]
    core = ClusterCore([SimulatedPrefillReplica(2, **kw)], decode, None,
                       vocab_size=cfg.vocab_size, cluster=ClusterConfig(
                           policy="least-load", refit_after_steps=10**9))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    request = Request(request_id="r", prompt_ids=[5, 6, 7, 8], params=params)
    core.add_request(request)
    chunks = []
    while "r" not in core.location:
        chunks += core.step()
    home = core.location["r"]
    ghost = decode[1 - home]
    ghost.insert(request, Prefilled(replica_id=2, request_id="r", first=TokenInfo(9),
                                    num_tokens=4, predicted_remaining=None, finish_reason=None,
                                    stop_reason=None, kv=None))
    while core.has_work:
        chunks += core.step()
    tokens = [c.token_id for c in chunks if c.token_id >= 0]
    assert len(tokens) == 12 and core.finished["r"].token_ids == tokens
    assert core.counters["ghost_rows"] >= 1
    assert ghost.load().used_pages == 0 and decode[home].load().used_pages == 0
