"""Fuzzing the HTTP door (hypothesis): malformed JSON, wrong types, out-of-range parameters
and huge prompts to both OpenAI endpoints. Every answer is a 200 or a precise 4xx in OpenAI's
error JSON (never a 5xx), and every request the server started on the backend ended, finished
or aborted: nothing is left behind. The backend is a small recording one (no model): it is
the door's parsing and validation under test; ``test_overload.py`` sends bad bodies to a real
cluster."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ares_jax.engine.outputs import RequestMetrics, RequestOutput, StreamChunk
from ares_jax.frontend import HTTPServerThread


class RecordingBackend:
    """Serves ``max_tokens`` tokens of id 7 per request and records which requests were
    started and which ended (finished or aborted)."""

    model_name = "fuzz"
    max_model_len = 128
    tokenizer = None
    vocab_size = 100

    def __init__(self) -> None:
        self.started: set[str] = set()
        self.ended: set[str] = set()
        self.aborted: set[str] = set()

    async def generate(self, request_id, prompt_ids, params, prompt_text=None, *,
                       deadline=None):
        self.started.add(request_id)
        try:
            n = params.max_tokens
            for i in range(n):
                done = i == n - 1
                out = RequestOutput(request_id=request_id, prompt=prompt_text,
                                    prompt_token_ids=list(prompt_ids), text="",
                                    token_ids=[7] * n, logprobs=None, finish_reason="length",
                                    metrics=RequestMetrics(arrival_time=0.0)) if done else None
                yield StreamChunk(request_id=request_id, index=0, token_id=7, text_delta="",
                                  finished=done, finish_reason="length" if done else None,
                                  output=out)
                await asyncio.sleep(0)
        finally:
            self.ended.add(request_id)

    async def abort(self, request_id):
        self.aborted.add(request_id)

    def health(self):
        return True, {}

    def cluster_state(self):
        return {"time": 0.0, "policy": "x", "waiting": 0, "running": 0, "replicas": [],
                "migrations": [], "counters": {}}


@pytest.fixture(scope="module")
def door():
    backend = RecordingBackend()
    with HTTPServerThread(backend) as server, httpx.Client(base_url=server.url,
                                                           timeout=30) as http:
        yield http, backend
    assert backend.started == backend.ended, backend.started - backend.ended


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)
TOKENS = st.lists(st.integers(-3, 2**40), max_size=6)
FIELDS = {
    "prompt": st.one_of(st.text(max_size=20), TOKENS, st.lists(TOKENS, max_size=3), JSON),
    "messages": st.one_of(
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", ""]),
                                        "content": st.one_of(st.text(max_size=10), JSON)}),
                 max_size=3), JSON),
    "max_tokens": st.one_of(st.integers(-5, 10**12), JSON),
    "max_completion_tokens": st.one_of(st.integers(-5, 300), JSON),
    "temperature": st.one_of(st.floats(), JSON),
    "top_p": st.one_of(st.floats(-1, 2), JSON),
    "top_k": st.one_of(st.integers(-3, 2**40), JSON),
    "seed": st.one_of(st.integers(-2**70, 2**70), JSON),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=3), max_size=3), JSON),
    "stop_token_ids": st.one_of(TOKENS, JSON),
    "n": st.one_of(st.integers(-2, 3), JSON),
    "stream": st.one_of(st.booleans(), JSON),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), JSON),
    "logprobs": st.one_of(st.integers(-2, 30), st.booleans(), JSON),
    "top_logprobs": st.one_of(st.integers(-2, 30), JSON),
    "min_tokens": st.one_of(st.integers(-2, 50), JSON),
    "ignore_eos": st.one_of(st.booleans(), JSON),
    "timeout": st.one_of(st.floats(), JSON),
    "model": st.one_of(st.sampled_from(["fuzz", "other"]), JSON),
    "echo": st.one_of(st.booleans(), JSON),
    "presence_penalty": st.one_of(st.floats(-3, 3), JSON),
    "logit_bias": JSON,
    "response_format": JSON,
}
BODIES = st.fixed_dictionaries({}, optional=FIELDS)


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code == 200:
        return
    err = r.json()["error"]  # OpenAI's error JSON, with a message that says what is wrong
    assert err["message"] and err["type"], err
    assert r.status_code in (400, 404, 422), r.status_code


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=BODIES)
def test_json_bodies_get_200_or_a_precise_4xx(door, path, body):
    http, _ = door
    check(http.post(path, content=json.dumps(body, allow_nan=True),
                    headers={"content-type": "application/json"}))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       raw=st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode)),
       ctype=st.sampled_from(["application/json", "text/plain", ""]))
def test_garbage_bytes_get_a_4xx(door, path, raw, ctype):
    http, _ = door
    r = http.post(path, content=raw, headers={"content-type": ctype} if ctype else {})
    assert 400 <= r.status_code < 500 or r.status_code == 200, (r.status_code, r.text)
    if r.status_code != 200:
        assert r.json()["error"]["message"]


def test_huge_prompts_are_refused_by_length_not_by_a_crash(door):
    http, backend = door
    before = set(backend.started)
    for prompt in ([1] * 100_000, "word " * 100_000, [[1] * 50_000, [2] * 50_000]):
        r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" or "tokenizer" in err["message"], err
    assert backend.started == before  # refused before anything started


def test_streams_cut_by_the_client_are_aborted(door):
    http, backend = door
    for _ in range(5):
        with http.stream("POST", "/v1/completions",
                         json={"prompt": [1, 2], "max_tokens": 100, "stream": True,
                               "logprobs": 0}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
    # The server notices each disconnect and closes (aborts) the request.
    import time

    deadline = time.monotonic() + 10
    while backend.started != backend.ended and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.started == backend.ended
