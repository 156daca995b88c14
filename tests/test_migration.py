"""Live migration between decode engines on separate meshes: token identity, KV equality,
abort paths, and a policy-driven cluster run (tiny random model, 8 virtual CPU devices)."""

import jax
import numpy as np
import pytest

from ares_jax.cluster import ClusterConfig, build_cluster
from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.loop import ServingLoop
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig, Request
from ares_jax.model import make_mesh
from ares_jax.model.loader import on_mesh
from ares_jax.transfer import MigrationConfig, MigrationManager, MigrationOutcome
from ares_jax.transfer.errors import TransferError

ECFG = EngineConfig(page_size=8, num_pages=64, max_num_seqs=8, max_model_len=256)
PARAMS = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)


def prompt(i: int, n: int = 21) -> list[int]:
    return np.random.default_rng(i).integers(4, 500, size=n).tolist()


@pytest.fixture(scope="module")
def engines(tiny_model):
    """A prefill engine and three decode engines, each on its own pair of devices."""
    devs = jax.devices()
    prefill = PrefillEngine(on_mesh(tiny_model, make_mesh(devs[0:2])), ECFG)
    decoders = [DecodeEngine(on_mesh(tiny_model, make_mesh(devs[2 + 2 * i:4 + 2 * i])), ECFG)
                for i in range(3)]
    return prefill, decoders


@pytest.fixture(scope="module")
def reference(engines):
    prefill, decoders = engines
    loop = ServingLoop(prefill, decoders[:1], None)
    loop.add_request(Request(request_id="ref", prompt_ids=prompt(1), params=PARAMS))
    while loop.has_work:
        loop.step()
    return loop.finished["ref"].token_ids


def decode_with_migrations(engines, migrate_at: list[int], dsts: list[int],
                           config: MigrationConfig | None = None) -> tuple[list[int], list]:
    """Run one greedy request, starting a migration at each generated-token count in
    ``migrate_at`` (to ``dsts``), stepping wherever the request currently lives."""
    prefill, decoders = engines
    res = prefill.prefill([Request(request_id="m", prompt_ids=prompt(1), params=PARAMS)])[0]
    tokens = [res.first.token_id]
    decoders[0].insert(res)
    where = 0
    mgr = MigrationManager(decoders, config)
    pending = list(zip(migrate_at, dsts))
    while len(tokens) < PARAMS.max_tokens:
        if pending and len(tokens) >= pending[0][0] and not mgr.active:
            mgr.start("m", where, pending.pop(0)[1])
        out = decoders[where].step()
        tokens += [t.token_id for rid, t in zip(out.request_ids, out.tokens) if rid == "m"]
        for rec in mgr.advance():
            assert rec.outcome is MigrationOutcome.COMMITTED, rec.reason
            where = rec.dst
    decoders[where].release("m")
    for d in decoders:
        assert d.allocator.num_free == d.allocator.capacity
    return tokens[: PARAMS.max_tokens], mgr.history


@pytest.mark.parametrize("migrate_at", [[8], [15], [17], [9, 33]])
def test_migrated_request_produces_identical_tokens(engines, reference, migrate_at):
    dsts = [1, 2][: len(migrate_at)]
    tokens, history = decode_with_migrations(engines, migrate_at, dsts)
    assert [r.outcome for r in history] == [MigrationOutcome.COMMITTED] * len(migrate_at)
    assert all(r.stages >= 1 and r.bytes_moved > 0 for r in history)
    assert tokens == reference


def test_destination_pages_equal_source_pages_bit_for_bit(engines):
    prefill, (src, dst, _) = engines
    res = prefill.prefill([Request(request_id="kv", prompt_ids=prompt(2, 45), params=PARAMS)])[0]
    src.insert(res)
    for _ in range(6):
        src.step()
    n = len(src.allocator.pages("kv"))
    before_k, before_v = (np.asarray(a)[:, :n] for a in src.export_pages("kv", 0, n))
    mgr = MigrationManager([src, dst])
    mgr.start("kv", 0, 1)
    while mgr.active:
        mgr.advance()
    assert mgr.history[-1].outcome is MigrationOutcome.COMMITTED
    after_k, after_v = (np.asarray(a)[:, :n] for a in dst.export_pages("kv", 0, n))
    np.testing.assert_array_equal(before_k, after_k)
    np.testing.assert_array_equal(before_v, after_v)
    dst.release("kv")


