"""The OpenAI-compatible server over LoopBackend on the tiny random model, through the openai
client against a real uvicorn server on a free localhost port."""

import json
import threading

import httpx
import openai
import pytest
from frontend_support import ECFG, idle, metric, openai_client, wait_until, with_tokenizer

from ares_jax.cluster import ServingLoop
from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.frontend import HTTPServerThread, LoopBackend

MODEL = "tiny-random"
CHAT = [{"role": "user", "content": "hello there"}]
# Completion prompts about as long as the chat prompt above with its template, so that every
# test decodes in the same page-table buckets (fewer compilations).
TEXT = "once upon a time there was"


@pytest.fixture(scope="module")
def served(tiny_model):
    model = with_tokenizer(tiny_model)
    loop = ServingLoop(PrefillEngine(model, ECFG),
                       [DecodeEngine(model, ECFG), DecodeEngine(model, ECFG)], model.tokenizer)
    backend = LoopBackend(loop, model_name=MODEL)
    server = HTTPServerThread(backend).start()
    try:
        yield server, backend, loop
    finally:
        server.stop()
        backend.close()
        loop.check_no_leaks()


@pytest.fixture(scope="module")
def client(served):
    return openai_client(served[0].url)


def test_models_health_and_cluster(served, client):
    server, backend, _ = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    state = httpx.get(server.url + "/cluster").json()
    assert set(state) >= {"time", "policy", "waiting", "running", "replicas", "migrations",
                          "counters"}
    decode = [r for r in state["replicas"] if r["role"] == "decode"]
    assert [r["replica_id"] for r in decode] == [0, 1]
    assert [r["role"] for r in state["replicas"]].count("prefill") == 1
    r0 = decode[0]
    assert r0["kv_pages_total"] == ECFG.num_pages - 1 and r0["page_size"] == 8
    assert r0["kv_pages_used"] + r0["kv_pages_free"] == r0["kv_pages_total"]
    assert all(len(p) == 2 for p in r0["predicted_kv_pages"])
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "replicas" in page.text
    assert httpx.get(server.url + "/static/dashboard.js").status_code == 200


def test_chat_non_streaming_and_streaming_agree(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, extra_body={
        "ignore_eos": True})
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    stream = client.chat.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and not any(finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_logprobs_and_max_completion_tokens(client):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 5 and out.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True)


def test_completions_several_prompts_token_ids_and_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=[TEXT, TEXT + " a"], max_tokens=4,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage.completion_tokens == 8 and out.choices[0].logprobs is None
    ids = client.completions.create(model=MODEL, prompt=list(range(5, 25)), max_tokens=3,
                                    temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    assert ids.usage.prompt_tokens == 20 and ids.usage.completion_tokens == 3
    lp = ids.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3 and len(lp.text_offset) == 3
    assert lp.text_offset[0] == 0 and all(len(t) <= 3 for t in lp.top_logprobs)


def test_completions_stream(client):
    chunks = list(client.completions.create(model=MODEL, prompt=TEXT, max_tokens=6,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"
    full = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=6,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=2), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=10_000), "max_tokens"),
    (dict(top_logprobs=3), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=50), "top_logprobs"),
    (dict(extra_body={"min_tokens": 9}, max_tokens=4), "min_tokens"),
    (dict(extra_body={"stop_token_ids": [99999]}), "stop_token_ids"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(messages=[{"role": "user", "content": "x " * 400}]), "messages"),
])
def test_chat_bad_parameters_are_400_naming_the_parameter(client, kwargs, param):
    args = dict(model=MODEL, messages=CHAT, max_tokens=4) | kwargs
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**args)
    assert err.value.status_code == 400
    body = err.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error", body
    assert param.split("_")[0] in body["message"] or "context length" in body["message"]


def test_error_statuses(served, client):
    url = served[0].url
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x" * 600, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=[1, 2, 99999], max_tokens=2)
    assert err.value.body["param"] == "prompt" and "vocabulary" in err.value.body["message"]
    # pydantic's 422 becomes an OpenAI-style 400 naming the field
    bad = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": "hi"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "messages"
    bad = httpx.post(url + "/v1/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_overloaded_is_429_with_retry_after(served, client):
    _, backend, _ = served
    backend.max_waiting = 0  # every submission now finds a full queue
    try:
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    finally:
        backend.max_waiting = 256
    assert err.value.status_code == 429
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert err.value.body["code"] == "rate_limit_exceeded"


def _slow_steps(loop, seconds: float):
    """Slow every decode step so a long request is certainly still running when the client
    leaves (the hook list is read by the loop thread each step)."""
    import time

    hook = lambda idx, out: time.sleep(seconds)  # noqa: E731
    loop.on_step.append(hook)
    return hook


def test_disconnect_mid_stream_aborts_and_frees_pages(served):
    server, backend, loop = served
    before = httpx.get(server.url + "/metrics").text
    aborted0 = metric(before, "ares:request_success_total", finished_reason="abort") \
        if "finished_reason=\"abort\"" in before else 0.0
    hook = _slow_steps(loop, 0.02)
    try:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 200, "stream": True,
                "temperature": 0, "ignore_eos": True}
        with httpx.Client(timeout=60) as http, \
                http.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [line for line, _ in zip(lines, range(8)) if line.startswith("data:")]
            assert got
            # The published state trails the loop by up to one refresh period.
            wait_until(lambda: sum(r["kv_pages_used"]
                                   for r in backend.cluster_state()["replicas"]) > 0, 3.0)
        # the connection is closed here, ~10 tokens into a 200-token request (>= 4 s left)
        state = wait_until(lambda: (s := backend.cluster_state()) and idle(s) and s, 3.0)
    finally:
        loop.on_step.remove(hook)
    assert all(r["kv_pages_free"] == r["kv_pages_total"] for r in state["replicas"])
    after = httpx.get(server.url + "/metrics").text
    assert metric(after, "ares:request_success_total", finished_reason="abort") == aborted0 + 1


