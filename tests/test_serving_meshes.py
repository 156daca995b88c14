"""One replica process hosting several meshes: a scheduler process and ONE
``ares-jax replica --roles prefill,decode,decode`` process (3 virtual CPU devices, one mesh
each) of the tiny seeded random model, started by hand as ``ares-jax serve`` would for a
multi-host deployment. Checked through ``ares_jax.client.Client``: the three meshes register
as three replicas of one process, greedy tokens equal an in-process reference, a live
migration between the two decode meshes of that process (KV by ``jax.device_put``, the
``Export(same_process=True)`` path) keeps the tokens and frees every page, and SIGTERM stops
both processes with nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from serving_support import in_process_tokens, settled

from ares_jax.client import Client
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig
from ares_jax.serving.local_cluster import free_port, process_alive

# Must match the replica's flags below: the reference runs the same engines in this process.
ECFG = EngineConfig(page_size=8, num_pages=64, max_num_seqs=8, max_model_len=256)
ENGINE_FLAGS = ["--model", "random:tiny", "--predictor", "none", "--page-size", "8",
                "--num-pages", "64", "--max-model-len", "256", "--max-num-seqs", "8",
                "--log-level", "WARNING"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
READY_TIMEOUT_S = 300.0


def prompt(i: int, n: int = 12) -> list[int]:
    return np.random.default_rng(300 + i).integers(4, 500, size=n).tolist()


def child_env() -> dict[str, str]:
    """This environment without the test session's 8-device XLA_FLAGS (conftest.py): the
    replica process must size its own device count from ``--roles``."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    """(client, scheduler Popen, replica Popen); stops both with SIGTERM afterwards and checks
    that they exit cleanly and leave no process behind."""
    logs = tmp_path_factory.mktemp("mesh-logs")
    port = free_port()
    address = f"127.0.0.1:{port}"
    sched_log, rep_log = logs / "scheduler.log", logs / "replica.log"
    with open(sched_log, "wb") as out:
        scheduler = subprocess.Popen(
            [sys.executable, "-m", "ares_jax.cli", "scheduler", *ENGINE_FLAGS,
             "--expect-prefill", "1", "--expect-decode", "2", "--host", "127.0.0.1",
             "--grpc-port", str(port), "--policy", "least-load"],
            env=child_env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    with open(rep_log, "wb") as out:
        replica = subprocess.Popen(
            [sys.executable, "-m", "ares_jax.cli", "replica", "--roles", "prefill,decode,decode",
             "--scheduler", address, "--host", "127.0.0.1", "--grpc-port", "0", *ENGINE_FLAGS],
            env=child_env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    procs = (scheduler, replica)
    client = Client(address, timeout_s=120)
    try:
        client.wait_ready(READY_TIMEOUT_S)
    except Exception:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"the cluster did not form:\n--- scheduler\n{tail(sched_log)}\n"
                    f"--- replica\n{tail(rep_log)}")
    yield client, scheduler, replica
    client.close()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=60))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append("hung")
    assert codes == [0, 0], (f"exit codes {codes}\n--- scheduler\n{tail(sched_log)}\n"
                             f"--- replica\n{tail(rep_log)}")
    left = [p.pid for p in procs if process_alive(p.pid)]
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Greedy tokens of the same model in this process, one decode engine."""
    return lambda prompts, params=GREEDY: in_process_tokens(tiny_model, ECFG, prompts, params)


def test_three_meshes_register_as_replicas_of_one_process(meshes):
    client, _, replica = meshes
    stats = client.stats()
    assert stats["ready"]
    reps = sorted(stats["replicas"], key=lambda r: r["replica_id"])
    # Ids follow the --roles order; every mesh is a replica of the same process.
    assert [(r["replica_id"], r["role"]) for r in reps] == \
        [(0, "prefill"), (1, "decode"), (2, "decode")]
    assert {r["process_id"] for r in reps} == {replica.pid}
    assert len({r["process"] for r in reps}) == 1 and len({r["address"] for r in reps}) == 1
    decode = [r for r in reps if r["role"] == "decode"]
    # The engine settings reached every decode mesh (page 0 of a pool is scratch).
    assert all(r["kv_pages_total"] == ECFG.num_pages - 1 and r["page_size"] == ECFG.page_size
               for r in decode), decode


