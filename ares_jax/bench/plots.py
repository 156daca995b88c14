"""``--plot DIR``: latency CDFs and a timeline of the run (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ares_jax.bench.records import RequestRecord


def write_plots(records: Sequence[RequestRecord], duration_s: float,
                out_dir: str | Path) -> list[Path]:
    """Writes ``latency_cdf.png`` (TTFT, TPOT, E2EL) and ``timeline.png`` (output tokens/s and
    requests in flight per second; TTFT and E2EL of each request at its send time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in records if r.success]
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    series = {
        "TTFT": [r.ttft_s for r in ok if r.ttft_s is not None],
        "TPOT": [r.tpot_s for r in ok if r.tpot_s is not None],
        "E2EL": [r.e2el_s for r in ok if r.e2el_s is not None],
    }
    for ax, (name, values) in zip(axes, series.items()):
        if values:
            ms = np.sort(np.asarray(values) * 1000.0)
            ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post")
            for p in (50, 99):
                ax.axvline(np.percentile(ms, p), ls=":", c="grey")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{name} CDF ({len(values)} requests)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    seconds = max(1, math.ceil(duration_s))
    tokens = np.zeros(seconds)
    in_flight = np.zeros(seconds)
    for r in ok:
        for t, n in zip(r.chunk_times_s, r.chunk_tokens):
            tokens[min(int(t), seconds - 1)] += n
    for r in records:
        if r.end_s is not None:
            # Mean number of open requests in each second.
            for s in range(int(r.send_s), min(int(math.ceil(r.end_s)), seconds)):
                in_flight[s] += max(0.0, min(r.end_s, s + 1) - max(r.send_s, s))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    x = np.arange(seconds) + 0.5
    ax1.plot(x, tokens, label="output tokens/s")
    ax1.set_ylabel("output tokens/s")
    ax1b = ax1.twinx()
    ax1b.plot(x, in_flight, c="tab:orange", label="requests in flight")
    ax1b.set_ylabel("requests in flight")
    handles = ax1.get_legend_handles_labels()[0] + ax1b.get_legend_handles_labels()[0]
    ax1.legend(handles, [h.get_label() for h in handles], loc="upper right")
    ax1.set_title("throughput over the run")
    ax1.grid(alpha=0.3)
    timed = [r for r in ok if r.ttft_s is not None and r.e2el_s is not None]
    ax2.scatter([r.send_s for r in timed], [1000 * r.ttft_s for r in timed], s=6, label="TTFT")
    ax2.scatter([r.send_s for r in timed], [1000 * r.e2el_s for r in timed], s=6, label="E2EL")
    failed = [r.send_s for r in records if not r.success]
    if failed:
        ax2.scatter(failed, np.zeros(len(failed)), marker="x", c="red", label="failed")
    ax2.set_xlabel("send time (s from start)")
    ax2.set_ylabel("latency (ms)")
    ax2.set_title("per-request latency by send time")
    ax2.legend(loc="upper left")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "timeline.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
