"""The ARES load model: predicted KV and batch trajectories of each decode replica.

For the running requests ``r`` of a replica, with current KV tokens ``kv_r`` and remaining tokens
``rem_r`` (predicted, or true for the oracle), over a horizon of ``H`` decode steps:

* batch size ``B(t) = #{r : rem_r > t}``
* KV tokens  ``M(t) = sum over {r : rem_r > t} of (kv_r + t)``

``M`` rises by ``B`` tokens a step and drops when a request finishes, so its maximum over
``[0, H]`` is reached just before some request finishes (or at ``H``): :func:`peak_kv` evaluates
exactly those candidate times. ``B`` and ``M`` at a few sample times feed the step-cost model,
whose token-weighted mean over the horizon is the replica's predicted TPOT.

Everything is vectorised over all requests of all replicas at once: rows carry the position of
their replica, and per-replica sums are ``bincount`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ares_jax.scheduler.cost import StepCostModel


def sample_times(horizon_steps: int, samples: int) -> np.ndarray:
    """Evenly spaced sample steps ``0 .. horizon`` (the TPOT average is uniform in steps)."""
    if samples < 2:
        raise ValueError("need at least 2 sample points")
    return np.linspace(0.0, float(horizon_steps), samples)


def trajectories(
    kv: np.ndarray,
    remaining: np.ndarray,
    replica: np.ndarray,
    num_replicas: int,
    times: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """``(B, M)``, each ``[num_replicas, len(times)]``."""
    s = times.size
    alive = remaining[:, None] > times[None, :]
    bins = (replica[:, None] * s + np.arange(s)[None, :]).ravel()
    size = num_replicas * s
    batch = np.bincount(bins, weights=alive.ravel(), minlength=size)
    kv_at = np.where(alive, kv[:, None] + times[None, :], 0.0)
    memory = np.bincount(bins, weights=kv_at.ravel(), minlength=size)
    # (bincount of an empty array is integer-typed; callers add floats in place)
    return (batch.reshape(num_replicas, s).astype(np.float64),
            memory.reshape(num_replicas, s).astype(np.float64))


@dataclass(frozen=True, eq=False)
class _Segments:
    """Requests grouped by replica, latest finisher first. Rank ``k`` of a replica finishes at
    ``finish[k]``; on ``(finish[k+1], finish[k]]`` ranks ``0..k`` are alive and
    ``M(t) = alive_kv[k] + (k + 1) t`` rises (``M`` only drops at a finish)."""

    replica: np.ndarray  # replica of each row, sorted
    finish: np.ndarray  # remaining steps clipped to the horizon, descending per replica
    alive_kv: np.ndarray  # KV now of ranks 0..k
    rank: np.ndarray
    starts: np.ndarray  # first row of each replica's group
    lengths: np.ndarray


def _segments(kv: np.ndarray, remaining: np.ndarray, replica: np.ndarray,
              horizon_steps: int) -> _Segments:
    n = kv.shape[0]
    t = np.clip(remaining, 0.0, float(horizon_steps))
    order = np.lexsort((-t, replica))
    rep, kv_s = replica[order], kv[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, rep[1:] != rep[:-1]])
    lengths = np.diff(np.r_[starts, n])
    cum = np.cumsum(kv_s)
    return _Segments(
        replica=rep, finish=t[order],
        alive_kv=cum - np.repeat(cum[starts] - kv_s[starts], lengths),
        rank=np.arange(n) - np.repeat(starts, lengths), starts=starts, lengths=lengths,
    )


def peak_kv(
    kv: np.ndarray,
    remaining: np.ndarray,
    replica: np.ndarray,
    num_replicas: int,
    horizon_steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``max over t in [0, H] of M(t)`` per replica, and the step where it is reached."""
    peak = np.zeros(num_replicas)
    peak_at = np.zeros(num_replicas)
    if kv.shape[0] == 0:
        return peak, peak_at
    g = _segments(kv, remaining, replica, horizon_steps)
    # Just before a request finishes, every request ranked at or above it is still alive.
    m = g.alive_kv + (g.rank + 1) * g.finish
    group_peak = np.maximum.reduceat(m, g.starts)
    at_peak = np.where(m == np.repeat(group_peak, g.lengths), g.finish, -1.0)
    peak[g.replica[g.starts]] = group_peak
    peak_at[g.replica[g.starts]] = np.maximum.reduceat(at_peak, g.starts)
    return peak, peak_at


