"""``ares-jax serve --transport shm``: the prefill -> decode handoff and a decode -> decode
migration move KV between replica processes through /dev/shm segments; greedy tokens equal
the in-process reference, and no process and no segment outlives the cluster."""

from __future__ import annotations

import os

import numpy as np
import pytest
from serving_support import in_process_tokens, settled, stream_and_migrate, wait_for

from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig
from ares_jax.serving.local_cluster import LocalCluster, process_alive
from ares_jax.transfer.shm import DEFAULT_DIR, PREFIX

# The engine, prompts and sampling of test_serving_cluster.py (jax transport), so that in a
# suite run the in-process reference (jit cache) and the replicas' programs (the persistent
# compilation cache) come from that module's run instead of compiling again.
ECFG = EngineConfig(page_size=8, num_pages=64, max_num_seqs=8, max_model_len=256)
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def prompt(i: int, n: int = 12) -> list[int]:
    return np.random.default_rng(100 + i).integers(4, 500, size=n).tolist()


def segments_of(pids: list[int]) -> list[str]:
    return [n for n in os.listdir(DEFAULT_DIR)
            if any(n.startswith(f"{PREFIX}{pid}-") for pid in pids)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-shm-logs")
    local = LocalCluster(
        ["--model", "random:tiny", "--prefill-replicas", "1", "--decode-replicas", "2",
         "--transport", "shm", "--predictor", "none", "--num-pages", "64",
         "--max-model-len", "256", "--page-size", "8", "--max-num-seqs", "8",
         "--policy", "least-load", "--log-dir", str(logs), "--log-level", "WARNING"],
        start_timeout_s=300)
    yield local.client, local.pids
    out = local.close()  # raises if a replica process outlives the cluster
    assert local.proc.returncode == 0, out
    assert not [pid for pid in local.pids if process_alive(pid)]
    assert segments_of(local.pids) == []


@pytest.fixture(scope="module")
def reference(tiny_model):
    return lambda prompts, params=GREEDY: in_process_tokens(tiny_model, ECFG, prompts, params)


def test_handoff_through_shared_memory_gives_the_reference_tokens(cluster, reference):
    client, pids = cluster
    prompts = [prompt(i, 5 + 7 * i) for i in range(5)]
    outs = client.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == reference(prompts)
    stats = settled(client)
    assert all(r["kv_pages_used"] == 0 for r in stats["replicas"]), stats["replicas"]
    # Every offer was dropped once its block was taken: no segment is left on the host.
    wait_for(lambda: segments_of(pids) == [], 10, "the handoff segments to be unlinked")


def test_migration_between_decode_processes_through_shared_memory(cluster, reference):
    client, pids = cluster
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    p = prompt(7, 40)
    tokens, dst = stream_and_migrate(client, p, params)
    assert tokens == reference([p], params)[0]
    stats = client.stats()
    last = stats["migrations"][-1]
    assert last["outcome"] == "committed" and last["bytes"] > 0 and last["dst"] == dst
    stats = settled(client)
    assert all(r["kv_pages_used"] == 0 for r in stats["replicas"]), stats["replicas"]
    wait_for(lambda: segments_of(pids) == [], 10, "the migration segments to be unlinked")
