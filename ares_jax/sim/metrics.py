"""Per-run summaries: latency percentiles, SLO attainment, memory and migration counters."""

from __future__ import annotations

from typing import Any

import numpy as np

from ares_jax.sim.config import SloConfig
from ares_jax.sim.simulator import SimResult

PERCENTILES = (50, 90, 99)


def ttft_s(result: SimResult) -> np.ndarray:
    return result.first_token_s - result.arrival_s


def tpot_ms(result: SimResult) -> np.ndarray:
    """Time per output token after the first; NaN for single-token outputs."""
    decoded = result.output_tokens - 1
    span = result.finish_s - result.first_token_s
    return np.where(decoded > 0, span * 1e3 / np.maximum(decoded, 1), np.nan)


def slo_met(result: SimResult, slo: SloConfig) -> np.ndarray:
    tpot = tpot_ms(result)
    return (ttft_s(result) <= slo.ttft_s) & (np.isnan(tpot) | (tpot <= slo.tpot_ms))


def attainment(result: SimResult, slo: SloConfig) -> float:
    return float(np.mean(slo_met(result, slo)))


def _stats(values: np.ndarray, prefix: str) -> dict[str, float]:
    v = values[~np.isnan(values)]
    if v.size == 0:
        return {f"{prefix}_mean": float("nan")} | {f"{prefix}_p{q}": float("nan")
                                                   for q in PERCENTILES}
    out = {f"{prefix}_mean": float(v.mean())}
    for q, x in zip(PERCENTILES, np.percentile(v, PERCENTILES), strict=True):
        out[f"{prefix}_p{q}"] = float(x)
    return out


def summarize(result: SimResult, slo: SloConfig) -> dict[str, Any]:
    """One flat dict of everything a results table needs (JSON-able)."""
    c = result.counters
    duration = float(np.nanmax(result.finish_s) - result.arrival_s.min())
    span = float(result.arrival_s.max() - result.arrival_s.min())
    rate = (result.arrival_s.size - 1) / span if span > 0 else float("nan")
    tpot = tpot_ms(result)
    ttft = ttft_s(result)
    return {
        "policy": result.policy,
        "workload": result.workload,
        "requests": int(result.arrival_s.size),
        "rate_req_s": rate,
        "decode_replicas": result.num_decode_replicas,
        "gpus": result.num_gpus,
        "kv_capacity_tokens": result.kv_capacity_tokens,
        **_stats(ttft, "ttft_s"),
        **_stats(tpot, "tpot_ms"),
        "slo_ttft_attainment": float(np.mean(ttft <= slo.ttft_s)),
        "slo_tpot_attainment": float(np.mean(np.isnan(tpot) | (tpot <= slo.tpot_ms))),
        "slo_attainment": attainment(result, slo),
        "oom_events": int(c["oom_events"]),
        "preemptions": int(c["preemptions"]),
        "preempted_requests": int(np.sum(result.preemptions_per_request > 0)),
        "recomputed_tokens_local": int(c["recomputed_tokens_local"]),
        "migrations": int(c["migrations_completed"]),
        "migrations_started": int(c["migrations_started"]),
        "migrations_aborted": int(c["migrations_aborted"]),
        "migrations_rejected": int(c["migrations_rejected"]),
        "migrations_capped": int(c["migrations_capped"]),
        "bytes_moved_gb": (c["bytes_moved_completed"] + c["bytes_moved_aborted"]) / 1e9,
        "tpot_cv_mean": float(np.mean(result.timeline.tpot_cv)) if result.timeline.tpot_cv.size
        else 0.0,
        "throughput_tok_s": float(c["decode_tokens"]) / duration if duration > 0 else 0.0,
        "sim_duration_s": duration,
        "clipped_requests": int(c["clipped_requests"]),
        "wall_s": result.wall_s,
    }


def compare_to_baselines(
    rows: list[dict[str, Any]],
    variants: list[str],
    baselines: list[str],
    metric: str = "tpot_ms_p99",
) -> dict[str, dict[str, float]]:
    """Each variant's ``metric`` over the better (lowest) baseline's, per case.

    ``rows`` carry ``variant``, ``case`` (e.g. point and seed) and ``metric``. Returns, per
    variant, the geometric mean of the ratios, how many cases are below 1 and how many cases
    there were. Note: the minimum of several noisy baselines is biased low, so a variant equal
    to them scores above 1 on average; compare the baselines' own scores.
    """
    by_case: dict[Any, dict[str, float]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["variant"]] = float(r[metric])
    out = {}
    for v in variants:
        ratios = [d[v] / min(d[b] for b in baselines) for d in by_case.values()
                  if v in d and all(b in d for b in baselines)]
        logs = np.log(ratios) if ratios else np.array([np.nan])
        out[v] = {"geomean_ratio": float(np.exp(np.mean(logs))),
                  "cases_below_1": int(sum(x < 1 for x in ratios)), "cases": len(ratios)}
    return out
