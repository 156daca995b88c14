"""The table's forecast, the starting point of every ARES call (see :mod:`board`).

:func:`base_forecast` groups the request table's rows by replica, longest remaining first (one
sort, memoised on the table), and derives every replica's batch and KV trajectory, predicted
peak and TPOT from that grouping; :func:`_replicas_forecast` does the same for the few replicas
a call changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from ares_jax.scheduler.cost import StepCostModel
from ares_jax.scheduler.load import (
    GroupedRows,
    Segments,
    group_rows,
    grouped_segments,
    grouped_trajectories,
    sample_times,
    segments_of,
    segments_peak,
    step_work,
    tpot_of_work,
)
from ares_jax.scheduler.state import RequestTable

if TYPE_CHECKING:
    from ares_jax.scheduler.ares import AresConfig


def estimate_remaining(table: RequestTable, cfg: AresConfig) -> np.ndarray:
    """Remaining tokens per row: prediction (or truth for the oracle), prior when unknown,
    clipped to what ``max_tokens`` still allows."""
    rem = table.predicted_remaining
    if cfg.remaining_scale != 1.0:
        rem = rem * cfg.remaining_scale
    if cfg.use_true_remaining:
        rem = np.where(np.isnan(table.true_remaining), rem, table.true_remaining)
    rem = np.where(np.isnan(rem), cfg.prior_remaining_tokens, rem)
    allowed = np.maximum(table.max_tokens - table.generated_tokens, 0)
    # (np.clip's value: no NaN is left; minimum/maximum cost less on 32k rows)
    return np.minimum(np.maximum(rem, 0.0), allowed).astype(np.float64, copy=False)


@dataclass(frozen=True, eq=False)
class BaseForecast:
    """The forecast of a request table (rows in table order, replicas in snapshot order)."""

    kv: np.ndarray  # [N] float
    rem: np.ndarray  # [N]
    rep: np.ndarray  # [N] int64
    groups: GroupedRows
    segments: Segments  # of the grouping: its peaks, and its budget crossings per snapshot
    batch: np.ndarray  # [R, S]
    memory: np.ndarray  # [R, S]
    peak: np.ndarray  # [R]
    peak_at: np.ndarray  # [R]
    work: np.ndarray  # [R, S] step time x batch size (step_work)
    tokens: np.ndarray  # [R] batch sizes summed over the samples
    tpot: np.ndarray  # [R]


@lru_cache(maxsize=4)
def base_forecast(
    table: RequestTable, num_replicas: int, cost: StepCostModel, cfg: AresConfig
) -> BaseForecast:
    """The forecast of a request table. Memoised on the table's identity: a caller that reuses
    a snapshot for several dispatch calls (a scheduler polling replica state periodically, as
    Llumnix does) pays for it once."""
    kv = table.kv_tokens.astype(np.float64)
    rem = estimate_remaining(table, cfg)
    rep = table.replica.astype(np.int64, copy=False)  # (read-only: boards copy to move)
    # (the integer column: group_rows sums it in int64, faster and the same values)
    groups = group_rows(table.kv_tokens if table.kv_tokens.dtype.kind in "iu" else kv,
                        rem, rep, num_replicas)
    batch, memory = grouped_trajectories(groups, sample_times(cfg.horizon_steps, cfg.samples))
    segments = grouped_segments(groups, cfg.memory_horizon_steps)
    peak, peak_at = segments_peak(segments)
    work, tokens = step_work(cost, batch, memory), batch.sum(axis=1)
    return BaseForecast(kv=kv, rem=rem, rep=rep, groups=groups, segments=segments,
                        batch=batch, memory=memory,
                        peak=peak, peak_at=peak_at, work=work, tokens=tokens,
                        tpot=tpot_of_work(work, tokens))


def _replicas_forecast(kv: np.ndarray, rem: np.ndarray, lengths: np.ndarray, times: np.ndarray,
                       horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(B, M, peak, peak_at)`` of a few replicas whose rows are laid end to end (``lengths``
    each), each group sorted by ``rem`` descending: :func:`grouped_trajectories` and
    :func:`segments_peak` for rows that are not in the table's grouping."""
    # Groups are contiguous: per-group sums are differences of running sums (counts and
    # integer KV sums, exact in float64 whatever the order).
    alive = (rem[:, None] > times[None, :]).astype(np.float64)  # [n, S]
    ends = np.cumsum(lengths)
    running = np.zeros((kv.shape[0] + 1, 2 * times.shape[0]))
    np.cumsum(np.concatenate([alive, kv[:, None] * alive], axis=1), axis=0, out=running[1:])
    sums = running[ends] - running[ends - lengths]
    batch, memory = sums[:, :times.shape[0]], sums[:, times.shape[0]:]
    memory += batch * times[None, :]
    return (batch, memory, *_replicas_peak(kv, rem, lengths, horizon))


def _replicas_peak(kv: np.ndarray, rem: np.ndarray, lengths: np.ndarray,
                   horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(peak, peak_at)`` part of :func:`_replicas_forecast`."""
    finish = np.minimum(np.maximum(rem, 0.0), float(horizon))
    return segments_peak(segments_of(finish, kv, lengths))


@lru_cache(maxsize=8)
def _samples(horizon_steps: int, samples: int) -> tuple[np.ndarray, list[float], bool]:
    """The sample steps (read-only, shared by every board), as a list (``bisect``: one scalar
    lookup, no numpy call), and whether they are all integers: KV tokens are, so then every
    trajectory sum is exact in float64 whatever the order, and a move can add and subtract the
    moved row's share instead of re-summing both replicas (the same values)."""
    times = sample_times(horizon_steps, samples)
    times.setflags(write=False)
    return times, times.tolist(), bool(np.all(times == np.floor(times)))