def test_abort_paths_free_every_page_and_keep_the_request(engines):
    prefill, (src, dst, _) = engines

    def fresh(rid: str) -> None:
        r = prefill.prefill([Request(request_id=rid, prompt_ids=prompt(3, 30),
                                     params=PARAMS)])[0]
        src.insert(r)

    # 1. The destination has no room.
    fresh("a")
    hog = dst.reserve("hog", dst.allocator.num_free)
    rec = MigrationManager([src, dst]).start("a", 0, 1)
    assert rec.outcome is MigrationOutcome.ABORTED_DESTINATION and "needs" in rec.reason
    dst.allocator.free("hog")
    assert len(hog) > 0 and "a" in src.slots
    # 2. The request finishes (is released) on the source mid-migration.
    mgr = MigrationManager([src, dst], MigrationConfig(final_stage_pages=0, max_stages=5))
    mgr.start("a", 0, 1)
    mgr.advance()
    src.release("a")
    (rec,) = mgr.advance()
    assert rec.outcome is MigrationOutcome.ABORTED_SOURCE
    # 3. The transfer fails halfway (second stage), and 4. it times out.
    calls = {"n": 0}

    def flaky(s, d, rid, start, end):
        calls["n"] += 1
        if calls["n"] == 2:
            raise TransferError("link down")
        return 0

    ticks = iter(range(0, 10**6, 10))
    clock = lambda: float(next(ticks))  # noqa: E731 - 10 s pass between any two readings
    for copy_fn, cfg, why in [(flaky, MigrationConfig(final_stage_pages=0), "link down"),
                              (lambda *a: 0, MigrationConfig(timeout_s=5.0), "exceeded")]:
        fresh("b")
        mgr = MigrationManager([src, dst], cfg, copy_fn=copy_fn,
                               clock=clock if why == "exceeded" else __import__("time").time)
        mgr.start("b", 0, 1)
        ended = []
        while not ended:
            src.step()
            ended = mgr.advance()
        assert ended[0].outcome is MigrationOutcome.ABORTED_DESTINATION
        assert why in ended[0].reason
        assert "b" in src.slots and "b" not in dst.slots  # still decoding where it was
        src.step()
        src.release("b")
    for d in (src, dst):
        assert d.allocator.num_free == d.allocator.capacity and not d.slots


def test_import_with_wrong_page_shape_is_refused(engines):
    _, (src, dst, _) = engines
    dst.reserve("w", 2)
    bad = jax.numpy.zeros((2, 2, 4, 2, 16))
    with pytest.raises(ValueError, match="does not match"):
        dst.import_pages("w", 0, bad, bad, 2)
    dst.allocator.free("w")


def test_ares_policy_migrates_a_skewed_cluster_and_tokens_are_right(tiny_model):
    """Static round-robin lands every long request on replica 0; ARES rescheduling moves
    some away, and every request still produces the tokens of a single-engine run."""
    ecfg = EngineConfig(page_size=8, num_pages=96, max_num_seqs=16, max_model_len=256)

    def requests():
        return [Request(request_id=f"r{i}", prompt_ids=prompt(10 + i, 20),
                        params=SamplingParams(temperature=0.0, ignore_eos=True,
                                              max_tokens=150 if i % 3 == 0 else 8), index=i)
                for i in range(12)]

    ref = ServingLoop(PrefillEngine(tiny_model, ecfg), [DecodeEngine(tiny_model, ecfg)], None)
    for r in requests():
        ref.add_request(r)
    while ref.has_work:
        ref.step()
    loop = build_cluster(tiny_model, ClusterConfig(policy="ares", dispatch_policy="static",
                                                   reschedule_every=2), ecfg)
    for r in requests():
        loop.add_request(r)
    while loop.has_work:
        loop.step()
    stats = loop.stats()
    assert stats["migrations_committed"] >= 1, stats
    assert {rid: t.token_ids for rid, t in loop.finished.items()} == \
        {rid: t.token_ids for rid, t in ref.finished.items()}
    loop.check_no_leaks()
    for d in loop.decoders:
        assert d.allocator.num_free == d.allocator.capacity
