"""The server's mapping of backend outcomes and cluster state, over a scripted backend (no
model, nothing to compile)."""

import httpx
import openai
import pytest
from frontend_support import ScriptedBackend, metric, openai_client, wait_until

from ares_jax.frontend import GenerationBackend, HTTPServerThread


@pytest.fixture(scope="module")
def served():
    backend = ScriptedBackend()
    assert isinstance(backend, GenerationBackend)
    with HTTPServerThread(backend, served_model_name="alias") as server:
        yield server, backend, openai_client(server.url)


def test_served_name_and_backend_name_are_both_accepted(served):
    server, _, client = served
    assert [m.id for m in client.models.list().data] == ["alias"]
    for name in ("alias", "scripted"):
        out = client.completions.create(model=name, prompt=[1, 2], max_tokens=3)
        assert out.choices[0].text == "xxx" and out.usage.completion_tokens == 3
        assert out.model == name


def test_backend_refusals_map_to_statuses(served):
    _, _, client = served
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="alias", prompt=[2], max_tokens=3)
    assert err.value.body["param"] == "top_k"
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model="alias", prompt=[3], max_tokens=3)
    assert err.value.response.headers["retry-after"] == "3"
    # one refused prompt of several refuses the request and aborts the accepted ones
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="alias", prompt=[[5], [3]], max_tokens=3)
    # without a tokenizer: text prompts and chat are refused, token ids are served
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="alias", prompt="text", max_tokens=3)
    assert err.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="alias", messages=[{"role": "user",
                                                                 "content": "hi"}])
    assert err.value.body["param"] == "messages"


def test_refused_multi_prompt_aborts_the_started_one(served):
    _, backend, client = served
    before = len(backend.aborted)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="alias", prompt=[[5], [3]], max_tokens=3)
    wait_until(lambda: len(backend.aborted) > before, 5.0)


def test_backend_failure_mid_stream_ends_the_stream_with_an_error(served):
    server, _, _ = served
    body = {"model": "alias", "prompt": [4], "max_tokens": 5, "stream": True}
    lines = [line for line in httpx.post(server.url + "/v1/completions", json=body).text
             .splitlines() if line.startswith("data:")]
    assert '"error"' in lines[-2] and "went away" in lines[-2]
    assert lines[-1] == "data: [DONE]"


def test_disconnect_calls_abort(served):
    server, backend, _ = served
    before = len(backend.aborted)
    body = {"model": "alias", "prompt": [5], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=10) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i > 4:
                break
    wait_until(lambda: len(backend.aborted) > before, 5.0)


def test_health_follows_the_backend(served):
    server, backend, _ = served
    assert httpx.get(server.url + "/health").status_code == 200
    backend.healthy = False
    try:
        resp = httpx.get(server.url + "/health")
        assert resp.status_code == 503 and resp.json()["status"] == "unavailable"
    finally:
        backend.healthy = True


def _migration(rid, outcome, finished_at, downtime_ms=4.0):
    return {"request_id": rid, "src": 0, "dst": 1, "outcome": outcome, "bytes": 1000,
            "downtime_ms": downtime_ms, "finished_at": finished_at}


def test_metrics_from_cluster_state_and_streams(served):
    server, backend, client = served
    backend.state = {
        "time": 1.0, "policy": "ares", "waiting": 3, "running": 5,
        "replicas": [
            {"replica_id": 0, "role": "decode", "process_id": 1, "address": "a", "healthy": True,
             "running": 4, "kv_pages_used": 50, "kv_pages_free": 150, "kv_pages_total": 200,
             "page_size": 16, "predicted_kv_pages": [[0, 50], [64, 40]]},
            {"replica_id": 1, "role": "decode", "process_id": 2, "address": "b", "healthy": True,
             "running": 1, "kv_pages_used": 0, "kv_pages_free": 200, "kv_pages_total": 200,
             "page_size": 16, "predicted_kv_pages": [[0, 0], [64, 0]]}],
        "migrations": [_migration("r1", "committed", 10.0, 4.0),
                       _migration("r2", "aborted_destination", 11.0, None)],
        "counters": {"migrations_committed": 7, "migrations_aborted": 2,
                     "migration_bytes": 123456, "preemptions": 4, "fallback_dispatches": 1,
                     "migrations_capped": 5, "requests_finished": 10}}
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "ares:num_requests_running") == 5
    assert metric(text, "ares:num_requests_waiting") == 3
    assert metric(text, "ares:kv_cache_usage_perc", replica="0") == 0.25
    assert metric(text, "ares:replica_num_requests_running", replica="0") == 4
    assert metric(text, "ares:migrations_total", outcome="committed") == 7
    assert metric(text, "ares:migrations_total", outcome="aborted") == 2
    assert metric(text, "ares:migration_kv_bytes_total") == 123456
    assert metric(text, "ares:num_preemptions_total") == 4
    assert metric(text, "ares:migrations_capped_total") == 5
    # each committed migration enters the downtime histogram once, however often it is read
    httpx.get(server.url + "/cluster")
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "ares:migration_downtime_seconds_count") == 1
    assert metric(text, "ares:migration_downtime_seconds_sum") == pytest.approx(0.004)
    backend.state = dict(backend.state, migrations=[*backend.state["migrations"],
                                                    _migration("r3", "committed", 12.0, 6.0)])
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "ares:migration_downtime_seconds_count") == 2
    # request metrics: the scripted output has 8 tokens and predictions (1, 9) and (5, 2):
    # true remaining 7 and 3, so errors 2 and 1
    before_err = metric(text, "ares:predictor_abs_error_tokens_sum")
    before_pred = metric(text, "ares:predicted_remaining_tokens_count")
    client.completions.create(model="alias", prompt=[1], max_tokens=8)
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "ares:predictor_abs_error_tokens_sum") == before_err + 3
    assert metric(text, "ares:predicted_remaining_tokens_count") == before_pred + 2
    assert metric(text, "ares:time_to_first_token_seconds_count") >= 1
    assert metric(text, "ares:request_queue_time_seconds_sum") > 0


def test_grafana_dashboard_queries_only_exported_metrics(served):
    import json
    import re
    from pathlib import Path

    server, backend, _ = served
    replica = {"replica_id": 0, "role": "decode", "process_id": 1, "address": "a",
               "healthy": True, "running": 0, "kv_pages_used": 0, "kv_pages_free": 8,
               "kv_pages_total": 8, "page_size": 16, "predicted_kv_pages": [[0, 0]]}
    backend.state = dict(backend.state, replicas=[replica])
    exported = {s.split("{")[0].split(" ")[0] for s in
                httpx.get(server.url + "/metrics").text.splitlines()
                if s and not s.startswith("#")}
    exported |= {"ares:request_success_total"}  # labelled: present once a request finished
    dash = json.loads((Path(__file__).parents[1] / "docs/grafana/ares-jax.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"ares:[a-z0-9_]+", e)}
    assert used and used <= exported, used - exported
    titles = {p["title"] for p in dash["panels"]}
    assert {"KV-cache usage per replica", "Migration downtime",
            "Predictor absolute error"} <= titles


def test_stream_holds_back_a_possible_stop_string(served):
    _, _, client = served
    full = client.completions.create(model="alias", prompt=[6], max_tokens=8, stop=["\n\n"])
    assert full.choices[0].text == "Hello world"
    deltas = [c.choices[0].text for c in client.completions.create(
        model="alias", prompt=[6], max_tokens=8, stop=["\n\n"], stream=True)]
    assert "".join(deltas) == "Hello world" and not any("\n" in d for d in deltas), deltas
