"""Replay a real request stream through the in-process cluster under each policy, side by side.

Arrivals are counted in loop iterations (a Poisson process over iterations), so every policy
sees the same stream whatever the machine's speed. Sampling is seeded per request and the engine
is batch invariant, so each request produces the same tokens under every policy: only where and
when it runs differs.

Two TPOT views are reported. *Wall* TPOT is what a client of this single process sees: the
replicas step one after another, so it sums over replicas. *Replica* TPOT counts only the step
time of the replica the request was on (plus migration stalls), i.e. what it would see if each
replica had its own accelerator, which is the deployment ARES targets.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ares_jax.cluster.build import build_cluster
from ares_jax.cluster.config import ClusterConfig
from ares_jax.cluster.local import ServingLoop
from ares_jax.config import config
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig, Request
from ares_jax.model.loader import LoadedModel
from ares_jax.model.tokenizer import Tokenizer


@config
class StreamConfig:
    num_requests: int = 24
    mean_arrival_iters: float = 2.0  # mean gap between arrivals, in loop iterations
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    max_prompt_tokens: int = 256
    seed: int = 0


@dataclasses.dataclass
class Arrival:
    iteration: int
    request: Request
    text: str


def sharegpt_stream(tok: Tokenizer | None, stream: StreamConfig) -> list[Arrival]:
    """First human turns of ShareGPT with the chat template, in file order, Poisson arrivals."""
    from ares_jax.datasets import sharegpt_first_turns

    if tok is None:
        raise ValueError("the request stream needs a model with a tokenizer")
    rng = np.random.default_rng(stream.seed)
    arrivals: list[Arrival] = []
    at = 0.0
    for text in sharegpt_first_turns():
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
        if len(ids) > stream.max_prompt_tokens:
            continue
        i = len(arrivals)
        params = SamplingParams(temperature=stream.temperature, top_p=stream.top_p,
                                max_tokens=stream.max_tokens, seed=stream.seed * 100_003 + i)
        arrivals.append(Arrival(int(at), Request(request_id=f"s{i}", prompt_ids=ids,
                                                  params=params, index=i), text))
        at += rng.exponential(stream.mean_arrival_iters)
        if len(arrivals) == stream.num_requests:
            break
    return arrivals


def replay(loop: ServingLoop, arrivals: Sequence[Arrival], desc: str = "") -> dict:
    """Feed ``arrivals`` into ``loop`` at their iterations and run it dry; return metrics."""
    pending = sorted(arrivals, key=lambda a: a.iteration)
    added_at: dict[str, float] = {}
    started = time.perf_counter()
    bar = tqdm(total=len(pending), desc=desc or loop.cluster.policy, unit="req", leave=False)
    it = 0
    cursor = 0
    while cursor < len(pending) or loop.has_work:
        while cursor < len(pending) and pending[cursor].iteration <= it:
            a = pending[cursor]
            a.request.arrival_time = time.perf_counter()
            added_at[a.request.request_id] = a.request.arrival_time
            loop.add_request(dataclasses.replace(a.request, resumed_ids=[]), a.text)
            cursor += 1
        before = len(loop.finished)
        loop.step()
        bar.update(len(loop.finished) - before)
        it += 1
    bar.close()
    wall = time.perf_counter() - started
    loop.check_no_leaks()
    return summarize(loop, [a.request.request_id for a in arrivals], wall)


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarize(loop: ServingLoop, request_ids: Sequence[str], wall_s: float) -> dict:
    trackers = [loop.finished[rid] for rid in request_ids]
    ttft = [t.metrics.ttft for t in trackers if t.metrics.ttft is not None]
    wall_tpot = [t.metrics.tpot for t in trackers if t.metrics.tpot is not None]
    replica_tpot = [loop.replica_time[t.request.request_id] / (len(t.token_ids) - 1)
                    for t in trackers if len(t.token_ids) > 1]
    tokens = sum(len(t.token_ids) for t in trackers)
    ms = lambda xs, q: round(1e3 * _pct(xs, q), 2)  # noqa: E731
    return {
        "policy": loop.cluster.policy,
        "dispatch": loop.cluster.dispatch_policy or loop.cluster.policy,
        "requests": len(trackers),
        "output_tokens": tokens,
        "replica_tpot_ms_p50": ms(replica_tpot, 50),
        "replica_tpot_ms_p99": ms(replica_tpot, 99),
        "wall_tpot_ms_p50": ms(wall_tpot, 50),
        "wall_tpot_ms_p99": ms(wall_tpot, 99),
        "ttft_ms_p50": ms(ttft, 50),
        "ttft_ms_p99": ms(ttft, 99),
        "throughput_tok_s": round(tokens / wall_s, 1),
        "wall_s": round(wall_s, 1),
        "preemptions": sum(t.metrics.num_preemptions for t in trackers),
        "replica_busy_s": [round(s, 2) for s in loop.step_seconds],
        **loop.stats(),
    }


def compare(model: LoadedModel, cluster: ClusterConfig, engine: EngineConfig,
            stream: StreamConfig, policies: Sequence[tuple[str, str | None]],
            make_head: Callable[[], tuple | None] = lambda: None,
            warmup: bool = True) -> list[dict]:
    """Replay one stream under each ``(policy, dispatch_policy)``; the same tokens come out."""
    variants = [(f"{policy}/{dispatch or policy}",
                 dataclasses.replace(cluster, policy=policy, dispatch_policy=dispatch))
                for policy, dispatch in policies]
    return compare_configs(model, variants, engine, sharegpt_stream(model.tokenizer, stream),
                           make_head, warmup)


def compare_configs(model: LoadedModel, variants: Sequence[tuple[str, ClusterConfig]],
                    engine: EngineConfig, arrivals: Sequence[Arrival],
                    make_head: Callable[[], tuple | None] = lambda: None,
                    warmup: bool = True) -> list[dict]:
    """Replay ``arrivals`` on a fresh cluster per ``(label, config)``, in order, after an
    optional warm-up replay (compiling every bucket the stream reaches, so no variant pays for
    compilation). Every variant must produce the same tokens."""
    if warmup:
        head = make_head()
        replay(build_cluster(model, variants[0][1], engine, head=head, prefill_head=head),
               arrivals, desc="warm-up")
    results = []
    outputs: list[dict[str, list[int]]] = []
    for label, cfg in variants:
        head = make_head()
        loop = build_cluster(model, cfg, engine, head=head, prefill_head=head)
        results.append(replay(loop, arrivals, desc=label))
        outputs.append({rid: t.token_ids for rid, t in loop.finished.items()})
    for a, b in itertools.pairwise(outputs):
        if a != b:
            raise AssertionError("policies produced different tokens for the same stream")
    return results
