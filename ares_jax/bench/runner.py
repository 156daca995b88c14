"""``run_benchmark(config) -> report``: build the workload, release requests on the arrival
schedule, stream them concurrently and summarise."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from ares_jax.bench.arrivals import arrival_offsets, trace_offsets
from ares_jax.bench.client import request_body, resolve_model, stream_request
from ares_jax.bench.config import BenchConfig
from ares_jax.bench.datasets import SampleRequest, Workload, build_workload
from ares_jax.bench.records import RequestRecord
from ares_jax.bench.report import compute_report


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchResult:
    report: dict[str, Any]
    records: tuple[RequestRecord, ...]


def run_benchmark(config: BenchConfig, *, requests: Sequence[SampleRequest] | None = None,
                  arrival_s: Sequence[float] | None = None) -> dict[str, Any]:
    """Run one benchmark and return its report (see ``docs/BENCH_SERVE.md`` for the keys).

    ``requests`` replaces the dataset (then ``arrival_s``, if given, replaces the arrival
    process with explicit send offsets). Raises ``BenchError`` when the server cannot be used
    at all; failed requests are counted in the report instead.
    """
    return run_benchmark_detailed(config, requests=requests, arrival_s=arrival_s).report


def run_benchmark_detailed(config: BenchConfig, *,
                           requests: Sequence[SampleRequest] | None = None,
                           arrival_s: Sequence[float] | None = None) -> BenchResult:
    """``run_benchmark`` plus the per-request records."""
    return asyncio.run(arun_benchmark(config, requests=requests, arrival_s=arrival_s))


def _base_url(cfg: BenchConfig) -> tuple[str, list[str]]:
    base = cfg.base_url.rstrip("/")
    if base.endswith("/v1"):  # a common slip: the endpoint already carries /v1
        return base[:-3], [f"--base-url {cfg.base_url} ends in /v1; using {base[:-3]}"]
    return base, []


def _workload(cfg: BenchConfig, requests: Sequence[SampleRequest] | None,
              arrival_s: Sequence[float] | None) -> tuple[Workload, str]:
    seeds = np.random.SeedSequence(cfg.seed).spawn(2)
    if requests is not None:
        wl = Workload(requests=tuple(requests),
                      arrival_s=None if arrival_s is None else tuple(arrival_s))
        tokenizer = "given"
    else:
        from ares_jax.bench.prompts import load_prompt_source

        source = load_prompt_source(cfg.tokenizer)
        wl = build_workload(cfg, source, np.random.default_rng(seeds[0]))
        tokenizer = source.name
    if wl.arrival_s is None:
        offsets = arrival_offsets(len(wl.requests), cfg.request_rate, cfg.burstiness,
                                  np.random.default_rng(seeds[1]))
        wl = dataclasses.replace(wl, arrival_s=tuple(float(x) for x in offsets))
    elif requests is not None:
        if len(wl.arrival_s) != len(wl.requests):
            raise ValueError(f"{len(wl.arrival_s)} arrival times for {len(wl.requests)} requests")
        wl = dataclasses.replace(wl, arrival_s=tuple(float(x) for x in trace_offsets(
            np.asarray(wl.arrival_s))))
    return wl, tokenizer


async def arun_benchmark(config: BenchConfig, *,
                         requests: Sequence[SampleRequest] | None = None,
                         arrival_s: Sequence[float] | None = None) -> BenchResult:
    """The coroutine behind ``run_benchmark_detailed``, for callers already in an event loop."""
    cfg = config
    base, notes = _base_url(cfg)
    wl, tokenizer = _workload(cfg, requests, arrival_s)
    notes += list(wl.notes)
    assert wl.arrival_s is not None
    headers = {"User-Agent": "ares-jax-bench"}
    api_key = cfg.api_key or os.environ.get("OPENAI_API_KEY")
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    n = len(wl.requests)
    # One connection per stream that can be open at once; a smaller pool would queue requests
    # inside the client and count that wait as server latency.
    pool = min(cfg.max_concurrency or n, n)
    _raise_open_files_limit(pool + 256)
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0, pool=None)
    records = [RequestRecord(index=i, prompt_len=r.prompt_len, max_tokens=r.output_len)
               for i, r in enumerate(wl.requests)]
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model, model_notes = await resolve_model(client, base, cfg, headers)
        notes += model_notes
        url = base + cfg.endpoint
        bodies = [request_body(cfg, model, r) for r in wl.requests]
        progress = _progress(cfg, n)
        semaphore = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        in_flight = 0
        max_in_flight = 0
        t0 = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - t0

        async def one(i: int) -> None:
            nonlocal in_flight, max_in_flight
            async with semaphore or contextlib.nullcontext():
                in_flight += 1
                max_in_flight = max(max_in_flight, in_flight)
                try:
                    await stream_request(client, url, bodies[i], headers, records[i], clock)
                finally:
                    in_flight -= 1
                    if progress is not None:
                        progress.update(1)

        tasks = []
        for i, offset in enumerate(wl.arrival_s):
            wait = offset - clock()
            if wait > 0:
                await asyncio.sleep(wait)
            records[i].scheduled_s = clock()
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        duration = clock()
        if progress is not None:
            progress.close()
    report = compute_report(records, duration, cfg, model=model, max_concurrent=max_in_flight,
                            tokenizer=tokenizer, notes=notes)
    report["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if cfg.plot_dir:
        from ares_jax.bench.plots import write_plots

        report["plots"] = [str(p) for p in write_plots(records, duration, cfg.plot_dir)]
    return BenchResult(report=report, records=tuple(records))


def _raise_open_files_limit(wanted: int) -> None:
    """Lift the soft open-files limit (often 1024) towards the hard one: a thousand requests
    released at once need a thousand sockets."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass  # not POSIX, or not allowed: the OS error, if any, lands on the requests


def _progress(cfg: BenchConfig, n: int):
    if cfg.disable_tqdm:
        return None
    from tqdm import tqdm

    # stderr, so stdout stays one JSON object under --json.
    return tqdm(total=n, desc="requests", unit="req", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if not math.isinf(cfg.request_rate) else 0.1)
