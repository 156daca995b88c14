"""``ares-jax simulate [run|goodput|sweep]``: the cluster simulator from the command line.

* ``run`` (default): every policy at every ``--rate``; a table, or JSON with ``--json``.
* ``goodput``: DistServe goodput of every policy by rate search.
* ``sweep``: the issue's regimes (``--regimes`` to pick some), markdown tables and JSON.

``--plot DIR`` writes P99 TPOT against rate per policy, and per-replica load timelines of
``static`` against ``ares`` (when both ran). Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ares_jax.config import with_overrides
from ares_jax.scheduler.registry import POLICY_NAMES
from ares_jax.sim.config import SimClusterConfig, SimConfig, SloConfig
from ares_jax.sim.goodput import find_goodput
from ares_jax.sim.metrics import summarize
from ares_jax.sim.simulator import SimResult, simulate
from ares_jax.sim.workloads import WORKLOAD_NAMES, WorkloadConfig, load_workload

MODES = ("run", "goodput", "sweep")
DEFAULT_REQUESTS = 2000  # requests drawn from a named workload when --requests is not given


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("simulate", help="discrete-event simulation of PD serving",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", choices=MODES, default="run")
    p.add_argument("--workload", choices=WORKLOAD_NAMES, default="servegen-r1")
    p.add_argument("--trace", help="CSV arrival_s,prompt_tokens,output_tokens (workload=trace)")
    p.add_argument("--requests", type=int, default=None,
                   help=f"number of requests (default {DEFAULT_REQUESTS}; with --trace, every "
                        "row of the file)")
    p.add_argument("--rate", default=None,
                   help="req/s, comma-separated for several (default: the workload's own)")
    p.add_argument("--max-tokens", type=int, default=32768, help="output cap per request")
    p.add_argument("--model", default="llama3_8b")
    p.add_argument("--gpu", default="h100_sxm")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--prefill-replicas", type=int, default=4)
    p.add_argument("--decode-replicas", type=int, default=16)
    p.add_argument("--cost-model", choices=("grid", "linear"), default="grid")
    p.add_argument("--kv-capacity-scale", type=float, default=1.0,
                   help="shrink each decode replica's KV pool (memory pressure)")
    p.add_argument("--policy", default=",".join(POLICY_NAMES),
                   help=f"comma-separated, from {', '.join(POLICY_NAMES)}")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT SLO, seconds")
    p.add_argument("--slo-tpot", type=float, default=50.0, help="TPOT SLO, ms")
    p.add_argument("--slo-attainment", type=float, default=0.9,
                   help="goodput: fraction of requests meeting both SLOs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any SimConfig field, e.g. ares.horizon_steps=4096")
    p.add_argument("--regimes", default=None, help="sweep: comma-separated regime names")
    p.add_argument("--full", action="store_true", help="sweep: more requests per regime")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR", help="write figures here")
    p.set_defaults(func=main)


def _sim_config(args: argparse.Namespace) -> SimConfig:
    cfg = SimConfig(
        cluster=SimClusterConfig(
            model=args.model, gpu=args.gpu, tp=args.tp,
            prefill_replicas=args.prefill_replicas, decode_replicas=args.decode_replicas,
            cost_model=args.cost_model, kv_capacity_scale=args.kv_capacity_scale,
        ),
        slo=SloConfig(ttft_s=args.slo_ttft, tpot_ms=args.slo_tpot,
                      attainment=args.slo_attainment),
        seed=args.seed,
    )
    return with_overrides(cfg, args.set)


def _workload_config(args: argparse.Namespace) -> WorkloadConfig:
    # A trace file is replayed whole unless --requests cuts it; a named workload is sampled.
    count = args.requests
    if count is None and not args.trace:
        count = DEFAULT_REQUESTS
    return WorkloadConfig(
        name="trace" if args.trace else args.workload, trace=args.trace,
        num_requests=count, max_tokens=args.max_tokens, seed=args.seed,
    )


def _ran(workload_name: str, requests: int) -> str:
    return f"workload {workload_name}: {requests} requests"


def _policies(args: argparse.Namespace) -> list[str]:
    names = [p.strip() for p in args.policy.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICY_NAMES]
    if unknown:
        raise SystemExit(f"unknown policy {unknown}; known: {', '.join(POLICY_NAMES)}")
    return names


def _emit(args: argparse.Namespace, payload: Any, table: str) -> None:
    text = json.dumps(payload, indent=2, default=float)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text if args.json else table)


def _format_rows(rows: list[dict[str, Any]]) -> str:
    cols = ("policy", "rate_req_s", "tpot_ms_p50", "tpot_ms_p99", "ttft_s_p99", "slo_attainment",
            "preemptions", "migrations", "bytes_moved_gb", "tpot_cv_mean", "wall_s")
    lines = ["  ".join(f"{c:>14}" for c in cols)]
    for r in rows:
        lines.append("  ".join(
            f"{r[c]:>14.3f}" if isinstance(r[c], float) else f"{r[c]!s:>14}" for c in cols))
    return "\n".join(lines)


def _plot_timelines(args: argparse.Namespace, results: dict[str, SimResult]) -> None:
    from ares_jax.sim.plots import plot_load_timelines

    chosen = {p: results[p] for p in ("static", "ares") if p in results}
    if chosen:
        plot_load_timelines(chosen, args.plot / "load_timelines.png")


def _run(args: argparse.Namespace) -> int:
    cfg, policies = _sim_config(args), _policies(args)
    workload = load_workload(_workload_config(args))
    rates = [float(r) for r in args.rate.split(",")] if args.rate else [workload.native_rate]
    rows, last = [], {}
    jobs = [(rate, policy) for rate in rates for policy in policies]
    for rate, policy in tqdm(jobs, desc="simulate", file=sys.stderr, disable=len(jobs) < 2):
        result = simulate(workload.at_rate(rate), policy, cfg)
        rows.append(summarize(result, cfg.slo) | {"rate_req_s": rate})
        if rate == rates[-1]:
            last[policy] = result
    if args.plot:
        from ares_jax.sim.plots import plot_tpot_vs_rate

        curves = {p: [(r["rate_req_s"], r["tpot_ms_p99"]) for r in rows if r["policy"] == p]
                  for p in policies}
        plot_tpot_vs_rate(curves, args.plot / "tpot_p99_vs_rate.png", slo_ms=cfg.slo.tpot_ms)
        _plot_timelines(args, last)
    _emit(args, {"workload": workload.name, "requests": len(workload), "results": rows},
          _ran(workload.name, len(workload)) + "\n" + _format_rows(rows))
    return 0


def _goodput(args: argparse.Namespace) -> int:
    cfg, policies = _sim_config(args), _policies(args)
    workload = load_workload(_workload_config(args))
    start = float(args.rate.split(",")[0]) if args.rate else None
    out = []
    with tqdm(desc="goodput", file=sys.stderr, unit="sim") as bar:
        for policy in policies:
            res = find_goodput(workload, policy, cfg, start_rate=start,
                               on_evaluation=lambda _s: bar.update(1))
            out.append({"policy": policy, "target": res.target,
                        "goodput_req_s": res.goodput_req_s,
                        "goodput_req_s_per_gpu": res.goodput_req_s_per_gpu,
                        "evaluations": list(res.evaluations)})
    if args.plot:
        from ares_jax.sim.plots import plot_tpot_vs_rate

        curves = {o["policy"]: [(e["rate_req_s"], e["tpot_ms_p99"]) for e in o["evaluations"]]
                  for o in out}
        plot_tpot_vs_rate(curves, args.plot / "tpot_p99_vs_rate.png", slo_ms=cfg.slo.tpot_ms)
    table = "\n".join(f"{o['policy']:>12}: goodput {o['goodput_req_s']:.3f} req/s "
                      f"({o['goodput_req_s_per_gpu']:.4f} per GPU) at "
                      f"{o['target']:.0%} SLO attainment" for o in out)
    _emit(args, {"workload": workload.name, "requests": len(workload), "goodput": out},
          _ran(workload.name, len(workload)) + "\n" + table)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from ares_jax.sim.sweep import markdown_table, regimes, run_regime

    chosen = regimes("full" if args.full else "quick")
    if args.regimes:
        wanted = set(args.regimes.split(","))
        unknown = wanted - {r.name for r in chosen}
        if unknown:
            raise SystemExit(f"unknown regime(s) {sorted(unknown)}; known: "
                             f"{', '.join(r.name for r in chosen)}")
        chosen = [r for r in chosen if r.name in wanted]
    # --seed and --set apply to every regime (the other cluster flags are the regimes' own).
    chosen = [
        dataclasses.replace(
            r, workload=dataclasses.replace(r.workload, seed=args.seed),
            sim=with_overrides(dataclasses.replace(r.sim, seed=args.seed), args.set),
        )
        for r in chosen
    ]
    policies = _policies(args)
    outputs, tables = [], []
    bar = tqdm(desc="sweep", file=sys.stderr, unit="sim")
    for regime in chosen:
        bar.set_postfix_str(regime.name)
        out = run_regime(regime, policies, on_run=lambda _p, _r: bar.update(1),
                         keep_results=bool(args.plot))
        results = out.pop("results", None)
        if args.plot:
            from ares_jax.sim.plots import plot_load_timelines, plot_tpot_vs_rate

            plot_tpot_vs_rate(out["tpot_p99_curves"], args.plot / f"{regime.name}_tpot_p99.png",
                              slo_ms=regime.sim.slo.tpot_ms)
            chosen_results = {p: results[p] for p in ("static", "ares") if p in results}
            if chosen_results:
                plot_load_timelines(chosen_results, args.plot / f"{regime.name}_load.png")
        outputs.append(out)
        tables.append(f"### {regime.name}\n\nreference rate {out['reference_rate_req_s']:.3f} "
                      f"req/s, {out['requests']} requests\n\n{markdown_table(out)}\n")
        print(tables[-1], file=sys.stderr)
    bar.close()
    _emit(args, {"regimes": outputs}, "\n".join(tables))
    return 0


def main(args: argparse.Namespace) -> int:
    return {"run": _run, "goodput": _goodput, "sweep": _sweep}[args.mode](args)
