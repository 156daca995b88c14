"""Where does length prediction pay? A factorial headroom map in the simulator (issue 16).

Axes: decode replicas (4, 16) x KV capacity per replica in units of the trace's mean final KV
(4, 16, 64) x migration (off; the default 50 GB/s link; a costly one: 5 GB/s and the copy
slowing both replicas' decode steps by 25%) x prediction error (ares-oracle: none; ares: the
simulator's error model; ares-2x: its sigma doubled). For every (replicas, KV) point the arrival
rate is calibrated first: bisection on trace seed 0 for the rate where least-load's SLO
attainment is about 0.9 (least-load never migrates, so one rate serves every migration setting).
Then every policy runs at that rate on every trace seed.

Headroom = 1 - P99 TPOT of ares-oracle / that of the better current-load policy (geometric means
over seeds; the better of least-load and llumnix *as policies*, not the per-seed minimum, which
is biased low). JSON on stdout (or --out), markdown tables on stderr, a heat-map plot with --plot.

    nice -n 5 .venv/bin/python benchmarks/headroom.py --out out/headroom.json \\
        --plot docs/img/headroom_map.png

``--reuse FILE`` keeps the rates and rows of an earlier run and only runs what is missing, so
ablation variants (``--variant NAME=POLICY:key=value,...``, run at every migration setting with
that setting's overrides) can be added to a finished map.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ares_jax.config import with_overrides
from ares_jax.scheduler.cost import GPUS, MODELS, kv_capacity_tokens
from ares_jax.sim import SimClusterConfig, SimConfig, WorkloadConfig, load_workload, simulate
from ares_jax.sim.metrics import summarize

# Migration settings: overrides for every policy, plus the policy-specific "off" switches.
MIGRATION = {
    "off": (),
    "fast": (),
    "costly": ("cluster.migration_link_gbytes_per_s=5", "cluster.migration_slowdown=0.25"),
}
MIGRATION_OFF = {
    "llumnix": ("llumnix.migrate_out_threshold=-1e18",),
    "ares": ("ares.max_migrations_per_round=0",),
    "ares-oracle": ("ares.max_migrations_per_round=0",),
}
# The simulator's default error model with sigma doubled (sigma_start 0.8, floor 0.1).
TWICE_ERROR = ("prediction.sigma_start=1.6", "prediction.sigma_floor=0.2")
KEYS = ("tpot_ms_p99", "tpot_ms_p50", "ttft_s_p99", "slo_attainment", "preemptions",
        "migrations", "bytes_moved_gb", "clipped_requests")


@dataclass(frozen=True, kw_only=True)
class Variant:
    name: str
    policy: str
    overrides: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        return f"{self.policy}:{','.join(self.overrides)}"


BASE_VARIANTS = (
    Variant(name="least-load", policy="least-load"),
    Variant(name="llumnix", policy="llumnix"),
    Variant(name="ares-oracle", policy="ares-oracle"),
    Variant(name="ares", policy="ares"),
    Variant(name="ares-2x", policy="ares", overrides=TWICE_ERROR),
)


def parse_variant(text: str) -> Variant:
    name, _, spec = text.partition("=")
    policy, _, sets = spec.partition(":")
    if not policy:
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected NAME=POLICY[:k=v,...]")
    return Variant(name=name, policy=policy, overrides=tuple(s for s in sets.split(",") if s))


@functools.lru_cache(maxsize=8)
def _workload(name: str, requests: int, seed: int):  # noqa: ANN202 - a Workload
    return load_workload(WorkloadConfig(name=name, num_requests=requests, seed=seed))


def kv_scale(units: float, model: str, workload: str) -> float:
    """``kv_capacity_scale`` that gives a replica ``units`` times the mean final KV (prompt +
    output tokens) of 2,000 requests of seed 0's trace (one unit for every replica count)."""
    w = _workload(workload, 2000, 0)
    mean_kv = float(np.mean(w.prompt_tokens + w.output_tokens))
    capacity = kv_capacity_tokens(MODELS[model], GPUS["h100_sxm"], 1)
    return units * mean_kv / capacity


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One simulation; ``job`` carries everything (it crosses a process boundary)."""
    w = _workload(job["workload"], job["requests"], job["seed"])
    cfg = SimConfig(seed=job["seed"], cluster=SimClusterConfig(
        model=job["model"], decode_replicas=job["replicas"],
        prefill_replicas=max(1, job["replicas"] // 2), kv_capacity_scale=job["kv_scale"]))
    cfg = with_overrides(cfg, list(job["overrides"]))
    t0 = time.perf_counter()
    s = summarize(simulate(w.at_rate(job["rate"]), job["policy"], cfg), cfg.slo)
    return {**{k: job[k] for k in ("replicas", "kv_units", "migration", "variant", "spec",
                                   "seed", "rate")},
            **{k: s[k] for k in KEYS}, "wall_s": time.perf_counter() - t0}


def calibrate(job: dict[str, Any]) -> dict[str, Any]:
    """Rate (req/s) where least-load's SLO attainment is about ``job['target']`` on seed 0:
    bracket by doubling or halving from a Little's-law guess, then bisect in log space."""
    target, steps = job["target"], job["steps"]

    def attainment(rate: float) -> float:
        return run_one({**job, "rate": rate, "seed": 0, "policy": "least-load",
                        "variant": "least-load", "spec": "least-load:", "migration": "-",
                        "overrides": ()})["slo_attainment"]

    w = _workload(job["workload"], job["requests"], 0)
    # Little: concurrency = replicas x units; a request lives ~ output x 25 ms.
    rate = job["replicas"] * job["kv_units"] / (float(np.mean(w.output_tokens)) * 0.025)
    lo = hi = None
    for _ in range(8):
        if attainment(rate) >= target:
            lo, rate = rate, rate * 2
        else:
            hi, rate = rate, rate / 2
        if lo is not None and hi is not None:
            break
    if lo is None or hi is None:
        raise RuntimeError(f"no bracket for {job['replicas']}x{job['kv_units']}")
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if attainment(mid) >= target:
            lo = mid
        else:
            hi = mid
    return {"replicas": job["replicas"], "kv_units": job["kv_units"], "rate": lo}


