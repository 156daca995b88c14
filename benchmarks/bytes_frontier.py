"""P99 TPOT against KV bytes moved: what ARES's migrations buy, per byte (issue 16).

Issue 16 asks ARES to move at most half of llumnix's KV bytes at equal or better P99 TPOT. This
reads the per-seed rows of ``benchmarks/headroom.py`` runs (one or more ``--out`` files, merged)
and places, in each cell, every policy at (GB moved per run, P99 TPOT over the better of
least-load and llumnix). ARES rows whose variant is named ``ares-capN`` (at most N migrations
started per minute, ``cluster.migration.max_starts_per_minute=N``) trace its frontier from no
migration (ARES in the cell's ``off`` setting, 0 bytes) to the uncapped default. The target
region is shaded: at most half of llumnix's bytes, P99 TPOT no worse than llumnix's.

    .venv/bin/python benchmarks/bytes_frontier.py out/a.json out/b.json \\
        --cells 16x16:fast,16x16:costly,4x16:fast,4x16:costly --plot docs/img/bytes_frontier.png

JSON on stdout (per cell and policy: seeds, GB moved per run, its ratio to llumnix's, P99 TPOT
ratio to the better baseline with its paired 95% interval), a markdown table on stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

import numpy as np
from headroom import geomean, paired_interval

CAP = re.compile(r"^ares-cap(\d+)$")


def load_rows(paths: list[str]) -> list[dict[str, Any]]:
    """Every per-seed row of the files, the last file winning on duplicates."""
    rows: dict[tuple, dict[str, Any]] = {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["rows"]:
                rows[(r["replicas"], r["kv_units"], r["migration"], r["variant"], r["seed"])] = r
    return list(rows.values())


def _series(rows: list[dict[str, Any]], rep: int, kv: float, mig: str,
            variant: str) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in rows if (r["replicas"], r["kv_units"], r["variant"]) ==
            (rep, kv, variant) and r["migration"] == mig}


def frontier(rows: list[dict[str, Any]], rep: int, kv: float, mig: str) -> dict[str, Any]:
    """One cell's points: each policy's GB per run and P99 TPOT ratio (with interval) to the
    better of least-load and llumnix, on the seeds every point shares."""
    least = _series(rows, rep, kv, "-", "least-load")
    points = {"least-load": least, "llumnix": _series(rows, rep, kv, mig, "llumnix"),
              "ares (no migration)": _series(rows, rep, kv, "off", "ares")}
    caps = sorted({int(m.group(1)) for r in rows if (m := CAP.match(r["variant"]))
                   and (r["replicas"], r["kv_units"], r["migration"]) == (rep, kv, mig)})
    for cap in caps:
        points[f"ares cap {cap}/min"] = _series(rows, rep, kv, mig, f"ares-cap{cap}")
    points["ares"] = _series(rows, rep, kv, mig, "ares")
    points = {k: v for k, v in points.items() if v}
    seeds = sorted(set.intersection(*(set(v) for v in points.values())))
    if not seeds or "llumnix" not in points or "least-load" not in points:
        raise SystemExit(f"{rep}x{kv:g} {mig}: needs least-load and llumnix rows on shared seeds")
    p99 = {k: {s: v[s]["tpot_ms_p99"] for s in seeds} for k, v in points.items()}
    better = min(("least-load", "llumnix"), key=lambda k: geomean(list(p99[k].values())))
    llumnix_gb = float(np.mean([points["llumnix"][s]["bytes_moved_gb"] for s in seeds]))
    out = []
    for name, series in points.items():
        gb = float(np.mean([series[s].get("bytes_moved_gb", 0.0) for s in seeds]))
        ratio = geomean(list(p99[name].values())) / geomean(list(p99[better].values()))
        out.append({"policy": name, "gb_per_run": gb,
                    "gb_vs_llumnix": gb / llumnix_gb if llumnix_gb else float("nan"),
                    "p99_vs_better": ratio,
                    "interval": None if name == better else paired_interval(p99[name],
                                                                             p99[better]),
                    "migrations": float(np.mean([series[s].get("migrations", 0) for s in seeds])),
                    "slo_attainment": float(np.mean([series[s]["slo_attainment"]
                                                     for s in seeds]))})
    return {"replicas": rep, "kv_units": kv, "migration": mig, "seeds": len(seeds),
            "better": better, "llumnix_gb": llumnix_gb, "points": out}


def markdown(cells: list[dict[str, Any]]) -> str:
    lines = ["| cell | seeds | policy | GB per run (x llumnix) | migrations | P99 TPOT / better "
             "[95% interval] | SLO att. | in the target region |", "|---" * 8 + "|"]
    for c in cells:
        llumnix = next(p for p in c["points"] if p["policy"] == "llumnix")
        for p in c["points"]:
            iv = p["interval"]
            ratio = f"{p['p99_vs_better']:.3f}" + (f" [{iv[1]:.2f}, {iv[2]:.2f}]" if iv else "")
            inside = (p["policy"].startswith("ares") and p["gb_vs_llumnix"] <= 0.5
                      and p["p99_vs_better"] <= llumnix["p99_vs_better"])
            lines.append(f"| {c['replicas']} x {c['kv_units']:g} {c['migration']} | "
                         f"{c['seeds']} | {p['policy']} | {p['gb_per_run']:.1f} "
                         f"({p['gb_vs_llumnix']:.2f}) | {p['migrations']:.0f} | {ratio} | "
                         f"{p['slo_attainment']:.3f} | {'yes' if inside else ''} |")
    return "\n".join(lines)


def plot(cells: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(3.9 * len(cells), 3.6), squeeze=False)
    for ax, c in zip(axes[0], cells, strict=True):
        pts = {p["policy"]: p for p in c["points"]}
        llumnix = pts["llumnix"]
        ax.axvspan(0, 0.5 * c["llumnix_gb"], ymax=1, color="tab:green", alpha=0.08)
        ax.axhline(llumnix["p99_vs_better"], color="tab:orange", lw=0.8, ls=":")
        line = [p for name, p in pts.items() if name.startswith("ares")]  # off, caps, default
        ax.plot([p["gb_per_run"] for p in line], [p["p99_vs_better"] for p in line],
                "-o", color="tab:blue", ms=4, label="ares: off, capped, default")
        for p in line:
            iv = p["interval"]
            if iv:
                ax.plot([p["gb_per_run"]] * 2, iv[1:3], color="tab:blue", alpha=0.3, lw=3)
            label = p["policy"].removeprefix("ares ").replace("(no migration)", "off")
            ax.annotate(label, (p["gb_per_run"], p["p99_vs_better"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        for name, color in (("llumnix", "tab:orange"), ("least-load", "tab:gray")):
            ax.plot(pts[name]["gb_per_run"], pts[name]["p99_vs_better"], "s", color=color,
                    label=name)
        ax.set_title(f"{c['replicas']} replicas, KV {c['kv_units']:g} units, {c['migration']} "
                     f"({c['seeds']} seeds)", fontsize=8)
        ax.set_xlabel("GB moved per run")
        ax.set_ylim(bottom=min(0.6, ax.get_ylim()[0]))
    axes[0][0].set_ylabel("P99 TPOT / better of least-load, llumnix")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle("What ARES's migrations buy (green: the target region, at most half of "
                 "llumnix's bytes; dotted: llumnix's P99 TPOT; bars: paired 95% intervals)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="headroom.py --out files (rows are merged)")
    p.add_argument("--cells", default="16x16:fast,16x16:costly,4x16:fast,4x16:costly",
                   help="REPLICASxKV:MIGRATION, comma-separated")
    p.add_argument("--plot", help="write the frontier plot here")
    args = p.parse_args(argv)
    rows = load_rows(args.files)
    cells = []
    for spec in args.cells.split(","):
        shape, _, mig = spec.partition(":")
        rep, _, kv = shape.partition("x")
        cells.append(frontier(rows, int(rep), float(kv), mig))
    print(markdown(cells), file=sys.stderr)
    if args.plot:
        plot(cells, args.plot)
    print(json.dumps({"command": " ".join(sys.argv), "cells": cells}, indent=1))


if __name__ == "__main__":
    main()