def test_greedy_tokens_equal_the_in_process_engine(meshes, reference):
    client, _, _ = meshes
    prompts = [prompt(i, 5 + 9 * i) for i in range(4)]
    outs = client.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == reference(prompts)
    assert all(o.finish_reason == "length" and len(o.token_ids) == 40 for o in outs)
    assert [o.prompt_token_ids for o in outs] == prompts


def migrate_mid_stream(client: Client, p: list[int], params: SamplingParams,
                       at: int = 12) -> tuple[list[int], int]:
    """Stream ``p``; after ``at`` tokens ask for a migration to whichever decode mesh the
    request is not on. Returns (tokens, destination)."""
    tokens: list[int] = []
    dst = -1
    for chunk in client.stream(p, params):
        if chunk.token_id >= 0:
            tokens.append(chunk.token_id)
        if len(tokens) == at and dst < 0:
            reasons = []
            for candidate in (1, 2):
                started, reason = client.migrate(chunk.request_id, candidate)
                if started:
                    dst = candidate
                    break
                reasons.append(reason)
            assert dst >= 0, reasons
    return tokens, dst


def test_migration_between_meshes_of_one_process_keeps_tokens(meshes, reference):
    client, _, _ = meshes
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    p = prompt(7, 40)
    before = client.stats()["counters"].get("migrations_committed", 0)
    tokens, dst = migrate_mid_stream(client, p, params)
    assert tokens == reference([p], params)[0]
    stats = client.stats()
    assert stats["counters"]["migrations_committed"] == before + 1, \
        [(m["src"], m["dst"], m["outcome"], m["reason"]) for m in stats["migrations"]]
    last = stats["migrations"][-1]
    assert last["outcome"] == "committed" and last["dst"] == dst and last["src"] == 3 - dst
    assert last["stages"] >= 1 and last["downtime_ms"] is not None
    # Source and destination report the same process, so the scheduler asked for the
    # device_put path (Export with same_process) rather than the KV transport.
    procs = {r["replica_id"]: r["process"] for r in stats["replicas"]}
    assert procs[1] == procs[2]
    stats = settled(client)  # page accounting balances on both decode meshes
    assert stats["running"] == 0 and stats["waiting"] == 0, stats
    assert all(r["kv_pages_used"] == 0 and r["running"] == 0 for r in stats["replicas"]), \
        stats["replicas"]
    assert all(r["kv_pages_free"] == ECFG.num_pages - 1
               for r in stats["replicas"] if r["role"] == "decode"), stats["replicas"]


def test_same_process_migration_counts_the_bytes_it_moved(meshes):
    """The KV of a migrated request does move (device to device), so the record and the
    ``migration_bytes`` counter must count it, as they do across processes.

    Fix (``ares_jax/serving/replica_server.py``, ``ReplicaProcess.resolved``): count the
    pulled arrays when the wire block carries no byte count, e.g.
    ``chunks = self.pull(block); nbytes = block.nbytes or sum(k.nbytes + v.nbytes for k, v, _
    in chunks); return dataclasses.replace(block, arrays=tuple(chunks), nbytes=nbytes)``."""
    client, _, _ = meshes
    params = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
    _, dst = migrate_mid_stream(client, prompt(9, 40), params)
    last = client.stats()["migrations"][-1]
    assert last["outcome"] == "committed" and last["dst"] == dst
    # At least the pages of the 40-token prompt (5 pages of 8 tokens, K and V) crossed.
    page_bytes = ECFG.page_size * 512  # random:tiny: 2 layers * 2 kv heads * 16 * 4 B * K+V
    assert last["bytes"] >= 5 * page_bytes, last