def steps_to_overflow(
    kv: np.ndarray,
    remaining: np.ndarray,
    replica: np.ndarray,
    num_replicas: int,
    budget: np.ndarray,
    horizon_steps: int,
) -> np.ndarray:
    """Exact first step ``t in [0, H]`` with ``M(t) > budget`` per replica (``inf``: never):
    a rising segment of ``M`` crosses the budget inside it, or is already over it at ``t = 0``."""
    out = np.full(num_replicas, np.inf)
    budget = np.broadcast_to(np.asarray(budget, dtype=np.float64), (num_replicas,))
    out[budget < 0] = 0.0
    if kv.shape[0] == 0:
        return out
    g = _segments(kv, remaining, replica, horizon_steps)
    seg_start = np.r_[g.finish[1:], 0.0]
    seg_start[g.starts + g.lengths - 1] = 0.0  # a replica's last rank is alive from t = 0
    at_budget = (budget[g.replica] - g.alive_kv) / (g.rank + 1)  # over the budget just after
    cross = np.where(at_budget < g.finish, np.maximum(at_budget, seg_start), np.inf)
    first = np.minimum.reduceat(cross, g.starts)
    out[g.replica[g.starts]] = np.minimum(out[g.replica[g.starts]], first)
    return out


def kv_alive_at(
    kv: np.ndarray,
    remaining: np.ndarray,
    replica: np.ndarray,
    num_replicas: int,
    step: float,
) -> np.ndarray:
    """``M`` just before ``step`` (requests with ``rem >= step`` still alive), per replica."""
    alive = remaining >= step
    return np.bincount(replica[alive], weights=kv[alive] + step, minlength=num_replicas)


def weighted_tpot(cost: StepCostModel, batch: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """Token-weighted mean step time over the samples (0 for a replica with no work)."""
    step = cost.step_ms(batch, memory)
    tokens = batch.sum(axis=-1)
    return np.where(tokens > 0, (step * batch).sum(axis=-1) / np.maximum(tokens, 1), 0.0)


@dataclass(frozen=True, kw_only=True, eq=False)
class LoadForecast:
    """The predicted load of every replica over the horizon."""

    times: np.ndarray  # [S] sample steps
    batch: np.ndarray  # [R, S] B(t)
    memory: np.ndarray  # [R, S] M(t), KV tokens of running requests
    peak: np.ndarray  # [R] exact peak of M over the horizon
    peak_at: np.ndarray  # [R] step of that peak
    tpot_ms: np.ndarray  # [R] predicted TPOT


def forecast(
    kv: np.ndarray,
    remaining: np.ndarray,
    replica: np.ndarray,
    num_replicas: int,
    cost: StepCostModel,
    *,
    horizon_steps: int,
    samples: int,
) -> LoadForecast:
    times = sample_times(horizon_steps, samples)
    kv = kv.astype(np.float64)
    batch, memory = trajectories(kv, remaining, replica, num_replicas, times)
    peak, peak_at = peak_kv(kv, remaining, replica, num_replicas, horizon_steps)
    return LoadForecast(
        times=times,
        batch=batch,
        memory=memory,
        peak=peak,
        peak_at=peak_at,
        tpot_ms=weighted_tpot(cost, batch, memory),
    )


def coefficient_of_variation(values: np.ndarray) -> float:
    mean = float(np.mean(values)) if values.size else 0.0
    return float(np.std(values) / mean) if mean > 0 else 0.0