def test_disconnect_while_waiting_for_a_full_answer_aborts(served):
    server, backend, loop = served
    hook = _slow_steps(loop, 0.02)
    try:
        body = {"model": MODEL, "prompt": TEXT, "max_tokens": 200, "ignore_eos": True,
                "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)
        wait_until(lambda: idle(backend.cluster_state()), 3.0)
    finally:
        loop.on_step.remove(hook)


def test_concurrent_requests_and_metrics(served, client):
    server, backend, _ = served
    results = []

    def one(i):
        out = client.completions.create(model=MODEL, prompt=f"{TEXT} {i}", max_tokens=5 + i,
                                        temperature=0, extra_body={"ignore_eos": True})
        results.append(out.usage.completion_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [5, 6]
    wait_until(lambda: idle(backend.cluster_state()), 5.0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("ares:time_to_first_token_seconds_count", "ares:e2e_request_latency_seconds_count",
                 "ares:request_queue_time_seconds_count", "ares:inter_token_latency_seconds_count",
                 "ares:prompt_tokens_total", "ares:generation_tokens_total"):
        assert metric(text, name) > 0, name
    assert metric(text, "ares:request_success_total", finished_reason="length") >= 2
    assert metric(text, "ares:num_requests_running") == 0
    assert metric(text, "ares:num_requests_waiting") == 0
    assert metric(text, "ares:kv_cache_usage_perc", replica="0") == 0
    assert metric(text, "ares:kv_cache_usage_perc", replica="1") == 0
    for name in ("ares:num_preemptions_total", "ares:migration_kv_bytes_total"):
        assert metric(text, name) == 0
    assert metric(text, "ares:migrations_total", outcome="committed") == 0
    # the loop has no length head here: no predictions were observed
    assert metric(text, "ares:predictor_abs_error_tokens_count") == 0
    state = json.loads(httpx.get(server.url + "/cluster").text)
    assert state["counters"]["requests_finished"] >= 2


def test_close_ends_open_streams_and_refuses_new_ones(tiny_model):
    import asyncio

    from ares_jax.engine.sampling import SamplingParams
    from ares_jax.frontend import BackendClosed

    model = with_tokenizer(tiny_model)
    loop = ServingLoop(PrefillEngine(model, ECFG), [DecodeEngine(model, ECFG)], model.tokenizer)
    backend = LoopBackend(loop, model_name="closing")
    hook = _slow_steps(loop, 0.02)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        stream = backend.generate("a", list(range(5, 25)), params)
        assert not (await anext(stream)).finished
        closer = threading.Thread(target=backend.close)  # close() joins the loop thread
        closer.start()
        with pytest.raises(BackendClosed):
            async for _ in stream:
                pass
        closer.join()
        with pytest.raises(BackendClosed):
            await anext(backend.generate("b", list(range(5, 25)), params))

    asyncio.run(main())
    loop.on_step.remove(hook)
    assert not backend.health()[0]
    assert loop.decoders[0].num_used_pages == 0 and not loop.trackers


def test_bench_serve_against_our_server_agrees_with_its_records(served):
    """``ares-jax bench serve``'s runner against this server: every request completes, and the
    report's numbers are the ones its per-request records give."""
    from ares_jax.bench import BenchConfig, SampleRequest, run_benchmark_detailed

    server, _, _ = served
    requests = [SampleRequest(prompt=TEXT, prompt_len=6, output_len=6 + i) for i in range(4)]
    result = run_benchmark_detailed(
        BenchConfig(base_url=server.url, temperature=0.0, ignore_eos=True,
                    num_prompts=len(requests), disable_tqdm=True,
                    goodput={"ttft": 60_000.0}),
        requests=requests, arrival_s=[0.0, 0.05, 0.1, 0.15])
    report, records = result.report, result.records
    assert report["completed"] == 4 and report["failed"] == 0
    assert [r.completion_tokens for r in sorted(records, key=lambda r: r.index)] == [6, 7, 8, 9]
    assert report["total_output_tokens"] == 30
    ttfts = sorted(1e3 * r.ttft_s for r in records)
    assert report["median_ttft_ms"] == pytest.approx((ttfts[1] + ttfts[2]) / 2, rel=1e-6)
    assert all(r.ttft_s <= r.e2el_s for r in records)
    assert report["goodput_completed"] == 4  # every TTFT is under a minute
