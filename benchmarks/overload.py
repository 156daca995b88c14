"""Overload: twice the sustainable request rate for a minute, then recovery.

Starts ``ares-jax serve`` (1 prefill + N decode replica processes of a model, a bounded
waiting queue) unless ``--url`` names a running server, then, through the HTTP front door
(``/v1/completions``, non-streaming, fixed output length):

1. **calibrate**: a closed loop with as many clients as the decode side has slots measures
   the sustainable request rate (completions per second) and the unloaded latency;
2. **overload**: Poisson arrivals at ``--factor`` x that rate for ``--seconds``; a refused
   request (429) is counted with its ``Retry-After``, not retried;
3. **recovery**: arrivals drop to half the sustainable rate; recovery time is from the drop
   until the first request after which every later request is admitted and served within
   ``--recovered-factor`` x the unloaded latency.

Prints one JSON object: admitted-request latency percentiles, refused count and refusal
latency, Retry-After values, errors (any status other than 200/429), recovery time.

    .venv/bin/python benchmarks/overload.py --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import time

import httpx
import numpy as np
from common import log


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outcome:
    sent_at: float  # seconds since the phase began
    status: int  # HTTP status, or 0 when the request failed without one
    latency_s: float
    retry_after: int | None = None
    error: str | None = None


async def _one(client: httpx.AsyncClient, url: str, body: dict, t0: float) -> Outcome:
    sent = time.perf_counter()
    try:
        r = await client.post(f"{url}/v1/completions", json=body)
    except httpx.HTTPError as err:
        return Outcome(sent_at=sent - t0, status=0, latency_s=time.perf_counter() - sent,
                       error=f"{type(err).__name__}: {err}")
    retry = r.headers.get("retry-after")
    return Outcome(sent_at=sent - t0, status=r.status_code,
                   latency_s=time.perf_counter() - sent,
                   retry_after=int(retry) if retry is not None else None,
                   error=None if r.status_code in (200, 429) else r.text[:300])


def body_for(i: int, prompt_len: int, max_tokens: int, vocab: int = 500) -> dict:
    rng = random.Random(i)
    return {"prompt": [rng.randrange(4, vocab) for _ in range(prompt_len)],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


async def open_loop(url: str, *, rate: float, seconds: float, prompt_len: int = 16,
                    max_tokens: int = 32, seed: int = 0, start_index: int = 0
                    ) -> list[Outcome]:
    """Poisson arrivals at ``rate`` per second for ``seconds``; waits for every answer."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        tasks, at, i = [], 0.0, start_index
        while True:
            at += rng.expovariate(rate)
            if at >= seconds:
                break
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks.append(asyncio.ensure_future(
                _one(client, url, body_for(i, prompt_len, max_tokens), t0)))
            i += 1
        return list(await asyncio.gather(*tasks))


async def closed_loop(url: str, *, clients: int, seconds: float, prompt_len: int = 16,
                      max_tokens: int = 32) -> list[Outcome]:
    """``clients`` clients, each sending its next request when the last one is answered."""
    async with httpx.AsyncClient(timeout=300) as client:
        t0 = time.perf_counter()

        async def worker(w: int) -> list[Outcome]:
            out, i = [], 0
            while time.perf_counter() - t0 < seconds:
                out.append(await _one(client, url, body_for(10_000 * w + i, prompt_len,
                                                             max_tokens), t0))
                i += 1
            return out

        return [o for part in await asyncio.gather(*map(worker, range(clients))) for o in part]


