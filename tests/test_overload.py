"""A bad day at the doors of a real cluster (``ares-jax serve``: a scheduler with its HTTP
door, 1 prefill + 1 decode replica process of a tiny random model, 4 decode slots, at most 4
waiting requests): overload, per-request deadlines, and malformed gRPC messages to the
scheduler and straight to a replica. One cluster for all of them keeps the suite short; each
test ends with every KV page free and the cluster serving."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_support import settled

from ares_jax.engine.sampling import SamplingParams
from ares_jax.serving import ares_pb2 as pb
from ares_jax.serving import ares_pb2_grpc as pb_grpc
from ares_jax.serving import codec
from ares_jax.serving.local_cluster import LocalCluster, free_port, process_alive

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SLOTS, MAX_WAITING = 4, 4
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


def load_overload_bench():
    sys.path.insert(0, str(BENCH))  # its own ``common`` import
    spec = importlib.util.spec_from_file_location("overload_bench", BENCH / "overload.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cluster():
    local = LocalCluster(
        ["--port", str(free_port()), "--model", "random:tiny", "--prefill-replicas", "1",
         "--decode-replicas", "1", "--predictor", "none", "--num-pages", "128",
         "--max-model-len", "256", "--page-size", "8", "--max-num-seqs", str(SLOTS),
         "--max-waiting", str(MAX_WAITING), "--policy", "least-load",
         "--log-level", "ERROR"], start_timeout_s=300)
    local.url = f"http://127.0.0.1:{local.http_port}"
    # Warm the compiled shapes the tests use, so their timings are serving, not compiling.
    local.client.generate([[5 + i] * (4 + 4 * i) for i in range(SLOTS)],
                          SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    yield local
    local.close()
    assert not [pid for pid in local.pids if process_alive(pid)]


def all_free(local) -> dict:
    stats = settled(local.client)
    assert stats["running"] == 0 and stats["waiting"] == 0, stats
    assert all(r["kv_pages_used"] == 0 for r in stats["replicas"]), stats["replicas"]
    return stats


def serves_normally(local) -> None:
    out = local.client.generate([[7, 8, 9]], SamplingParams(temperature=0.0, max_tokens=5,
                                                             ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert httpx.get(f"{local.url}/health", timeout=30).status_code == 200


def fill_slots(local, n: int = SLOTS) -> list[grpc.Future]:
    """``n`` long gRPC streams occupying decode slots (cancel them when done)."""
    stub = pb_grpc.SchedulerStub(local.client._channel)
    calls = []
    for i in range(n):
        msg = pb.GenerateRequest(prompt_ids=[9 + i] * 8, params=codec.params_to_pb(LONG))
        call = stub.Generate(msg, timeout=120)
        next(call)  # its first token: it is running
        calls.append(call)
    return calls


# ------------------------------------------------------------------ overload


def test_overload_refuses_at_once_and_admitted_latency_stays_bounded(cluster):
    """Arrivals far above what one decode replica serves: the queue stays at its bound, the
    excess is refused with 429 + Retry-After at once, admitted requests finish in bounded
    time, and afterwards the cluster serves as before with every page free."""
    bench = load_overload_bench()
    import asyncio

    t0 = time.perf_counter()
    r = httpx.post(f"{cluster.url}/v1/completions", json=bench.body_for(0, 16, 24), timeout=60)
    unloaded = time.perf_counter() - t0
    assert r.status_code == 200
    out = asyncio.run(bench.open_loop(cluster.url, rate=40, seconds=5, max_tokens=24, seed=3))
    summary = bench.summary(out)
    print(json.dumps({"unloaded_s": unloaded, **summary, "wall_s": time.perf_counter() - t0}))
    assert not summary["errors"], summary
    assert summary["refused"] >= 10 and summary["admitted"] >= SLOTS
    # Refused at once, not queued: far faster than serving (absolute times on a shared
    # 2-core machine swing with its load).
    refusal, admitted = summary["refusal_latency"], summary["admitted_latency"]
    assert refusal["p50_ms"] < admitted["p50_ms"] / 2 and refusal["p99_ms"] < 5000, summary
    assert all(r >= 1 for r in summary["retry_after_s"]) and summary["retry_after_s"]
    # An admitted request waits behind at most MAX_WAITING queued and SLOTS running ones.
    bound = max(10.0, (MAX_WAITING / SLOTS + 2) * 4 * unloaded)
    assert summary["admitted_latency"]["p100_ms"] / 1e3 < bound, (summary, unloaded)
    all_free(cluster)
    serves_normally(cluster)


def test_grpc_overload_is_resource_exhausted_with_a_retry_hint(cluster):
    calls = fill_slots(cluster)
    stub = pb_grpc.SchedulerStub(cluster.client._channel)
    queued, refused = [], []
    try:
        for i in range(MAX_WAITING + 3):
            msg = pb.GenerateRequest(prompt_ids=[20 + i] * 8, params=codec.params_to_pb(LONG))
            call = stub.Generate(msg, timeout=120)
            queued.append(call)
        for call in queued:
            try:
                next(call)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                refused.append(dict(err.trailing_metadata()))
                assert "max_waiting=4" in err.details()
            else:
                pass  # admitted: it got to run after all (a slot freed meanwhile)
    finally:
        for call in calls + queued:
            call.cancel()
    assert len(refused) >= 3 and all(int(m["retry-after"]) >= 1 for m in refused)
    all_free(cluster)


# ------------------------------------------------------------------ deadlines


def test_grpc_deadline_cancels_the_request_everywhere(cluster):
    from ares_jax.client import Client

    with Client(cluster.address, timeout_s=0.8) as hurried:
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError, match="DEADLINE_EXCEEDED"):
            hurried.generate([[11] * 8], LONG)
        assert time.perf_counter() - t0 < 5
    all_free(cluster)
    serves_normally(cluster)


def test_http_timeout_is_504_before_a_token_and_an_error_event_after(cluster):
    before = cluster.client.stats()["counters"].get("requests_past_deadline", 0)
    body = {"prompt": [12] * 8, "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    # Timeouts as fractions of how long the request takes here (machines differ tenfold).
    t0 = time.perf_counter()
    assert httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=60).status_code == 200
    full = time.perf_counter() - t0
    # Running past its timeout, non-streaming: 504 with OpenAI's error JSON.
    r = httpx.post(f"{cluster.url}/v1/completions", json={**body, "timeout": 0.3 * full},
                   timeout=60)
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["code"] == "deadline_exceeded" and err["param"] == "timeout"
    assert "deadline exceeded" in err["message"]
    # Streaming: tokens, then an error event, then [DONE]. (logprobs: every token has an
    # event, even one whose text is empty: this model has no tokenizer.)
    with httpx.stream("POST", f"{cluster.url}/v1/completions", timeout=60,
                      json={**body, "timeout": 0.5 * full, "stream": True,
                            "logprobs": 0}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["error"]["code"] == "deadline_exceeded", events[-3:]
    assert len(events) >= 3 and "choices" in json.loads(events[0])  # a token came first
    # Waiting in the queue behind full slots: 504 before any token.
    calls = fill_slots(cluster)
    try:
        t0 = time.perf_counter()
        r = httpx.post(f"{cluster.url}/v1/completions", json={**body, "timeout": 0.4},
                       timeout=60)
        assert r.status_code == 504 and time.perf_counter() - t0 < 3, r.text
    finally:
        for call in calls:
            call.cancel()
    # A bad timeout is a 400 naming it.
    r = httpx.post(f"{cluster.url}/v1/completions", json={**body, "timeout": -1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "timeout"
    stats = all_free(cluster)
    assert stats["counters"]["requests_past_deadline"] - before == 3
    metrics = httpx.get(f"{cluster.url}/metrics", timeout=30).text
    assert 'finished_reason="deadline"' in metrics


# ------------------------------------------------------------------ malformed gRPC


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(st.integers(-2**31, 2**31 - 1), max_size=6),
       temperature=st.floats(allow_nan=True, allow_infinity=True, width=64),
       top_p=st.floats(-1, 2), top_k=st.integers(-5, 2**31 - 1),
       max_tokens=st.integers(-3, 4), seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
       logprobs=st.one_of(st.none(), st.integers(-2, 40)),
       stop_ids=st.lists(st.integers(-5, 1000), max_size=2),
       rid=st.sampled_from(["", "r", "x" * 300]))
def test_generate_fuzz_is_ok_or_invalid_argument(cluster, prompt, temperature, top_p, top_k,
                                                 max_tokens, seed, logprobs, stop_ids, rid):
    params = pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                               max_tokens=max_tokens, stop_token_ids=stop_ids)
    if seed is not None:
        params.seed = seed
    if logprobs is not None:
        params.logprobs = logprobs
    stub = pb_grpc.SchedulerStub(cluster.client._channel)
    msg = pb.GenerateRequest(prompt_ids=prompt, params=params, request_id=rid)
    try:
        last = list(stub.Generate(msg, timeout=60))[-1]
        assert last.finished and last.finish_reason in ("length", "stop"), last
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert err.details()


def _ticket(shape, dtype="float32") -> bytes:
    from ares_jax.transfer.kv_transport import KvTicket

    return KvTicket(uuid=1, address="127.0.0.1:1", kind="jax", shape=tuple(shape), dtype=dtype,
                    mesh_shape=(1,), mesh_axes=("x",), spec=(None,) * len(shape), shards=(),
                    ttl_s=1.0).to_bytes()


def test_malformed_replica_commands_get_invalid_argument_and_leak_nothing(cluster):
    stats = cluster.client.stats()
    decode = next(r for r in stats["replicas"] if r["role"] == "decode")
    rid = decode["replica_id"]
    channel = grpc.insecure_channel(decode["address"])
    stub = pb_grpc.ReplicaStub(channel)
    good_params = codec.params_to_pb(SamplingParams(max_tokens=4))
    req = pb.Request(request_id="fz", prompt_ids=[5, 6, 7], params=good_params)
    # The tiny model's pages: 2 layers, page size 8, 2 KV heads of 16, float32.
    good_shape = (2, 1, 8, 2, 16)

    def block(tickets, chunks, pages, rid_="fz"):
        return pb.KvBlock(source=0, request_id=rid_, pages=pages, tickets=tickets,
                          chunk_pages=chunks)

    def insert(kv):
        return pb.InsertRequest(replica_id=rid, request=req, prefilled=pb.Prefilled(
            replica_id=0, request_id="fz", first=pb.TokenInfo(token_id=5), num_tokens=3, kv=kv))

    cases = [
        (stub.Reserve, pb.ReserveRequest(replica_id=rid, request_id="fz", pages=-5),
         "ReserveRequest.pages"),
        (stub.Reserve, pb.ReserveRequest(replica_id=rid, request_id="", pages=1),
         "ReserveRequest.request_id"),
        (stub.Export, pb.ExportRequest(replica_id=rid, request_id="fz", start=4, end=1),
         "start <= end"),
        (stub.Prefill, pb.PrefillRequest(replica_id=rid, requests=[pb.Request(
            request_id="fz", params=good_params)]), "Request.prompt_ids"),
        (stub.Prefill, pb.PrefillRequest(replica_id=rid, requests=[pb.Request(
            request_id="fz", prompt_ids=[1, -4], params=good_params)]), "negative"),
        (stub.Prefill, pb.PrefillRequest(replica_id=rid, requests=[pb.Request(
            request_id="fz", prompt_ids=[1])]), "top_p"),
        (stub.Insert, insert(block([b"not json"], [1], 1)), "is not a KV ticket"),
        (stub.Insert, insert(block([_ticket((2, 1, 8, 4, 16))], [1], 1)), "this pool's are"),
        (stub.Insert, insert(block([_ticket(good_shape, "int8")], [1], 1)), "dtype int8"),
        (stub.Insert, insert(block([_ticket(good_shape)], [1], 3)), "add up to 1 pages"),
        (stub.Insert, insert(block([_ticket(good_shape)] * 2, [1], 1)), "2 tickets for 1"),
        (stub.Insert, insert(None), "prefilled.kv is missing"),
        (stub.ImportKv, pb.ImportRequest(replica_id=rid, request_id="fz", start=0, block=block(
            [_ticket((2, 1, 8, 2))], [1], 1)), "has shape"),
        (stub.ImportKv, pb.ImportRequest(replica_id=rid, request_id="fz", start=-1,
                                         block=block([], [], 0)), "ImportRequest.start"),
        (stub.ImportKv, pb.ImportRequest(replica_id=rid, request_id="fz", block=block(
            [_ticket(good_shape)], [1], 1, rid_="other")), "block.request_id"),
        (stub.Adopt, pb.AdoptRequest(replica_id=rid, request=req, state=pb.Detached(
            request_id="fz", num_cached=0)), "Detached.num_cached"),
    ]
    try:
        for method, msg, words in cases:
            with pytest.raises(grpc.RpcError) as err:
                method(msg, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert words in err.value.details(), (words, err.value.details())
        # A replica id the process does not host: a failed Ack that says so.
        ack = stub.Reserve(pb.ReserveRequest(replica_id=99, request_id="fz", pages=1),
                           timeout=30)
        assert not ack.ok and "no replica 99" in ack.error
        # In a batch, each bad command fails alone; the good one still runs.
        acks = stub.Commands(pb.CommandBatch(commands=[
            pb.Command(prefill=cases[3][1]),
            pb.Command(release=pb.RequestRef(replica_id=rid, request_id="nobody")),
            pb.Command(insert=cases[6][1])]), timeout=30).acks
        assert [a.ok for a in acks] == [False, True, False]
        assert acks[0].error.startswith("INVALID_ARGUMENT: Request.prompt_ids")
        assert "is not a KV ticket" in acks[2].error
        load = stub.GetLoad(pb.RequestRef(replica_id=rid), timeout=30)
        assert load.used_pages == 0 and load.reserved_pages == 0 and not load.request_ids
    finally:
        channel.close()
    all_free(cluster)
    serves_normally(cluster)


def test_concurrent_load_and_bad_input_leave_the_processes_up(cluster):
    """Bad HTTP bodies while real requests run: precise 4xx, no 5xx, the processes stay."""
    done: list[int] = []

    def good() -> None:
        r = httpx.post(f"{cluster.url}/v1/completions", timeout=60, json={
            "prompt": [30] * 8, "max_tokens": 16, "ignore_eos": True})
        done.append(r.status_code)

    threads = [threading.Thread(target=good) for _ in range(3)]
    for t in threads:
        t.start()
    bad = ["{", "[]", '{"prompt": 5}', '{"prompt": [1e9]}', '{"prompt": [[]]}',
           '{"prompt": [-1], "max_tokens": 2}', '{"prompt": "x", "max_tokens": "many"}',
           '{"prompt": [1], "max_tokens": 100000}', '{"prompt": [1], "temperature": -1}',
           '{"prompt": [1], "stop_token_ids": [99999]}', '{"messages": []}']
    for body in bad:
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = httpx.post(cluster.url + path, content=body, timeout=30,
                           headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
            assert r.json()["error"]["message"]
    for t in threads:
        t.join(60)
    assert done == [200, 200, 200]
    all_free(cluster)
    assert all(process_alive(pid) for pid in cluster.pids)
