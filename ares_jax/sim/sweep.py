"""The regime sweep of issue 5: every policy, per regime, at a common rate and by goodput.

Per regime:

1. goodput of every policy at each attainment target (90% and 99%), by rate search; all
   searches share one memo of (policy, rate) -> summary, so points are simulated once;
2. a table of every policy at the *reference rate*: ``load_factor`` x static's 90% goodput
   (near static's collapse, where the paper's P99 TPOT comparison is made).

Prefill is provisioned so that the decode side saturates first (P = D for the short-prompt
workloads; with P = D/4 the first runs were TTFT-bound and every decode policy tied). Request
counts are kept modest (this runs on 2 shared cores); large replica counts use fewer
requests per replica and no goodput search (see ``regimes``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ares_jax.scheduler.cost import GPUS, MODELS, build_cost_model, kv_capacity_tokens
from ares_jax.sim.config import SimClusterConfig, SimConfig
from ares_jax.sim.goodput import search_rate
from ares_jax.sim.metrics import summarize
from ares_jax.sim.simulator import SimResult, simulate
from ares_jax.sim.workloads import Workload, WorkloadConfig, load_workload

TABLE_COLUMNS = (
    "tpot_ms_p50", "tpot_ms_p99", "ttft_s_p99", "slo_attainment", "preemptions", "migrations",
    "bytes_moved_gb",
)


@dataclass(frozen=True, kw_only=True)
class Regime:
    name: str
    workload: WorkloadConfig
    sim: SimConfig
    search_goodput: bool = True
    fixed_rate: float | None = None  # reference rate when goodput is not searched
    load_factor: float = 1.2


def _cluster(decode: int, prefill: int, **kw: Any) -> SimConfig:
    return SimConfig(cluster=SimClusterConfig(decode_replicas=decode, prefill_replicas=prefill,
                                              **kw))


def regimes(size: str = "quick") -> list[Regime]:
    """The issue's regimes. ``quick`` keeps each simulation to seconds or tens of seconds on
    2 shared cores; ``full`` uses 4x the requests."""
    k = 1 if size == "quick" else 4

    def wl(name: str, n: int) -> WorkloadConfig:
        return WorkloadConfig(name=name, num_requests=n * k)

    tp2 = {"model": "r1_qwen_32b", "tp": 2}
    return [
        # Goodput regimes: the trace must outlast the requests' lifetimes many times over at
        # the rates searched, or a finite trace is absorbed as one burst (see results_sim.md).
        Regime(name="8b-servegen-r1-d4", workload=wl("servegen-r1", 4000), sim=_cluster(4, 4)),
        Regime(name="8b-azure-conv-d4", workload=wl("azure-conv", 4000), sim=_cluster(4, 4)),
        Regime(name="32b-tp2-servegen-r1-d4", workload=wl("servegen-r1", 4000),
               sim=_cluster(4, 4, **tp2)),
        Regime(name="8b-servegen-r1-d16", workload=wl("servegen-r1", 16000),
               sim=_cluster(16, 16)),
        # Long reasoning lives for minutes: fixed rates near saturation instead of a search.
        Regime(name="8b-long-reasoning-d4-mem25", search_goodput=False, fixed_rate=0.2,
               workload=wl("long-reasoning", 1000), sim=_cluster(4, 1, kv_capacity_scale=0.25)),
        Regime(name="8b-long-reasoning-d16", search_goodput=False, fixed_rate=1.6,
               workload=wl("long-reasoning", 4000), sim=_cluster(16, 4)),
        Regime(name="32b-tp2-long-reasoning-d4", search_goodput=False, fixed_rate=0.25,
               workload=wl("long-reasoning", 1000), sim=_cluster(4, 1, **tp2)),
        # Skew-preserving long reasoning (outputs x one constant, median 8k, capped at 32k):
        # lifetimes are ~10k tokens, short enough at these sizes for a goodput search. The
        # reference rate is static's 90% goodput itself: at 1.2x every policy has collapsed.
        Regime(name="8b-long-reasoning-scaled-d4-mem25", load_factor=1.0,
               workload=wl("long-reasoning-scaled", 1000),
               sim=_cluster(4, 1, kv_capacity_scale=0.25)),
        Regime(name="8b-long-reasoning-scaled-d4", load_factor=1.0,
               workload=wl("long-reasoning-scaled", 1000), sim=_cluster(4, 1)),
        Regime(name="32b-tp2-long-reasoning-scaled-d4", load_factor=1.0,
               workload=wl("long-reasoning-scaled", 1000), sim=_cluster(4, 1, **tp2)),
        # The same three with vLLM's decode-side recompute: a preempted request recomputes its
        # KV on its decode replica, stalling that replica's batch (cluster.preemption).
        Regime(name="8b-long-reasoning-scaled-d4-mem25-local", load_factor=1.0,
               workload=wl("long-reasoning-scaled", 1000),
               sim=_cluster(4, 1, kv_capacity_scale=0.25, preemption="local")),
        Regime(name="8b-long-reasoning-scaled-d4-local", load_factor=1.0,
               workload=wl("long-reasoning-scaled", 1000),
               sim=_cluster(4, 1, preemption="local")),
        Regime(name="32b-tp2-long-reasoning-scaled-d4-local", load_factor=1.0,
               workload=wl("long-reasoning-scaled", 1000),
               sim=_cluster(4, 1, preemption="local", **tp2)),
        Regime(name="8b-long-reasoning-scaled-d16-mem25", search_goodput=False, fixed_rate=1.6,
               workload=wl("long-reasoning-scaled", 4000),
               sim=_cluster(16, 4, kv_capacity_scale=0.25)),
        Regime(name="8b-servegen-r1-d64", search_goodput=False, fixed_rate=440.0,
               workload=wl("servegen-r1", 60000), sim=_cluster(64, 64)),
        Regime(name="8b-servegen-r1-d256", search_goodput=False, fixed_rate=600.0,
               workload=wl("servegen-r1", 100000), sim=_cluster(256, 64)),
    ]


def capacity_rate_estimate(workload: Workload, cfg: SimConfig) -> float:
    """A rough sustainable rate, to start the search near the answer: memory-limited batch per
    replica at the mean request footprint, times its step rate, over the mean output."""
    c = cfg.cluster
    capacity = kv_capacity_tokens(MODELS[c.model], GPUS[c.gpu], c.tp) * c.kv_capacity_scale
    footprint = float(np.mean(workload.prompt_tokens + workload.output_tokens / 2))
    batch = max(1.0, capacity / footprint)
    cost = build_cost_model(c.cost_model, c.model, c.gpu, c.tp)
    step_s = float(cost.step_ms(batch, batch * footprint)) / 1e3
    return 0.5 * c.decode_replicas * batch / step_s / float(np.mean(workload.output_tokens))


def run_regime(
    regime: Regime,
    policies: Sequence[str],
    *,
    targets: Sequence[float] = (0.9, 0.99),
    tolerance: float = 0.1,
    on_run: Callable[[str, float], None] | None = None,
    keep_results: bool = False,
) -> dict[str, Any]:
    workload = load_workload(regime.workload)
    cfg = regime.sim
    memo: dict[tuple[str, float], dict[str, Any]] = {}
    kept: dict[tuple[str, float], SimResult] = {}

    def at(policy: str, rate: float) -> dict[str, Any]:
        key = (policy, round(rate, 6))
        if key not in memo:
            if on_run is not None:
                on_run(policy, rate)
            result = simulate(workload.at_rate(rate), policy, cfg)
            memo[key] = summarize(result, cfg.slo) | {"rate_req_s": rate}
            if keep_results:
                kept[key] = result
        return memo[key]

    goodput: dict[str, dict[str, float]] = {}
    if regime.search_goodput:
        start = capacity_rate_estimate(workload, cfg)
        for policy in policies:
            goodput[policy] = {
                f"{t:.2f}": search_rate(lambda r, p=policy, t=t: at(p, r)["slo_attainment"] >= t,
                                        start)
                for t in targets
            }
        base = goodput.get("static", next(iter(goodput.values())))[f"{targets[0]:.2f}"]
        reference = regime.load_factor * base
    else:
        reference = regime.fixed_rate or workload.native_rate
    rows = {policy: at(policy, reference) for policy in policies}
    curves = {
        p: sorted((r, s["tpot_ms_p99"]) for (q, r), s in memo.items() if q == p) for p in policies
    }
    out: dict[str, Any] = {
        "regime": regime.name,
        "workload": regime.workload.name,
        "requests": len(workload),
        "model": cfg.cluster.model,
        "tp": cfg.cluster.tp,
        "decode_replicas": cfg.cluster.decode_replicas,
        "prefill_replicas": cfg.cluster.prefill_replicas,
        "kv_capacity_scale": cfg.cluster.kv_capacity_scale,
        "reference_rate_req_s": reference,
        "goodput_req_s": goodput,
        "rows": rows,
        "tpot_p99_curves": curves,
    }
    if keep_results:
        out["results"] = {p: kept[(p, round(reference, 6))] for p in policies}
    return out


def markdown_table(regime_out: dict[str, Any]) -> str:
    targets = sorted({t for g in regime_out["goodput_req_s"].values() for t in g})
    head = ["policy", "P50 TPOT ms", "P99 TPOT ms", "P99 TTFT s", "SLO att.", "preempt.",
            "migr.", "GB moved"] + [f"goodput@{float(t):.0%} req/s" for t in targets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for policy, s in regime_out["rows"].items():
        cells = [policy, f"{s['tpot_ms_p50']:.1f}", f"{s['tpot_ms_p99']:.1f}",
                 f"{s['ttft_s_p99']:.2f}", f"{s['slo_attainment']:.3f}", str(s["preemptions"]),
                 str(s["migrations"]), f"{s['bytes_moved_gb']:.0f}"]
        g = regime_out["goodput_req_s"].get(policy, {})
        cells += [f"{g[t]:.2f}" if t in g else "-" for t in targets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