def summary(outcomes: list[Outcome]) -> dict:
    """Counts and latency percentiles (ms) of admitted and of refused requests."""
    ok = np.array([o.latency_s for o in outcomes if o.status == 200]) * 1e3
    refused = [o for o in outcomes if o.status == 429]
    ref_lat = np.array([o.latency_s for o in refused]) * 1e3

    def pct(a: np.ndarray) -> dict:
        if not len(a):
            return {}
        return {f"p{q}_ms": round(float(np.percentile(a, q)), 1) for q in (50, 90, 99, 100)}

    return {"sent": len(outcomes), "admitted": int(len(ok)), "refused": len(refused),
            "errors": [o.error or str(o.status) for o in outcomes
                       if o.status not in (200, 429)][:10],
            "admitted_latency": pct(ok), "refusal_latency": pct(ref_lat),
            "retry_after_s": sorted({o.retry_after for o in refused
                                     if o.retry_after is not None})}


def recovery_s(outcomes: list[Outcome], bound_s: float) -> float | None:
    """Send time of the first request after which every request was admitted within
    ``bound_s``; None if the phase never got there."""
    good_from = None
    for o in sorted(outcomes, key=lambda o: o.sent_at):
        if o.status == 200 and o.latency_s <= bound_s:
            good_from = o.sent_at if good_from is None else good_from
        else:
            good_from = None
    return None if good_from is None else round(good_from, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", help="a running server; default: start ares-jax serve")
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--decode-replicas", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-waiting", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--calibrate-seconds", type=float, default=20.0)
    ap.add_argument("--recovery-seconds", type=float, default=20.0)
    ap.add_argument("--recovered-factor", type=float, default=1.5)
    args = ap.parse_args()
    cluster = None
    url = args.url
    if url is None:
        from ares_jax.serving.local_cluster import LocalCluster, free_port

        port = free_port()
        cluster = LocalCluster([
            "--model", args.model, "--prefill-replicas", "1",
            "--decode-replicas", str(args.decode_replicas), "--predictor", "none",
            "--max-num-seqs", str(args.max_num_seqs), "--max-waiting", str(args.max_waiting),
            "--max-model-len", "256", "--page-size", "8", "--num-pages", "256",
            "--policy", "least-load", "--port", str(port), "--log-level", "WARNING"])
        url = f"http://127.0.0.1:{port}"
    try:
        kw = {"prompt_len": args.prompt_len, "max_tokens": args.max_tokens}
        slots = args.decode_replicas * args.max_num_seqs
        log("warm-up")
        asyncio.run(closed_loop(url, clients=slots, seconds=5, **kw))
        log(f"calibrating: {slots} closed-loop clients for {args.calibrate_seconds} s")
        cal = asyncio.run(closed_loop(url, clients=slots, seconds=args.calibrate_seconds, **kw))
        done = [o for o in cal if o.status == 200]
        rate = len(done) / args.calibrate_seconds
        unloaded = float(np.median([o.latency_s for o in done]))
        log(f"sustainable ~{rate:.2f} req/s, median latency {unloaded * 1e3:.0f} ms; "
            f"overload at {args.factor * rate:.2f} req/s for {args.seconds} s")
        over = asyncio.run(open_loop(url, rate=args.factor * rate, seconds=args.seconds,
                                     seed=1, **kw))
        log("recovery at half the sustainable rate")
        rec = asyncio.run(open_loop(url, rate=rate / 2, seconds=args.recovery_seconds, seed=2,
                                    start_index=1_000_000, **kw))
        health = httpx.get(f"{url}/health", timeout=30).status_code
        result = {
            "benchmark": "overload", "model": args.model,
            "decode_replicas": args.decode_replicas, "max_num_seqs": args.max_num_seqs,
            "max_waiting": args.max_waiting, "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "sustainable_req_per_s": round(rate, 3),
            "unloaded_median_latency_ms": round(unloaded * 1e3, 1),
            "overload": {"factor": args.factor, "rate_req_per_s": round(args.factor * rate, 3),
                         "seconds": args.seconds, **summary(over)},
            "recovery": {"rate_req_per_s": round(rate / 2, 3), **summary(rec),
                         "recovered_after_s": recovery_s(
                             rec, args.recovered_factor * unloaded)},
            "health_after": health,
        }
        print(json.dumps(result))
    finally:
        if cluster is not None:
            cluster.close()


if __name__ == "__main__":
    main()
