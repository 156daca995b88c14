"""Request arrival times: Poisson (burstiness 1) or gamma-distributed gaps, as ``vllm bench serve``
draws them, plus the check that a trace's own timestamps are usable."""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(n: int, request_rate: float, burstiness: float = 1.0,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Send offsets in seconds from the start of the run, for ``n`` requests.

    The first request goes at 0 and each gap after it is drawn from a gamma distribution with
    shape ``burstiness`` and mean ``1 / request_rate`` (scale = 1 / (rate * burstiness)), which is
    vLLM's generator: burstiness 1 is a Poisson process, below 1 burstier, above 1 more regular.
    ``request_rate = inf`` sends everything at once.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (inf = all at once), got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(request_rate) or n == 0:
        return np.zeros(n)
    rng = rng if rng is not None else np.random.default_rng(0)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def trace_offsets(arrival_s: np.ndarray) -> np.ndarray:
    """A trace's arrival times shifted so its first request goes at 0 (the gaps are kept).
    Rows must already be in time order: a replayed trace that goes back in time is a broken
    file, not something to sort silently."""
    arrival_s = np.asarray(arrival_s, dtype=np.float64)
    if arrival_s.size == 0:
        return arrival_s
    if not np.all(np.isfinite(arrival_s)):
        raise ValueError("trace arrival_s values must be finite numbers")
    if np.any(np.diff(arrival_s) < 0):
        bad = int(np.argmax(np.diff(arrival_s) < 0)) + 1
        raise ValueError(f"trace arrival_s must be non-decreasing; row {bad} goes back in time "
                         f"({arrival_s[bad - 1]} -> {arrival_s[bad]})")
    return arrival_s - arrival_s[0]
