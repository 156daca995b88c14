"""The multi-process cluster on localhost: ``ares-jax serve`` starts a scheduler and three
replica processes (1 prefill, 2 decode) of a tiny seeded random model; the tests talk to it
through ``ares_jax.client.Client`` and check tokens against an in-process reference, a live
migration between two decode processes, errors, cancellation, and a clean shutdown."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from serving_support import in_process_tokens, settled, stream_and_migrate

from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig
from ares_jax.serving import ares_pb2 as pb
from ares_jax.serving import ares_pb2_grpc as pb_grpc
from ares_jax.serving.local_cluster import LocalCluster, free_port, process_alive

ECFG = EngineConfig(page_size=8, num_pages=64, max_num_seqs=8, max_model_len=256)
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def prompt(i: int, n: int = 12) -> list[int]:
    return np.random.default_rng(100 + i).integers(4, 500, size=n).tolist()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-logs")
    local = LocalCluster(
        ["--port", str(free_port()), "--model", "random:tiny", "--prefill-replicas", "1",
         "--decode-replicas", "2",
         "--predictor", "none", "--num-pages", "64", "--max-model-len", "256",
         "--page-size", "8", "--max-num-seqs", "8", "--policy", "least-load",
         "--log-dir", str(logs), "--log-level", "WARNING"], start_timeout_s=300)
    local.client.http_port = local.http_port  # for the HTTP test
    yield local.client, local.proc, local.pids
    out = local.close()  # raises if a replica process outlives the cluster
    assert local.proc.returncode == 0, out
    assert "every replica process has exited" in out
    assert not [pid for pid in local.pids if process_alive(pid)]


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Greedy tokens of the same model in one process, one decode engine."""
    return lambda prompts, params=GREEDY: in_process_tokens(tiny_model, ECFG, prompts, params)


def test_replicas_registered_with_their_processes(cluster):
    client, _, pids = cluster
    stats = client.stats()
    assert stats["ready"] and len(set(pids)) == 3
    roles = sorted(r["role"] for r in stats["replicas"])
    assert roles == ["decode", "decode", "prefill"]
    assert all(process_alive(pid) for pid in pids)


def test_greedy_tokens_equal_the_in_process_engine(cluster, reference):
    client, _, _ = cluster
    prompts = [prompt(i, 5 + 7 * i) for i in range(5)]
    outs = client.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == reference(prompts)
    assert all(o.finish_reason == "length" and o.metrics.ttft is not None for o in outs)
    assert [o.prompt_token_ids for o in outs] == prompts


def test_request_migrated_between_decode_processes_keeps_its_tokens(cluster, reference):
    client, _, _ = cluster
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    p = prompt(7, 40)
    tokens, dst = stream_and_migrate(client, p, params)
    assert tokens == reference([p], params)[0]
    stats = client.stats()
    assert stats["counters"]["migrations_committed"] >= 1, stats["migrations"]
    last = stats["migrations"][-1]
    assert last["outcome"] == "committed" and last["bytes"] > 0 and last["dst"] == dst
    stats = settled(client)  # page accounting balances on both decode processes
    assert all(r["kv_pages_used"] == 0 for r in stats["replicas"]), stats["replicas"]


def test_bad_requests_get_invalid_argument_and_clear_messages(cluster):
    client, _, _ = cluster
    with pytest.raises(ValueError, match="outside the vocabulary"):
        client.generate([[5, 6, 100000]], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        client.generate([prompt(1, 300)], GREEDY)
    stub = pb_grpc.SchedulerStub(grpc.insecure_channel(client.address))
    bad = pb.GenerateRequest(prompt_ids=[5, 6], params=pb.SamplingParams(
        temperature=1.0, top_p=0.0, max_tokens=4))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(bad, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_p" in err.value.details()
    with pytest.raises(ValueError, match="no tokenizer"):
        client.generate(["text needs a tokenizer"], GREEDY)


def test_cancelled_stream_frees_its_pages_everywhere(cluster):
    client, _, _ = cluster
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    stream = client.stream(prompt(3, 30), params)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()  # the client goes away mid-stream
    stats = settled(client)
    assert stats["running"] == 0 and stats["waiting"] == 0, stats
    assert all(r["kv_pages_used"] == 0 for r in stats["replicas"]), stats["replicas"]


def test_concurrent_clients_all_complete(cluster, reference):
    client, _, _ = cluster
    prompts = [prompt(20 + i, 8 + i) for i in range(12)]
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        results[i] = client.generate([prompts[i]], GREEDY)[0].token_ids

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[i] for i in range(len(prompts))] == reference(prompts)


def test_http_front_door_of_the_scheduler_process(cluster, reference):
    """The scheduler process also serves the OpenAI-compatible API, /health, /cluster and
    /metrics, over the same core as gRPC."""
    import httpx

    client, _, _ = cluster
    base = f"http://127.0.0.1:{client.http_port}"
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    state = httpx.get(f"{base}/cluster", timeout=30).json()
    assert sorted(r["role"] for r in state["replicas"]) == ["decode", "decode", "prefill"]
    p = prompt(40, 9)
    r = httpx.post(f"{base}/v1/completions", timeout=120, json={
        "model": "random:tiny", "prompt": p, "max_tokens": 12, "temperature": 0.0,
        "ignore_eos": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
    assert body["choices"][0]["finish_reason"] == "length"
    bad = httpx.post(f"{base}/v1/completions", timeout=30, json={
        "model": "random:tiny", "prompt": p, "max_tokens": 12, "top_p": 0.0})
    assert bad.status_code == 400 and "top_p" in bad.text
    metrics = httpx.get(f"{base}/metrics", timeout=30).text
    assert "ares:generation_tokens_total" in metrics


def test_decode_process_killed_mid_stream_loses_nothing(cluster, reference):
    """SIGKILL the decode process a request runs on: the scheduler sees its event stream
    break, recomputes the request on the other decode process from prompt + tokens so far,
    and the client's stream goes on: greedy tokens identical to an unfaulted run, none
    repeated or missing. (Last in this module: it takes a replica away.)"""
    import os
    import signal

    client, _, _ = cluster
    params = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)
    p = prompt(77, 20)
    tokens, killed = [], []
    for chunk in client.stream(p, params):
        if chunk.token_id >= 0:
            tokens.append(chunk.token_id)
        if len(tokens) == 15 and not killed:
            (victim,) = [r for r in client.stats()["replicas"]
                         if r["role"] == "decode" and r["running"] == 1]
            os.kill(victim["process_id"], signal.SIGKILL)
            killed.append(victim)
    assert killed and tokens == reference([p], params)[0]
    stats = client.stats()
    assert stats["counters"]["replica_failures"] == 1
    assert stats["counters"]["recovered_requests"] >= 1
    # The cluster serves on with the processes that are left.
    again = client.generate([prompt(78, 10)], GREEDY)[0]
    assert again.token_ids == reference([prompt(78, 10)])[0]
    assert not process_alive(killed[0]["process_id"])
