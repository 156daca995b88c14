"""Policies across trace seeds: is a difference larger than the seed-to-seed noise?

The P99 TPOT of 1,000 requests moves 10-40% with the trace seed near saturation, so one run per
policy cannot rank policies that differ by less. This runs every variant at every point and
seed, and reports each variant's P99 TPOT over the better baseline's, per case and as a
geometric mean. JSON on stdout, a markdown table on stderr.

    .venv/bin/python benchmarks/sim_seeds.py --set cluster.preemption=local \\
        --point mem25=0.25@0.35 --point mem25=0.25@0.4 --point full=1.0@1.0 --seeds 0,1,2,3 \\
        --variant least-load --variant llumnix --variant ares \\
        --variant "ares-nodelay=ares:ares.oom_delay_steps=0"

A variant is a policy name, or ``NAME=POLICY:key=value,key=value`` with config overrides of its
own (``--set`` overrides apply to every variant). A point is ``NAME=KV_SCALE@RATE``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from tqdm import tqdm

from ares_jax.config import with_overrides
from ares_jax.sim import SimClusterConfig, SimConfig, WorkloadConfig, load_workload, simulate
from ares_jax.sim.metrics import compare_to_baselines, summarize


@dataclass(frozen=True)
class Variant:
    name: str
    policy: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Point:
    name: str
    kv_capacity_scale: float
    rate: float


def parse_variant(text: str) -> Variant:
    name, _, spec = text.partition("=")
    if not spec:
        return Variant(name=name, policy=name)
    policy, _, sets = spec.partition(":")
    return Variant(name=name, policy=policy, overrides=tuple(s for s in sets.split(",") if s))


def parse_point(text: str) -> Point:
    try:
        name, spec = text.split("=")
        scale, rate = spec.split("@")
        return Point(name=name, kv_capacity_scale=float(scale), rate=float(rate))
    except ValueError:
        raise argparse.ArgumentTypeError(f"point {text!r}: expected NAME=KV_SCALE@RATE") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="long-reasoning-scaled")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--model", default="llama3_8b")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--decode-replicas", type=int, default=4)
    p.add_argument("--prefill-replicas", type=int, default=1)
    p.add_argument("--point", type=parse_point, action="append", required=True)
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--variant", type=parse_variant, action="append", required=True)
    p.add_argument("--baselines", default="least-load,llumnix",
                   help="variant names whose per-case minimum is the reference")
    p.add_argument("--metric", default="tpot_ms_p99")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    baselines = args.baselines.split(",")
    names = [v.name for v in args.variant]
    missing = [b for b in baselines if b not in names]
    if missing:
        p.error(f"baselines {missing} are not among the variants {names}")

    rows = []
    jobs = [(seed, point, v) for seed in seeds for point in args.point for v in args.variant]
    workloads = {}
    for seed, point, v in tqdm(jobs, desc="sim_seeds", file=sys.stderr, unit="sim"):
        if seed not in workloads:
            workloads[seed] = load_workload(WorkloadConfig(
                name=args.workload, num_requests=args.requests, seed=seed))
        cfg = SimConfig(seed=seed, cluster=SimClusterConfig(
            model=args.model, tp=args.tp, decode_replicas=args.decode_replicas,
            prefill_replicas=args.prefill_replicas, kv_capacity_scale=point.kv_capacity_scale))
        cfg = with_overrides(cfg, [*args.set, *v.overrides])
        s = summarize(simulate(workloads[seed].at_rate(point.rate), v.policy, cfg), cfg.slo)
        rows.append({"variant": v.name, "point": point.name, "rate": point.rate, "seed": seed,
                     "case": f"{point.name}@{point.rate}/{seed}", args.metric: s[args.metric],
                     "slo_attainment": s["slo_attainment"], "preemptions": s["preemptions"],
                     "migrations": s["migrations"]})
    summary = compare_to_baselines(rows, names, baselines, args.metric)
    print(json.dumps({"command": " ".join(sys.argv), "rows": rows, "summary": summary},
                     indent=2))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    value = {(r["case"], r["variant"]): r[args.metric] for r in rows}
    lines = ["| case | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(f"{value[c, n]:.1f}" for n in names) + " |"
              for c in cases]
    lines.append("| geometric mean / better baseline | "
                 + " | ".join(f"{summary[n]['geomean_ratio']:.3f}" for n in names) + " |")
    lines.append("| cases below the better baseline | "
                 + " | ".join(f"{summary[n]['cases_below_1']}/{summary[n]['cases']}"
                              for n in names) + " |")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
