"""A multi-controller replica: ONE replica process made of two ``jax.distributed`` CPU
processes (2 virtual devices each), started as ``ares-jax replica --roles prefill,decode
--devices-per-replica 2 --coordinator ... --num-processes 2 --process-id I``, so that both
meshes span both processes, and driven by a real scheduler process through ``Client``.
Process 0 registers and serves; process 1 replays its calls. Checked: the group registers as
two replicas of one process, greedy tokens equal the single-process engine's (the KV of each
prefill moves to the decode mesh by a per-process copy), every page is free afterwards, and
SIGTERM to the leader stops both processes (the follower on the leader's stop) with nothing left
behind. A migration between a group's meshes is checked by tests/test_multihost_replay.py (one
more decode mesh here costs every compilation twice more, in both processes)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from serving_support import in_process_tokens, settled
from test_serving_meshes import child_env, tail

from ares_jax.client import Client
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig
from ares_jax.serving.local_cluster import free_port, process_alive

ECFG = EngineConfig(page_size=8, num_pages=64, max_num_seqs=8, max_model_len=256)
ENGINE_FLAGS = ["--model", "random:tiny", "--predictor", "none", "--page-size", "8",
                "--num-pages", "64", "--max-model-len", "256", "--max-num-seqs", "8",
                "--log-level", "INFO"]
ROLES = "prefill,decode"
READY_TIMEOUT_S = 240.0


def prompt(i: int, n: int = 12) -> list[int]:
    return np.random.default_rng(500 + i).integers(4, 500, size=n).tolist()


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """(client, scheduler, leader, follower, logs)."""
    logs = tmp_path_factory.mktemp("multihost-logs")
    port, coordinator = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        with open(logs / f"{name}.log", "wb") as out:
            p = subprocess.Popen([sys.executable, "-m", "ares_jax.cli", *cmd], env=child_env(),
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(p)
        return p

    scheduler = start("scheduler", ["scheduler", *ENGINE_FLAGS, "--expect-prefill", "1",
                                    "--expect-decode", "1", "--host", "127.0.0.1",
                                    "--grpc-port", str(port), "--policy", "least-load"])
    members = [start(f"process{i}", [
        "replica", "--roles", ROLES, "--devices-per-replica", "2", "--scheduler", address,
        "--host", "127.0.0.1", "--grpc-port", "0", *ENGINE_FLAGS,
        "--coordinator", f"127.0.0.1:{coordinator}", "--num-processes", "2",
        "--process-id", str(i), "--distributed-timeout", "120"]) for i in range(2)]
    client = Client(address, timeout_s=120)

    def logs_text() -> str:
        return "\n".join(f"--- {n}\n{tail(logs / f'{n}.log')}"
                         for n in ("scheduler", "process0", "process1"))

    try:
        client.wait_ready(READY_TIMEOUT_S)
    except Exception:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"the group did not register:\n{logs_text()}")
    yield client, scheduler, members[0], members[1], logs_text
    client.close()
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    left = [p.pid for p in procs if process_alive(p.pid)]
    assert not left, f"processes left behind: {left}"


def test_the_group_registers_as_one_process_of_meshes_spanning_both(group):
    client, _, leader, _, _ = group
    reps = sorted(client.stats()["replicas"], key=lambda r: r["replica_id"])
    assert [(r["replica_id"], r["role"]) for r in reps] == [(0, "prefill"), (1, "decode")]
    # Only the leader talks to the scheduler; every mesh has 2 devices, one per process.
    assert {r["process_id"] for r in reps} == {leader.pid}
    assert all(r["kv_pages_total"] == ECFG.num_pages - 1 for r in reps if r["role"] == "decode")


def test_greedy_tokens_equal_the_single_process_engine(group, tiny_model):
    client, _, _, _, logs = group
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = [prompt(i) for i in range(3)]
    outs = client.generate(prompts, params)
    assert [o.token_ids for o in outs] == in_process_tokens(tiny_model, ECFG, prompts, params), \
        logs()
    stats = settled(client)
    assert all(r["kv_pages_used"] == 0 and r["running"] == 0 for r in stats["replicas"]), \
        stats["replicas"]


def test_sigterm_to_the_leader_stops_the_whole_group(group):
    _, _, leader, follower, logs = group
    started = time.monotonic()
    leader.send_signal(signal.SIGTERM)
    codes = []
    for p in (leader, follower):
        try:
            codes.append(p.wait(timeout=60))
        except subprocess.TimeoutExpired:
            codes.append("hung")
    assert codes == [0, 0], (codes, logs())
    assert "the leader stopped the group" in logs()
    print(f"group stopped in {time.monotonic() - started:.1f} s")


def test_the_scheduler_is_left_to_stop(group):
    _, scheduler, _, _, _ = group
    scheduler.send_signal(signal.SIGTERM)
    assert scheduler.wait(timeout=30) == 0
    assert not process_alive(scheduler.pid)

