"""From per-request records to the report: vLLM's metric definitions and result keys
(``docs/BENCH_SERVE.md`` explains each), and the human-readable table."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ares_jax.bench.config import BenchConfig
from ares_jax.bench.records import RequestRecord

MAX_ERRORS_LISTED = 10
_METRIC_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


def percentile_key(p: float) -> str:
    """vLLM's spelling: 99 -> "99", 99.9 -> "99.9"."""
    return str(int(p)) if float(p).is_integer() else str(p)


def latencies_s(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Per-metric samples over the successful requests, in seconds. TPOT has one value per request
    with at least 2 output tokens; ITL one per gap between output chunks of any request."""
    ok = [r for r in records if r.success]
    return {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
        "itl": [g for r in ok for g in r.itls_s],
        "e2el": [r.e2el_s for r in ok if r.e2el_s is not None],
    }


def meets_slos(rec: RequestRecord, slos_ms: Mapping[str, float]) -> bool:
    """DistServe's goodput test as vLLM applies it: a successful request counts when every given
    SLO holds (metric <= SLO). A request with one output token has TPOT 0."""
    if not rec.success:
        return False
    values = {"ttft": rec.ttft_s, "tpot": rec.tpot_s or 0.0, "e2el": rec.e2el_s}
    return all(values[k] is not None and values[k] * 1000.0 <= slo for k, slo in slos_ms.items())


def peak_output_tokens_per_s(records: Sequence[RequestRecord]) -> float:
    """Most output tokens received in any one-second bucket of the run (a chunk's tokens go to the
    second it arrived in). Buckets start at the run's start."""
    counts: Counter[int] = Counter()
    for r in records:
        if r.success:
            for t, n in zip(r.chunk_times_s, r.chunk_tokens):
                counts[int(math.floor(t))] += n
    return float(max(counts.values(), default=0))


def _stats(values_s: list[float], percentiles: Sequence[float]) -> dict[str, float | None]:
    if not values_s:
        out: dict[str, float | None] = {"mean": None, "median": None, "std": None}
        out.update({f"p{percentile_key(p)}": None for p in percentiles})
        return out
    ms = np.asarray(values_s) * 1000.0
    out = {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std())}
    out.update({f"p{percentile_key(p)}": float(np.percentile(ms, p)) for p in percentiles})
    return out


def compute_report(records: Sequence[RequestRecord], duration_s: float, cfg: BenchConfig, *,
                   model: str, max_concurrent: int, tokenizer: str,
                   notes: Sequence[str] = ()) -> dict[str, Any]:
    """The report as one flat dict with vLLM's result keys (plus a few of ours)."""
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    total_in = sum(r.input_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    dur = max(duration_s, 1e-9)
    report: dict[str, Any] = {
        "base_url": cfg.base_url,
        "endpoint": cfg.endpoint,
        "model": model,
        "dataset_name": cfg.dataset_name,
        "tokenizer": tokenizer,
        "num_prompts": len(records),
        # JSON has no Infinity; vLLM writes "inf" too.
        "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        "seed": cfg.seed,
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(failed),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "input_throughput": total_in / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "max_output_tokens_per_s": peak_output_tokens_per_s(records),
        "max_concurrent_requests": max_concurrent,
        "usage_missing": sum(1 for r in ok if r.completion_tokens is None),
    }
    if cfg.goodput:
        good = sum(1 for r in ok if meets_slos(r, cfg.goodput))
        report["goodput_slos_ms"] = dict(cfg.goodput)
        report["goodput_completed"] = good
        report["request_goodput"] = good / dur
    samples = latencies_s(records)
    for metric in cfg.percentile_metrics:
        for stat, value in _stats(samples[metric], cfg.metric_percentiles).items():
            report[f"{stat}_{metric}_ms"] = value
    report["errors"] = [{"index": r.index, "error": r.error} for r in failed[:MAX_ERRORS_LISTED]]
    report["error_counts"] = dict(Counter(r.error or "" for r in failed).most_common())
    report["notes"] = list(notes)
    return report


def format_table(report: Mapping[str, Any], cfg: BenchConfig) -> str:
    """vLLM's result table."""
    width = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=width, c="=")]

    def row(label: str, value: Any, fmt: str = "") -> None:
        text = "-" if value is None else format(value, fmt)
        lines.append(f"{label:<40}{text:<10}")

    row("Model:", report["model"])
    row("Successful requests:", report["completed"])
    row("Failed requests:", report["failed"])
    row("Maximum request concurrency:", cfg.max_concurrency)
    row("Benchmark duration (s):", report["duration"], ".2f")
    row("Total input tokens:", report["total_input_tokens"])
    row("Total generated tokens:", report["total_output_tokens"])
    row("Request throughput (req/s):", report["request_throughput"], ".2f")
    if "request_goodput" in report:
        row("Request goodput (req/s):", report["request_goodput"], ".2f")
    row("Input token throughput (tok/s):", report["input_throughput"], ".2f")
    row("Output token throughput (tok/s):", report["output_throughput"], ".2f")
    row("Peak output token throughput (tok/s):", report["max_output_tokens_per_s"], ".2f")
    row("Peak concurrent requests:", report["max_concurrent_requests"])
    row("Total token throughput (tok/s):", report["total_token_throughput"], ".2f")
    for metric in cfg.percentile_metrics:
        title, short = _METRIC_TITLES[metric]
        lines.append("{s:{c}^{n}}".format(s=title, n=width, c="-"))
        row(f"Mean {short} (ms):", report[f"mean_{metric}_ms"], ".2f")
        row(f"Median {short} (ms):", report[f"median_{metric}_ms"], ".2f")
        for p in cfg.metric_percentiles:
            k = percentile_key(p)
            row(f"P{k} {short} (ms):", report[f"p{k}_{metric}_ms"], ".2f")
    lines.append("=" * width)
    if report["errors"]:
        lines.append("Errors (count: message):")
        for msg, n in list(report["error_counts"].items())[:MAX_ERRORS_LISTED]:
            lines.append(f"  {n}: {msg}")
    for note in report["notes"]:
        lines.append(f"Note: {note}")
    return "\n".join(lines)