def geomean(x: list[float]) -> float:
    return float(np.exp(np.mean(np.log(np.maximum(x, 1e-9)))))


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (replicas, KV, migration, variant): geometric mean of P99 TPOT over seeds, means of
    the rest; least-load (migration-independent) is copied into every migration setting."""
    out = []
    cells = sorted({(r["replicas"], r["kv_units"], r["migration"]) for r in rows
                    if r["migration"] != "-"})
    for rep, kv, mig in cells:
        mine = [r for r in rows if r["replicas"] == rep and r["kv_units"] == kv
                and r["migration"] in (mig, "-")]
        for name in dict.fromkeys(r["variant"] for r in mine):
            vr = [r for r in mine if r["variant"] == name]
            out.append({"replicas": rep, "kv_units": kv, "migration": mig, "variant": name,
                        "seeds": len(vr), "rate": vr[0]["rate"],
                        "tpot_ms_p99": geomean([r["tpot_ms_p99"] for r in vr]),
                        **{k: float(np.mean([r[k] for r in vr]))
                           for k in KEYS if k != "tpot_ms_p99"}})
    return out


def paired_interval(mine: dict[int, float], theirs: dict[int, float],
                    level: float = 0.95) -> list[float] | None:
    """Geometric mean of the per-seed ratios ``mine / theirs`` (every policy runs on the same
    traces, so the seeds pair up) and its ``level`` interval: a t interval on the log ratios.
    ``[ratio, low, high, seeds]``, or None with fewer than two shared seeds."""
    from scipy.stats import t as student_t

    seeds = sorted(set(mine) & set(theirs))
    if len(seeds) < 2:
        return None
    logs = np.log([mine[s] / theirs[s] for s in seeds])
    half = (student_t.ppf(0.5 + level / 2, len(seeds) - 1) * logs.std(ddof=1)
            / math.sqrt(len(seeds)))
    m = float(logs.mean())
    return [math.exp(m), math.exp(m - half), math.exp(m + half), len(seeds)]


def headroom(agg: list[dict[str, Any]],
             rows: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Per cell: the better current-load policy and every variant's P99 TPOT ratio to it, and,
    from the per-seed ``rows``, each ratio's paired 95% interval."""
    p99: dict[tuple, dict[int, float]] = {}
    for r in rows:
        key = (r["replicas"], r["kv_units"], r["migration"], r["variant"])
        p99.setdefault(key, {})[r["seed"]] = r["tpot_ms_p99"]
    cells = sorted({(a["replicas"], a["kv_units"], a["migration"]) for a in agg})
    out = []
    for cell in cells:
        by = {a["variant"]: a for a in agg
              if (a["replicas"], a["kv_units"], a["migration"]) == cell}
        if "least-load" not in by or "llumnix" not in by:
            continue
        best = min(("least-load", "llumnix"), key=lambda n: by[n]["tpot_ms_p99"])
        att = max(by["least-load"]["slo_attainment"], by["llumnix"]["slo_attainment"])

        def seeds(name: str, cell: tuple = cell) -> dict[int, float]:
            return p99.get((*cell[:2], row_migration(name, cell[2]), name), {})

        out.append({"replicas": cell[0], "kv_units": cell[1], "migration": cell[2],
                    "better": best, "better_p99": by[best]["tpot_ms_p99"],
                    "better_attainment": att,
                    "ratio": {n: a["tpot_ms_p99"] / by[best]["tpot_ms_p99"] for n, a in by.items()},
                    "attainment": {n: a["slo_attainment"] for n, a in by.items()},
                    "interval": {n: iv for n in by if n != best
                                 and (iv := paired_interval(seeds(n), seeds(best))) is not None}})
    return out


