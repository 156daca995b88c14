"""Figures (matplotlib, Agg backend): P99 TPOT against rate, and per-replica load timelines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ares_jax.sim.simulator import SimResult  # noqa: E402


def plot_tpot_vs_rate(
    curves: Mapping[str, Sequence[tuple[float, float]]], path: Path, *, slo_ms: float | None = None
) -> Path:
    """``curves``: policy -> [(rate, p99 TPOT ms)]."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, points in curves.items():
        pts = sorted(points)
        ax.plot([r for r, _ in pts], [t for _, t in pts], marker="o", label=policy)
    if slo_ms is not None:
        ax.axhline(slo_ms, color="grey", linestyle="--", linewidth=1, label="TPOT SLO")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("P99 TPOT (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_load_timelines(results: Mapping[str, SimResult], path: Path) -> Path:
    """One panel per policy: each decode replica's KV use over time, and the TPOT CV."""
    fig, axes = plt.subplots(len(results), 1, figsize=(7, 2.6 * len(results)), squeeze=False)
    for ax, (policy, result) in zip(axes[:, 0], results.items(), strict=True):
        tl = result.timeline
        ax.plot(tl.times_s, tl.kv_fraction, linewidth=0.6, alpha=0.7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("KV used / capacity")
        cv = tl.tpot_cv.mean() if tl.tpot_cv.size else 0.0
        ax.set_title(f"{policy}: per-replica KV use (mean TPOT CV {cv:.2f}, "
                     f"{result.counters['preemptions']} preemptions)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
