"""Goodput at 90% and 99% SLO attainment on the headroom map's cells (issue 16).

``benchmarks/headroom.py`` compares policies at one calibrated rate per cell (P99 TPOT and SLO
attainment there). Issue 16 also asks for goodput: the highest request rate at which 90% (99%)
of requests meet both SLOs (DistServe). A bisection per policy, seed and target would cost
about 8 runs each; this scans a fixed grid of rates instead (``--scales`` times the cell's
calibrated rate) and reads both goodputs off one scan per (cell, policy, seed). Between the
last passing and the first failing rate of the grid, the crossing is interpolated linearly in
attainment against log rate. A scan that never passes counts as the lowest rate of the grid
over 2; one that passes everywhere, as its highest. Both cases are flagged in the JSON.

    nice -n 5 .venv/bin/python benchmarks/goodput_map.py --rates out/rates.json --replicas 4 \\
        --kv-units 4,16 --seeds 0,1,2,3,4,5,6,7,8,9,10,11 --out out/goodput4.json

Per cell: each policy's goodput (geometric mean over seeds) over that of the better of
least-load and llumnix, with the paired 95% interval. JSON to ``--out`` (every run's row; resume
with ``--reuse``), a markdown table on stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from headroom import (
    MIGRATION,
    MIGRATION_OFF,
    Variant,
    add_cell_arguments,
    geomean,
    kv_scale,
    paired_interval,
    parse_variant,
    row_migration,
    run_one,
)

TARGETS = (0.9, 0.99)
DEFAULT_VARIANTS = (Variant(name="least-load", policy="least-load"),
                    Variant(name="llumnix", policy="llumnix"), Variant(name="ares", policy="ares"))


def crossing(rates: list[float], attainment: list[float], target: float) -> tuple[float, str]:
    """Goodput from one scan (``rates`` ascending): ``(rate, flag)``, flag "" or "below-grid"
    or "above-grid"."""
    fails = [i for i, a in enumerate(attainment) if a < target]
    if not fails:
        return rates[-1], "above-grid"
    first = fails[0]
    if first == 0:
        return rates[0] / 2, "below-grid"
    lo, hi = first - 1, first  # passes at lo, fails at hi
    a_lo, a_hi = attainment[lo], attainment[hi]
    frac = (a_lo - target) / (a_lo - a_hi)
    return math.exp(math.log(rates[lo]) + frac * (math.log(rates[hi]) - math.log(rates[lo]))), ""


Goodputs = dict[tuple, dict[int, dict[float, tuple[float, str]]]]


def goodputs(rows: list[dict[str, Any]]) -> Goodputs:
    """``{(replicas, kv, migration, variant): {seed: {target: (goodput, flag)}}}`` from the
    scans (:func:`crossing`)."""
    scans: dict[tuple, dict[int, list[dict[str, Any]]]] = {}
    for r in rows:
        key = (r["replicas"], r["kv_units"], r["migration"], r["variant"])
        scans.setdefault(key, {}).setdefault(r["seed"], []).append(r)
    out: Goodputs = {}
    for key, by_seed in scans.items():
        for seed, scan in by_seed.items():
            scan.sort(key=lambda r: r["rate"])
            rates = [r["rate"] for r in scan]
            att = [r["slo_attainment"] for r in scan]
            out.setdefault(key, {})[seed] = {t: crossing(rates, att, t) for t in TARGETS}
    return out


def _series(gp: Goodputs, cell: tuple[int, float, str], name: str,
            target: float) -> dict[int, float]:
    """``{seed: goodput}`` of variant ``name`` in ``cell`` (replicas, KV, migration)."""
    key = (cell[0], cell[1], row_migration(name, cell[2]), name)
    return {s: g[target][0] for s, g in gp.get(key, {}).items()}


def table(gp: Goodputs, migs: list[str]) -> list[dict[str, Any]]:
    """Per (cell, migration, target): each variant's goodput over the better baseline's."""
    names = list(dict.fromkeys(key[3] for key in gp))
    out = []
    for rep, kv in sorted({key[:2] for key in gp}):
        for mig, target in itertools.product(migs, TARGETS):
            cell = (rep, kv, mig)
            base = {n: _series(gp, cell, n, target) for n in ("least-load", "llumnix")}
            if not all(base.values()):
                continue
            better = max(base, key=lambda n: geomean(list(base[n].values())))
            row = {"replicas": rep, "kv_units": kv, "migration": mig, "target": target,
                   "better": better, "better_req_s": geomean(list(base[better].values())),
                   "ratio": {}}
            for n in names:
                mine = _series(gp, cell, n, target)
                if mine and n != better:
                    row["ratio"][n] = paired_interval(mine, base[better])
            out.append(row)
    return out


def markdown(tab: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(n for t in tab for n in t["ratio"]))
    lines = ["| cell | migration | attainment | better (req/s) | "
             + " | ".join(f"{n} / better [95%]" for n in names) + " |",
             "|---" * (4 + len(names)) + "|"]
    for t in tab:
        cols = []
        for n in names:
            iv = t["ratio"].get(n)
            cols.append(f"{iv[0]:.3f} [{iv[1]:.2f}, {iv[2]:.2f}] ({iv[3]})" if iv else "-")
        lines.append(f"| {t['replicas']} x {t['kv_units']:g} | {t['migration']} | "
                     f"{t['target']:.0%} | {t['better']} ({t['better_req_s']:.2f}) | "
                     + " | ".join(cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", required=True,
                   help="a headroom.py JSON whose 'rates' calibrate each cell")
    add_cell_arguments(p, replicas="4", kv_units="4,16")
    p.add_argument("--scales", default="0.5,0.7,1,1.4,2,2.8,4",
                   help="rates of the scan, as multiples of the cell's calibrated rate")
    p.add_argument("--variant", type=parse_variant, action="append", default=[])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reuse", help="JSON of an earlier run: keep its rows")
    p.add_argument("--out")
    args = p.parse_args(argv)
    with open(args.rates) as f:
        rates = {(r["replicas"], r["kv_units"]): r["rate"] for r in json.load(f)["rates"]}
    reps = [int(x) for x in args.replicas.split(",")]
    units = [float(x) for x in args.kv_units.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    scales = sorted(float(x) for x in args.scales.split(","))
    migs = args.migration.split(",")
    variants = args.variant or list(DEFAULT_VARIANTS)
    rows: list[dict[str, Any]] = []
    if args.reuse:
        with open(args.reuse) as f:
            rows = json.load(f)["rows"]
    have = {(r["replicas"], r["kv_units"], r["migration"], r["variant"], r["seed"],
             round(r["rate"], 9)) for r in rows}
    jobs = []
    for rep in reps:
        for kv in units:
            if (rep, kv) not in rates:
                raise SystemExit(f"no calibrated rate for {rep} x {kv:g} in {args.rates}")
            n = rep * max(args.requests_per_replica, round(4 * kv))
            for v in variants:
                for mig in (["-"] if v.policy == "least-load" else migs):
                    sets = (MIGRATION_OFF.get(v.policy, ()) if mig == "off"
                            else MIGRATION.get(mig, ()))
                    for seed in seeds:
                        for s in scales:
                            rate = rates[rep, kv] * s
                            if (rep, kv, mig, v.name, seed, round(rate, 9)) in have:
                                continue
                            jobs.append({"workload": args.workload, "model": args.model,
                                         "replicas": rep, "kv_units": kv, "requests": n,
                                         "kv_scale": kv_scale(kv, args.model, args.workload),
                                         "rate": rate, "seed": seed, "policy": v.policy,
                                         "variant": v.name, "spec": v.spec, "migration": mig,
                                         "overrides": (*sets, *v.overrides)})
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for i, row in enumerate(pool.map(run_one, jobs, chunksize=1)):
            rows.append(row)
            if (i + 1) % 20 == 0:
                print(f"{i + 1}/{len(jobs)} runs, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump({"rows": rows}, f)
    asked = [r for r in rows if r["replicas"] in reps and r["kv_units"] in units
             and r["seed"] in seeds]
    gp = goodputs(asked)
    tab = table(gp, migs)
    flagged = sorted(f"{k} seed {s} at {t:.0%}: {flag}" for k, by_seed in gp.items()
                     for s, g in by_seed.items() for t, (_, flag) in g.items() if flag)
    out = {"command": " ".join(sys.argv), "scales": scales, "wall_s": time.perf_counter() - t0,
           "rows": rows, "goodput": tab, "off_grid": flagged}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    else:
        print(json.dumps(out, indent=1))
    print(markdown(tab), file=sys.stderr)
    print(f"wall {out['wall_s']:.0f} s, {len(jobs)} runs; {len(flagged)} scans crossed outside "
          "the grid (JSON 'off_grid')", file=sys.stderr)


if __name__ == "__main__":
    main()