def row_migration(variant: str, migration: str) -> str:
    """The migration key a variant's rows are stored under (least-load's are shared: "-")."""
    return "-" if variant == "least-load" else migration


def markdown(agg: list[dict[str, Any]], hr: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(a["variant"] for a in agg))
    lines = ["| replicas | KV units | migration | rate req/s | P99 TPOT ms: " + " / ".join(names)
             + " | SLO att. (same order) | preempt. (same order) | migr. / GB: "
             + " / ".join(n for n in names if n != "least-load") + " |", "|---" * 7 + "|"]
    for a0 in [a for a in agg if a["variant"] == names[0]]:
        cell = (a0["replicas"], a0["kv_units"], a0["migration"])
        by = {a["variant"]: a for a in agg
              if (a["replicas"], a["kv_units"], a["migration"]) == cell}
        g = [by.get(n) for n in names]
        lines.append(
            f"| {cell[0]} | {cell[1]} | {cell[2]} | {a0['rate']:.2f} | "
            + " / ".join(f"{x['tpot_ms_p99']:.1f}" if x else "-" for x in g) + " | "
            + " / ".join(f"{x['slo_attainment']:.3f}" if x else "-" for x in g) + " | "
            + " / ".join(f"{x['preemptions']:.0f}" if x else "-" for x in g) + " | "
            + " / ".join(f"{x['migrations']:.0f}/{x['bytes_moved_gb']:.0f}" if x else "-"
                         for x, n in zip(g, names) if n != "least-load") + " |")
    lines += ["", "| replicas | KV units | migration | better | its P99 ms | "
              + " | ".join(f"{n} / better" for n in names if n not in ("least-load", "llumnix"))
              + " | headroom (1 - oracle / better) |", "|---" * (6 + len(names) - 2) + "|"]
    for h in hr:
        r = h["ratio"]
        lines.append(f"| {h['replicas']} | {h['kv_units']} | {h['migration']} | {h['better']} | "
                     f"{h['better_p99']:.1f} | "
                     + " | ".join(f"{r[n]:.3f}" if n in r else "-"
                                  for n in names if n not in ("least-load", "llumnix"))
                     + f" | {1 - r.get('ares-oracle', float('nan')):+.1%} |")
    if any(h.get("interval") for h in hr):
        shown = [n for n in names if n not in ("least-load", "llumnix")]
        lines += ["", "| replicas | KV units | migration | better | "
                  + " | ".join(f"{n} / better, paired 95% interval" for n in shown) + " |",
                  "|---" * (4 + len(shown)) + "|"]
        for h in hr:
            iv = h.get("interval", {})
            lines.append(f"| {h['replicas']} | {h['kv_units']} | {h['migration']} | "
                         f"{h['better']} | " + " | ".join(
                             f"{iv[n][0]:.3f} [{iv[n][1]:.2f}, {iv[n][2]:.2f}] ({iv[n][3]})"
                             if n in iv else "-" for n in shown) + " |")
    return "\n".join(lines)


def plot(hr: list[dict[str, Any]], path: str, seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({(h["replicas"], h["kv_units"]) for h in hr})
    migs = [m for m in MIGRATION if any(h["migration"] == m for h in hr)]
    panels = [("ares-oracle", "ares-oracle (exact lengths)"), ("ares", "ares (modelled error)"),
              ("ares-2x", "ares (2x error)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.5,
                                                      0.55 * len(rows) + 1.8), sharey=True)
    for k, (ax, (name, title)) in enumerate(zip(np.atleast_1d(axes), panels)):
        grid = np.full((len(rows), len(migs)), np.nan)
        for h in hr:
            if name in h["ratio"]:
                grid[rows.index((h["replicas"], h["kv_units"])), migs.index(h["migration"])] = (
                    100 * (1 - h["ratio"][name]))
        im = ax.imshow(grid, cmap="RdBu", vmin=-30, vmax=30, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:+.0f}%", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(migs)), migs)
        if k == 0:
            ax.set_yticks(range(len(rows)), [f"{r} replicas, KV {u:g}" for r, u in rows])
        ax.set_xlabel("migration")
        ax.set_title(title, fontsize=9)
    fig.suptitle("P99 TPOT below the better of least-load and llumnix (geometric mean of "
                 f"{seeds} trace seeds; blue = ahead)", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8, label="% lower P99 TPOT")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _rates(rates: dict[tuple[int, float], float]) -> list[dict[str, Any]]:
    return [{"replicas": r, "kv_units": k, "rate": v} for (r, k), v in rates.items()]


def _save(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=1))


