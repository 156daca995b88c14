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
from functools import lru_cache

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


def step_work(cost: StepCostModel, batch: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """Token-time of each sample (step time x batch size), what :func:`weighted_tpot` sums."""
    return cost.step_ms(batch, memory) * batch


def tpot_of_work(work: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """:func:`weighted_tpot` from :func:`step_work` and ``tokens = batch.sum(axis=-1)``."""
    return np.where(tokens > 0, work.sum(axis=-1) / np.maximum(tokens, 1), 0.0)


def weighted_tpot(cost: StepCostModel, batch: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """Token-weighted mean step time over the samples (0 for a replica with no work)."""
    return tpot_of_work(step_work(cost, batch, memory), batch.sum(axis=-1))


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


# ----------------------------------------------------------------------------------------------
# Rows grouped by replica, longest remaining first: one sort serves every per-replica query.


@dataclass(frozen=True, eq=False)
class GroupedRows:
    """The rows of a request table grouped by replica, each group longest remaining first
    (ties in no particular order), with what the load model asks of them precomputed.

    Per-replica threshold queries ("how many rows of each replica have ``rem >= t``") are one
    ``searchsorted`` of ``num_replicas`` integer keys: ``key`` orders positions by (replica,
    descending *level* of ``rem``), where the level is the rank of ``rem`` among the distinct
    values (``levels``), so the comparison is exact whatever the floats.
    """

    rows: np.ndarray  # [N] row index at each position
    starts: np.ndarray  # [R] first position of each replica (empty groups included)
    lengths: np.ndarray  # [R]
    rem: np.ndarray  # [N] remaining steps at each position (descending within a group)
    prefix: np.ndarray  # [N + 1] running KV sum: prefix[i] = kv[:i].sum()
    key: np.ndarray  # [N] int64 replica * U + (U - 1 - level): ascending
    levels: np.ndarray  # [U] distinct remaining values, ascending
    key_base: np.ndarray  # [R] replica * U: the keys of each replica start there
    start_prefix: np.ndarray  # [R] prefix[starts]: the running KV sum before each replica

    def count(self, t: np.ndarray | float, *, strict: bool) -> np.ndarray:
        """Rows per replica with ``rem > t`` (``strict``) or ``rem >= t``: ``[..., R]``."""
        t = np.asarray(t, dtype=np.float64)
        u = self.levels.shape[0]
        level = np.searchsorted(self.levels, t, side="right" if strict else "left")
        bound = self.key_base + (u - 1 - level)[..., None]
        return np.searchsorted(self.key, bound, side="right") - self.starts

    def kv_of_first(self, counts: np.ndarray) -> np.ndarray:
        """KV of the first ``counts`` rows (the longest remaining) of each replica."""
        return self.prefix[self.starts + counts] - self.start_prefix


@lru_cache(maxsize=4)
def _positions(n: int, dtype: type) -> np.ndarray:
    """``np.arange(n, dtype=dtype)``, read-only and shared (a table keeps its size between
    the calls on one snapshot, and between snapshots while no request starts or ends)."""
    out = np.arange(n, dtype=dtype)
    out.setflags(write=False)
    return out


def _descending(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``values`` (float64, no NaN) in descending order, ties in any order, and
    the values in that order.

    numpy sorts float values with SIMD instructions but float *indices* (argsort) without, at
    3x the cost on 32k rows. So each value's lowest mantissa bits are replaced by its index, the
    keys sorted as floats, and the indices read back from the bits: distinct values keep their
    order unless they agree in every other bit (a relative difference below ~2^-37 for 32k
    rows), which the check below catches, falling back to argsort."""
    n = values.shape[0]
    bits = max(n - 1, 1).bit_length()
    if n > 1 and bits <= 24:
        mask = (1 << bits) - 1
        key_bits = np.ascontiguousarray(values, dtype=np.float64).view(np.int64) & ~mask
        key_bits |= _positions(n, np.int64)
        key = key_bits.view(np.float64)
        key.sort()
        order = (key.view(np.int64) & mask)[::-1]
        ordered = values[order]
        if (ordered[1:] <= ordered[:-1]).all():
            return order, ordered
    order = np.argsort(values)[::-1]
    return order, values[order]


def _stable_order(keys: np.ndarray, bound: int) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` of integer keys in ``[0, bound)``.

    When key and position fit in 31 bits together, the keys are sorted as ``key << b |
    position`` in int32 and the positions read back from the low bits: distinct values, so
    any sort is stable. numpy sorts 32-bit integers with SIMD instructions: on 32k rows of
    this project's AVX2 machine, ~150 us against ~290 us for int64 and 370-470 us for the
    radix sort of one-byte keys this replaces."""
    n = keys.shape[0]
    bits = max(n - 1, 1).bit_length()
    if (bound - 1).bit_length() + bits <= 31:
        packed = np.left_shift(keys, bits, dtype=np.int32, casting="unsafe")  # (keys fit)
        packed |= _positions(n, np.int32)
        packed.sort()
        packed &= (1 << bits) - 1
        return packed.astype(np.intp)
    # (the narrowest type: a radix sort makes one pass per byte)
    dtype = np.uint8 if bound <= 2**8 else np.int16 if bound < 2**15 else np.int64
    return np.argsort(keys.astype(dtype), kind="stable")


def group_rows(kv: np.ndarray, remaining: np.ndarray, replica: np.ndarray,
               num_replicas: int) -> GroupedRows:
    """Sort rows by (replica, remaining descending): one float sort by ``remaining`` (which
    also ranks it), then a stable integer sort by replica (:func:`_stable_order`). Rows
    with equal ``remaining`` come in no particular order (3x faster than a lexsort that would
    order them too); :meth:`Board.candidates` orders them where it matters."""
    n = remaining.shape[0]
    by_rem, ordered = _descending(remaining)
    first = np.empty(n, dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    levels = ordered[first][::-1].copy()  # ascending
    level_desc_1 = np.cumsum(first)  # 1 + the level counted from the largest value
    by_rep = _stable_order(replica[by_rem], num_replicas)
    rows = by_rem[by_rep]
    lengths = np.bincount(replica, minlength=num_replicas).astype(np.int64)
    key_base = np.arange(num_replicas, dtype=np.int64) * levels.shape[0]
    kv_s = kv[rows]
    prefix = np.zeros(n + 1)
    if kv_s.dtype.kind in "iu":
        # KV tokens are integers: their running sum in int64 is exact, as it is in float64
        # (below 2**53), and numpy accumulates int64 ~5x faster than float64.
        prefix[1:] = np.cumsum(kv_s, dtype=np.int64)
    else:
        np.cumsum(kv_s, out=prefix[1:])
    starts = np.cumsum(lengths) - lengths
    return GroupedRows(
        rows=rows, starts=starts, lengths=lengths, rem=ordered[by_rep], prefix=prefix,
        # Grouped by replica: each position's replica base, repeated (no gather), plus its
        # level (integers: the same keys however they are summed).
        key=np.repeat(key_base - 1, lengths) + level_desc_1[by_rep], levels=levels,
        key_base=key_base, start_prefix=prefix[starts],
    )


def grouped_trajectories(g: GroupedRows, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(B, M)`` of :func:`trajectories` from grouped rows: alive rows are a prefix of each
    group, so ``B`` is a count and ``M`` a prefix sum plus ``B * t``."""
    alive = g.count(times, strict=True)  # [S, R]
    memory = g.kv_of_first(alive) + alive * times[:, None]
    return alive.T.astype(np.float64), np.ascontiguousarray(memory.T)


@dataclass(frozen=True, eq=False)
class Segments:
    """Groups of rows laid end to end, each sorted by ``finish`` descending: the rising
    segments of each group's ``M`` that :func:`peak_kv` and :func:`steps_to_overflow` evaluate.
    Rank ``k`` of a group finishes at ``finish[k]``; up to then ranks ``0..k`` are alive and
    ``M(t) = alive_kv[k] + (k + 1) t``. Computed once per table, shared by the peak and the
    budget crossings."""

    finish: np.ndarray  # [N] remaining steps clipped to the horizon
    alive_kv: np.ndarray  # [N] KV now of ranks 0..k of the row's group
    rank1: np.ndarray  # [N] k + 1
    lengths: np.ndarray  # [G]
    busy: np.ndarray  # groups with rows
    starts: np.ndarray  # first row of each busy group
    sizes: np.ndarray  # rows of each busy group


def segments_of(finish: np.ndarray, kv: np.ndarray, lengths: np.ndarray) -> Segments:
    """:class:`Segments` of rows laid end to end, ``lengths`` per group, each group sorted by
    ``finish`` descending (KV sums: integers, exact whatever the order)."""
    n = finish.shape[0]
    busy = np.flatnonzero(lengths)
    starts, sizes = (np.cumsum(lengths) - lengths)[busy], lengths[busy]
    cum = np.cumsum(kv)
    return Segments(finish=finish, alive_kv=cum - np.repeat(cum[starts] - kv[starts], sizes),
                    rank1=np.arange(n) - np.repeat(starts, sizes) + 1, lengths=lengths,
                    busy=busy, starts=starts, sizes=sizes)


def grouped_segments(g: GroupedRows, horizon_steps: int) -> Segments:
    """:func:`segments_of` the table's grouping (its running KV sums are already there)."""
    n = g.rows.shape[0]
    busy = np.flatnonzero(g.lengths)
    # (np.clip's values: no NaN; minimum and maximum cost less on every row)
    return Segments(finish=np.minimum(np.maximum(g.rem, 0.0), float(horizon_steps)),
                    alive_kv=g.prefix[1:] - np.repeat(g.prefix[g.starts], g.lengths),
                    rank1=np.arange(n) - np.repeat(g.starts, g.lengths) + 1, lengths=g.lengths,
                    busy=busy, starts=g.starts[busy], sizes=g.lengths[busy])


def segments_peak(s: Segments) -> tuple[np.ndarray, np.ndarray]:
    """:func:`peak_kv` of each group (the same arithmetic, so the same values)."""
    peak, peak_at = np.zeros(s.lengths.shape[0]), np.zeros(s.lengths.shape[0])
    if s.finish.shape[0] == 0:
        return peak, peak_at
    # Just before a request finishes, every request ranked at or above it is still alive.
    m = s.alive_kv + s.rank1 * s.finish
    group_peak = np.maximum.reduceat(m, s.starts)
    at_peak = np.where(m == np.repeat(group_peak, s.sizes), s.finish, -1.0)
    peak[s.busy] = group_peak
    peak_at[s.busy] = np.maximum.reduceat(at_peak, s.starts)
    return peak, peak_at


def segments_crossings(s: Segments, budget: np.ndarray) -> np.ndarray:
    """:func:`steps_to_overflow` of each group: the first step its ``M`` passes its budget
    (``inf``: never). The arithmetic is ``steps_to_overflow``'s."""
    out = np.full(s.lengths.shape[0], np.inf)
    out[budget < 0] = 0.0
    n = s.finish.shape[0]
    if n == 0:
        return out
    seg_start = np.empty(n)  # (np.r_ costs more than the rest of a small call)
    seg_start[:-1], seg_start[-1] = s.finish[1:], 0.0
    seg_start[s.starts + s.sizes - 1] = 0.0  # a group's last rank is alive from t = 0
    at_budget = (np.repeat(budget, s.lengths) - s.alive_kv) / s.rank1
    cross = np.where(at_budget < s.finish, np.maximum(at_budget, seg_start), np.inf)
    out[s.busy] = np.minimum(out[s.busy], np.minimum.reduceat(cross, s.starts))
    return out
