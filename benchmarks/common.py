"""Shared helpers for the benchmarks: on-the-spot machine measurements, timing statistics and
stderr progress logging.

The machine measurements give the *floors* a decode step is set against:

- ``copy_bandwidth_gbs``: a large numpy array copy, counted as read + write bytes (the same
  accounting as a decode step, which reads weights and KV once each).
- ``matmul_gflops``: a square f32 matmul through numpy's BLAS and through XLA (the faster wins),
  for a compute floor when a batch is large enough to be compute bound.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np


def log(*parts: object) -> None:
    """Progress to stderr (stdout carries only the JSON)."""
    print(*parts, file=sys.stderr, flush=True)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls, in seconds (the least disturbed by other processes)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth_gbs(mib: int = 256, repeats: int = 7) -> float:
    """Memory copy bandwidth in GB/s (1e9 bytes), counting the bytes read plus the bytes
    written, from the fastest of ``repeats`` copies of a ``mib`` MiB float32 array."""
    n = mib * 2**20 // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    seconds = best_time(lambda: np.copyto(dst, src), repeats)
    return 2 * src.nbytes / seconds / 1e9


def matmul_gflops(n: int = 2048, repeats: int = 3) -> dict[str, float]:
    """f32 ``n x n @ n x n`` GFLOP/s through numpy (BLAS) and jax (XLA:CPU), best of
    ``repeats`` each."""
    import jax
    import jax.numpy as jnp

    flops = 2 * n**3
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), np.float32)
    out = {"numpy": flops / best_time(lambda: a @ b, repeats) / 1e9}
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    mm(ja, jb).block_until_ready()
    out["jax"] = flops / best_time(lambda: mm(ja, jb).block_until_ready(), repeats) / 1e9
    return out


def summarize_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Mean / median / p90 / min of per-step times, in milliseconds."""
    ms = sorted(1e3 * s for s in seconds)
    if not ms:
        return {"mean": float("nan"), "median": float("nan"), "p90": float("nan"),
                "min": float("nan")}
    return {
        "mean": statistics.fmean(ms),
        "median": statistics.median(ms),
        "p90": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
        "min": ms[0],
    }


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (how busy the shared machine was), if the OS says."""
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None