def add_cell_arguments(p: argparse.ArgumentParser, *, replicas: str, kv_units: str) -> None:
    """The map's axes and trace, shared with ``goodput_map.py``."""
    p.add_argument("--workload", default="servegen-r1")
    p.add_argument("--model", default="llama3_8b")
    p.add_argument("--replicas", default=replicas)
    p.add_argument("--kv-units", default=kv_units)
    p.add_argument("--migration", default=",".join(MIGRATION))
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--requests-per-replica", type=int, default=150)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cell_arguments(p, replicas="4,16", kv_units="4,16,64")
    p.add_argument("--target", type=float, default=0.9, help="least-load attainment to calibrate")
    p.add_argument("--bisect-steps", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-base", action="store_true", help="run only the --variant rows")
    p.add_argument("--variant", type=parse_variant, action="append", default=[])
    p.add_argument("--reuse", help="JSON of an earlier run: keep its rates and rows")
    p.add_argument("--out")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    reps = [int(x) for x in args.replicas.split(",")]
    units = [float(x) for x in args.kv_units.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    migs = args.migration.split(",")
    variants = ([] if args.no_base else list(BASE_VARIANTS)) + args.variant
    old: dict[str, Any] = {"rates": [], "rows": []}
    if args.reuse:
        with open(args.reuse) as f:
            old = json.load(f)
    t0 = time.perf_counter()

    def base(rep: int, kv: float) -> dict[str, Any]:
        # Enough requests that the trace outlasts request lifetimes at the knee: a pool of 64
        # mean requests per replica needs more arrivals than one of 4 to reach steady state.
        n = rep * max(args.requests_per_replica, round(4 * kv))
        return {"workload": args.workload, "model": args.model, "replicas": rep,
                "kv_units": kv, "requests": n,
                "kv_scale": kv_scale(kv, args.model, args.workload)}

    rates = {(r["replicas"], r["kv_units"]): r["rate"] for r in old["rates"]}
    todo = [base(r, k) | {"target": args.target, "steps": args.bisect_steps}
            for r in reps for k in units if (r, k) not in rates]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for c in pool.map(calibrate, todo):
            rates[c["replicas"], c["kv_units"]] = c["rate"]
            print(f"calibrated {c['replicas']} x {c['kv_units']}: {c['rate']:.3f} req/s",
                  file=sys.stderr)
        have = {(r["replicas"], r["kv_units"], r["migration"], r["variant"], r["spec"], r["seed"])
                for r in old["rows"]}
        jobs = []
        for rep in reps:
            for kv in units:
                for v in variants:
                    for mig in (["-"] if v.policy == "least-load" else migs):
                        sets = MIGRATION.get(mig, ())
                        if mig == "off":
                            sets = MIGRATION_OFF.get(v.policy, ())
                        for seed in seeds:
                            job = base(rep, kv) | {
                                "rate": rates[rep, kv], "seed": seed, "policy": v.policy,
                                "variant": v.name, "spec": v.spec, "migration": mig,
                                "overrides": (*sets, *v.overrides)}
                            key = (rep, kv, mig, v.name, v.spec, seed)
                            if key not in have:
                                jobs.append(job)
        rows = list(old["rows"])
        for i, row in enumerate(pool.map(run_one, jobs, chunksize=1)):
            rows.append(row)
            if (i + 1) % 10 == 0:
                print(f"{i + 1}/{len(jobs)} runs, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr)
                if args.out:  # a checkpoint: --reuse it to resume an interrupted map
                    _save(args.out, {"rates": _rates(rates), "rows": rows})
    # Only the asked-for cells and seeds: a --reuse file may hold more (e.g. extra seeds).
    asked = [r for r in rows if r["seed"] in seeds and r["replicas"] in reps
             and r["kv_units"] in units]
    agg = aggregate(asked)
    hr = headroom(agg, asked)
    out = {"command": " ".join(sys.argv), "wall_s": time.perf_counter() - t0,
           "rates": _rates(rates),
           "rows": rows, "aggregate": agg, "headroom": hr}
    if args.out:
        _save(args.out, out)
    else:
        print(json.dumps(out, indent=1))
    print(markdown(agg, hr), file=sys.stderr)
    print(f"wall {out['wall_s']:.0f} s, {len(rows)} runs", file=sys.stderr)
    if args.plot:
        plot(hr, args.plot, len(seeds))


if __name__ == "__main__":
    main()
