"""Live migration between decode engines on separate meshes, driven through the scheduler
core: token identity, KV equality, abort paths with injected faults, and a policy-driven
cluster run (tiny random model, 8 virtual CPU devices)."""

import jax
import numpy as np
import pytest

from ares_jax.cluster import (
    ClusterConfig,
    MigrationConfig,
    MigrationOutcome,
    ServingLoop,
    build_cluster,
)
from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig, Request
from ares_jax.model import make_mesh
from ares_jax.model.loader import on_mesh
from ares_jax.replica.types import ImportDone

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


def cluster(engines, config: MigrationConfig | None = None) -> ServingLoop:
    """The core over the engines; least-load dispatch never migrates on its own, so the test
    decides every migration."""
    prefill, decoders = engines
    return ServingLoop(prefill, decoders, None,
                       ClusterConfig(policy="least-load", migration=config or MigrationConfig()))


def assert_all_free(engines) -> None:
    for d in engines[1]:
        assert d.num_free_pages == d.capacity_pages and not d.num_active, d.page_owners()


@pytest.fixture(scope="module")
def reference(engines):
    loop = ServingLoop(engines[0], engines[1][:1], None)
    loop.add_request(Request(request_id="ref", prompt_ids=prompt(1), params=PARAMS))
    while loop.has_work:
        loop.step()
    return loop.finished["ref"].token_ids


def decode_with_migrations(engines, migrate_at: list[int], dsts: list[int],
                           config: MigrationConfig | None = None) -> tuple[list[int], list]:
    """Run one greedy request, starting a migration at each generated-token count in
    ``migrate_at`` (to ``dsts``)."""
    loop = cluster(engines, config)
    loop.add_request(Request(request_id="m", prompt_ids=prompt(1), params=PARAMS))
    pending = list(zip(migrate_at, dsts))
    while loop.has_work:
        tracker = loop.trackers["m"]
        if pending and len(tracker.token_ids) >= pending[0][0] and not loop.migrations:
            loop.start_migration("m", loop.location["m"], pending.pop(0)[1])
        loop.step()
    loop.check_no_leaks()
    assert_all_free(engines)
    return loop.finished["m"].token_ids, list(loop.migration_history)


@pytest.mark.parametrize("migrate_at", [[8], [15], [17], [9, 33]])
def test_migrated_request_produces_identical_tokens(engines, reference, migrate_at):
    dsts = [1, 2][: len(migrate_at)]
    tokens, history = decode_with_migrations(engines, migrate_at, dsts)
    assert [r.outcome for r in history] == [MigrationOutcome.COMMITTED] * len(migrate_at)
    assert all(r.stages >= 1 and r.bytes_moved > 0 for r in history)
    assert tokens == reference


def test_destination_pages_equal_source_pages_bit_for_bit(engines):
    loop = cluster(engines)
    _, (src, dst, _) = engines
    loop.add_request(Request(request_id="kv", prompt_ids=prompt(2, 45), params=PARAMS))
    for _ in range(6):
        loop.step()
    full = src.num_cached("kv") // ECFG.page_size  # pages that no later token changes
    before = [np.asarray(a)[:, :full] for a in src.export_pages("kv", 0, full)]
    loop.start_migration("kv", 0, 1)
    while loop.migrations:
        loop.step()
    assert loop.migration_history[-1].outcome is MigrationOutcome.COMMITTED
    assert dst.is_running("kv") and not src.pages_held("kv")
    after = [np.asarray(a)[:, :full] for a in dst.export_pages("kv", 0, full)]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(b, a)
    loop.abort("kv")
    assert_all_free(engines)


def test_abort_paths_free_every_page_and_keep_the_request(engines, reference):
    _, (src, dst, _) = engines

    def started(config=None) -> ServingLoop:
        loop = cluster(engines, config)
        loop.add_request(Request(request_id="a", prompt_ids=prompt(1), params=PARAMS))
        for _ in range(3):
            loop.step()
        return loop

    # 1. The destination has no room.
    loop = started()
    dst.reserve("hog", dst.num_free_pages)
    rec = loop.start_migration("a", 0, 1)
    assert rec.outcome is MigrationOutcome.ABORTED_DESTINATION and "not free" in rec.reason
    dst.release("hog")
    loop.abort("a")
    # 2. The request is cancelled mid-migration: the destination's pages go too.
    loop = started(MigrationConfig(final_stage_pages=0, max_stages=5))
    loop.start_migration("a", 0, 1)
    loop.step()
    assert dst.pages_held("a") > 0
    loop.abort("a")
    assert loop.migration_history[-1].outcome is MigrationOutcome.ABORTED_SOURCE
    assert_all_free(engines)
    # 3. The copy fails at the second stage, and 4. the migration times out; both at the
    # final (stop-and-copy) stage too. The request decodes on where it was, to the same tokens.
    for fail_at, cfg, why in [(2, MigrationConfig(final_stage_pages=0), "link down"),
                              (1, MigrationConfig(), "link down"),
                              (None, MigrationConfig(timeout_s=5.0), "exceeded")]:
        loop = started(cfg)
        handle = loop.decode_replicas[1]
        real, calls = handle.import_kv, {"n": 0}

        def flaky(rid, start, block, real=real, calls=calls, fail_at=fail_at, handle=handle):
            calls["n"] += 1
            if calls["n"] == fail_at:
                handle._events.append(ImportDone(replica_id=1, request_id=rid, start=start,
                                                 pages=block.pages, nbytes=0, ok=False,
                                                 error="TransferError: link down"))
                return
            real(rid, start, block)

        handle.import_kv = flaky
        if why == "exceeded":
            ticks = iter(range(0, 10**6, 10))
            loop.clock = lambda ticks=ticks: float(next(ticks))  # 10 s between readings
        loop.start_migration("a", 0, 1)
        while loop.migrations:
            loop.step()
        rec = loop.migration_history[-1]
        assert rec.outcome is MigrationOutcome.ABORTED_DESTINATION and why in rec.reason
        assert src.is_running("a") and not dst.pages_held("a")  # still decoding where it was
        while loop.has_work:
            loop.step()
        assert loop.finished["a"].token_ids == reference
        loop.check_no_leaks()
        assert_all_free(engines)


def test_import_with_wrong_page_shape_is_refused(engines):
    _, (src, dst, _) = engines
    dst.reserve("w", 2)
    bad = jax.numpy.zeros((2, 2, 4, 2, 16))
    with pytest.raises(ValueError, match="does not match"):
        dst.import_pages("w", 0, bad, bad, 2)
    dst.release("w")


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
        assert d.num_free_pages == d.capacity_pages
