"""The forecast ARES works on during one policy call: every replica's predicted load, updated
as the call places requests and plans migrations.

Flow of a call: :func:`base_forecast` (:mod:`forecast`) groups the request table's rows by
replica, longest remaining first (one sort, memoised on the table), and derives every replica's
batch and KV trajectory, predicted peak and TPOT from that grouping. A :class:`Board` starts
from it; a replica that a placement or a move changes gets its own row list (``Board._rows``)
and its forecast is recomputed from that; every query reads the grouping for the untouched
replicas and the row lists for the touched ones. The queries are batched: "if each of these
requests joined (or left) each of these replicas" is one numpy evaluation, not a Python loop
over requests.

Sums of KV tokens are sums of integers, exact in float64, so the values (and the decisions built
on them) are those of the per-request formulation in docs/SIMULATOR.md, section 2.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import numpy as np

from ares_jax.scheduler.cost import StepCostModel
from ares_jax.scheduler.forecast import (  # (estimate_remaining: re-exported)
    _replicas_forecast,
    _samples,
    base_forecast,
    estimate_remaining,
)
from ares_jax.scheduler.load import segments_crossings, segments_of, step_work, tpot_of_work
from ares_jax.scheduler.state import ClusterSnapshot

if TYPE_CHECKING:
    from ares_jax.scheduler.ares import AresConfig

__all__ = ["Board", "base_forecast", "estimate_remaining"]


class _ChangeLog:
    """Rows that changed replica during a call, as ``[4, size]`` columns (remaining, KV,
    replica, sign) filled in place, and as a list of the same tuples."""

    def __init__(self, sign: float) -> None:
        self.sign = sign
        self.size = 0
        self._cols = np.empty((4, 16))
        self.rows: list[tuple[float, float, int, float]] = []

    def add(self, rem: float, kv: float, replica: int) -> None:
        if self.size == self._cols.shape[1]:
            self._cols = np.concatenate([self._cols, np.empty_like(self._cols)], axis=1)
        self._cols[:, self.size] = (rem, kv, replica, self.sign)
        self.rows.append((rem, kv, replica, self.sign))
        self.size += 1

    def view(self) -> np.ndarray:
        return self._cols[:, :self.size]


class Board:
    """Mutable forecast of every replica for the duration of one policy call.

    Rows are indexed as in the snapshot's request table; :meth:`place` appends rows after them
    (at most ``room`` of them).
    """

    def __init__(self, snapshot: ClusterSnapshot, cost: StepCostModel, cfg: AresConfig,
                 *, room: int = 0) -> None:
        self.cost = cost
        self.horizon = cfg.memory_horizon_steps
        self.times, self._time_list, self._exact_sums = _samples(cfg.horizon_steps, cfg.samples)
        self.n = snapshot.num_replicas
        self.everyone = np.arange(self.n)  # positions: every replica (queries need no gather)
        self.idle = (snapshot.batch_size == 0) & (snapshot.queued_count == 0)
        base = base_forecast(snapshot.table(), self.n, cost, cfg)
        # (the memo's: read-only)
        self.groups, self._segments, self._base_peak = base.groups, base.segments, base.peak
        self._ranks = np.arange(1, int(base.groups.lengths.max(initial=0)) + 9)  # (_peak_of)
        self.size = base.kv.shape[0]  # rows in use
        self._capacity = self.size + room
        # The row columns (kv, rem, rep) are the table's, shared with the memo (never
        # written), until a column is read after a placement or a row moves: then copied with
        # the placed rows after the table's. Dispatch does neither, and copying three columns
        # of every running request cost more than the rest of setting up.
        self._kv, self._rem, self._rep = base.kv, base.rem, base.rep
        self._own_columns = False
        self._unplaced: list[tuple[int, float, float, int]] = []  # rows placed before the copy
        self.batch, self.memory = base.batch.copy(), base.memory.copy()
        self.peak, self.peak_at = base.peak.copy(), base.peak_at.copy()
        self.tpot = base.tpot.copy()
        # Kept with the trajectories so that a request joining re-evaluates the cost model only
        # at the samples where it is alive (joined).
        self.work, self.tokens = base.work.copy(), base.tokens.copy()
        # Memory outside the running batch (page rounding, transfers, reservations, queue)
        # does not grow; the running batch's trajectory must fit in what is left.
        fixed = snapshot.used_tokens - snapshot.running_kv_tokens + snapshot.queued_kv_tokens
        self.budget = cfg.memory_target * snapshot.kv_capacity_tokens - fixed
        self._rows: dict[int, np.ndarray] = {}  # changed replicas: rows, longest remaining first
        # Rows placed on a replica and not yet merged into its row list: merged (one stable
        # sort) when the list is next asked for, which dispatch never does.
        self._placed: dict[int, list[int]] = {}
        # Rows that joined a replica (moved, placed) or left their table replica (moved): what
        # the grouping no longer says. A row moves at most once per call (it is then not
        # movable), so each entry is final when written: its remaining and KV, the replica it
        # counts at, +1 / -1 (columns, filled in place: no numpy call per change). kv_alive_at
        # reads the joined rows, then the left ones, in the order they changed; and only the
        # replicas they touch need a correction.
        self._joins = _ChangeLog(+1.0)
        self._leaves = _ChangeLog(-1.0)
        self._delta: np.ndarray | None = None  # [4, changes]: the two logs end to end
        self._touched = np.zeros(self.n, dtype=bool)
        self._crossing: np.ndarray | None = None
        self._stale: set[int] = set()

    # ------------------------------------------------------------------ rows of a replica
    @property
    def kv(self) -> np.ndarray:
        """KV tokens of each row (read-only)."""
        if self._unplaced:
            self._columns()
        return self._kv

    @property
    def rem(self) -> np.ndarray:
        """Remaining steps of each row (read-only)."""
        if self._unplaced:
            self._columns()
        return self._rem

    @property
    def rep(self) -> np.ndarray:
        """Replica (position) of each row now (read-only)."""
        if self._unplaced:
            self._columns()
        return self._rep

    def _columns(self) -> None:
        """The board's own copy of the row columns: the table's, then the placed rows."""
        if self._own_columns:
            return
        room = self._capacity - self._kv.shape[0]
        self._rep = np.concatenate([self._rep, np.full(room, -1, np.int64)])
        if room:  # (without room only rep is ever written)
            self._kv = np.concatenate([self._kv, np.zeros(room)])
            self._rem = np.concatenate([self._rem, np.zeros(room)])
        for row, kv, rem, pos in self._unplaced:
            self._kv[row], self._rem[row], self._rep[row] = kv, rem, pos
        self._unplaced.clear()
        self._own_columns = True

    def rows_of(self, pos: int) -> np.ndarray:
        """Rows of ``pos``, longest remaining first (ties in no particular order)."""
        placed = self._placed.pop(pos, None)
        if placed is not None:  # after the rows there, in placement order (a stable sort)
            self._set_rows(pos, np.append(self.rows_of(pos), placed))
        rows = self._rows.get(pos)
        if rows is None:
            start = self.groups.starts[pos]
            rows = self.groups.rows[start:start + self.groups.lengths[pos]]
        return rows

    def _set_rows(self, pos: int, rows: np.ndarray) -> None:
        self._rows[pos] = rows[np.argsort(-self.rem[rows], kind="stable")]

    def candidates(self, pos: int, movable: np.ndarray, limit: int) -> np.ndarray:
        """The first ``limit`` movable rows of ``pos``, longest remaining first, ties by
        lower row (the order ARES examines migration candidates in)."""
        rows = self.rows_of(pos)
        rows = rows[movable[rows]]
        return rows[np.lexsort((rows, -self.rem[rows]))][:limit]

    def refresh(self, positions: list[int]) -> None:
        """Recompute the forecast of ``positions`` from their rows."""
        groups = [self.rows_of(p) for p in positions]
        rows = np.concatenate(groups)
        lengths = np.array([r.shape[0] for r in groups], dtype=np.int64)
        b, m, pk, pk_at = _replicas_forecast(self.kv[rows], self.rem[rows], lengths,
                                             self.times, self.horizon)
        self.batch[positions], self.memory[positions] = b, m
        self.peak[positions], self.peak_at[positions] = pk, pk_at
        work, tokens = step_work(self.cost, b, m), b.sum(axis=1)
        self.work[positions], self.tokens[positions] = work, tokens
        self.tpot[positions] = tpot_of_work(work, tokens)
        self._stale.update(positions)  # their predicted overflow, when next asked for

    def move(self, row: int, dst: int, work: np.ndarray | None = None,
             tpot: np.ndarray | None = None) -> None:
        """Move ``row`` to ``dst``. ``work`` and ``tpot``: the ``[2, S]`` :func:`step_work` and
        the TPOT of its replica without it and of ``dst`` with it, when the caller evaluated
        them already (the same values as re-evaluating)."""
        self._columns()  # (its own rep to write)
        src = int(self._rep[row])
        self._rep[row] = dst
        rem, kv = float(self.rem[row]), float(self.kv[row])
        self._joins.add(rem, kv, dst)
        self._leaves.add(rem, kv, src)
        self._delta = None
        self._touched[src] = self._touched[dst] = True
        left = self.rows_of(src)
        left = self._rows[src] = left[left != row]
        # It joins dst's rows after those with as long or longer remaining (where a stable
        # sort of the rows with it appended puts it).
        rows = self.rows_of(dst)
        at = int(np.searchsorted(-self.rem[rows], -rem, side="right"))
        joined = self._rows[dst] = np.concatenate((rows[:at], (row,), rows[at:]))
        if not self._exact_sums:
            self.refresh([src, dst])
            return
        # _added's values: 1.0 and 1.0 * (kv + t) at the k samples where it is alive, 0.0
        # after (which adds and subtracts nothing); x - y is x + -y exactly.
        k = bisect.bisect_left(self._time_list, rem)
        added = kv + self.times[:k]
        self.batch[src, :k] -= 1.0
        self.batch[dst, :k] += 1.0
        self.memory[src, :k] -= added
        self.memory[dst, :k] += added
        self.tokens[src] -= k  # (sums of integers, exact)
        self.tokens[dst] += k
        pair = [src, dst]
        if work is None or tpot is None:
            work = step_work(self.cost, self.batch[pair], self.memory[pair])
            tpot = tpot_of_work(work, self.tokens[pair])
        self.work[src], self.work[dst] = work[0], work[1]
        self.tpot[src], self.tpot[dst] = tpot[0], tpot[1]
        self.peak[src], self.peak_at[src] = self._peak_of(left)
        self.peak[dst], self.peak_at[dst] = self._peak_of(joined)
        self._stale.update(pair)

    def _peak_of(self, rows: np.ndarray) -> tuple[float, float]:
        """:func:`segments_peak` of one replica's rows (longest remaining first): the same
        arithmetic on the same operands, for one group."""
        n = rows.shape[0]
        if n == 0:
            return 0.0, 0.0
        if n > self._ranks.shape[0]:
            self._ranks = np.arange(1, 2 * n + 1)
        finish = np.minimum(np.maximum(self.rem[rows], 0.0), float(self.horizon))
        # M just before each rank finishes: the KV of ranks 0..k now (integer sums, exact)
        # plus (k + 1) requests growing until then.
        m = np.cumsum(self.kv[rows]) + self._ranks[:n] * finish
        peak = m.max()
        return peak, finish[m == peak].max()

    def place(self, kv: float, rem: float, pos: int, tpot: float, peak: float,
              work: np.ndarray) -> None:
        """Add a request to ``pos`` with the forecast :meth:`joined` computed for it
        (``work``: its row of ``pos``). The peak is updated approximately (as dispatch has
        always done)."""
        k = bisect.bisect_left(self._time_list, rem)  # the samples it is alive at (t < rem)
        # (_added's values: 1.0 and 1.0 * (kv + t) where alive, 0.0 after, which adds nothing)
        self.batch[pos, :k] += 1.0
        self.memory[pos, :k] += kv + self.times[:k]
        self.work[pos] = work
        self.tokens[pos] += k  # a sum of integers, exact
        self.tpot[pos] = tpot
        self.idle[pos] = False
        if peak > self.peak[pos]:
            self.peak[pos] = peak
            self.peak_at[pos] = min(rem, float(self.horizon))  # approximately where it moved
        row = self.size
        if row >= self._capacity:
            raise ValueError("Board.place: no room left (pass room= to the constructor)")
        if self._own_columns:
            self._kv[row], self._rem[row], self._rep[row] = kv, rem, pos
        else:
            self._unplaced.append((row, kv, rem, pos))
        self.size += 1
        self._joins.add(rem, kv, pos)
        self._delta = None
        self._touched[pos] = True
        self._placed.setdefault(pos, []).append(row)

    # ------------------------------------------------------------------ forecasts with a request
    def _added(self, kv: np.ndarray, rem: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``B`` and ``M`` of requests ``(kv, rem)`` on their own: ``[C, S]`` each."""
        alive = (rem[:, None] > self.times[None, :]).astype(np.float64)
        return alive, alive * (kv[:, None] + self.times[None, :])

    def kv_alive_at(self, steps: np.ndarray, positions: np.ndarray,
                    grouped: np.ndarray | None = None) -> np.ndarray:
        """``M`` of ``positions`` just before ``steps`` (rows with ``rem >= step``); the two
        broadcast together (``[C, 1]`` steps and ``[P]`` positions: ``[C, P]``). ``grouped``:
        :meth:`grouped_alive` of the same arguments, when the caller has it (a copy is
        corrected)."""
        alive = self.grouped_alive(steps, positions) if grouped is None else grouped.copy()
        if not self._joins.size:
            return alive
        # Correct the grouping by the rows that joined and left since (joins, then leaves).
        if np.ndim(steps) == 0 and np.ndim(positions) == 1:
            if self._joins.size + self._leaves.size < 8:
                self._add_corrections(alive, float(steps), positions)
                return alive
            return self._corrections(alive, steps, positions)
        if self._delta is None:
            self._delta = np.concatenate([self._joins.view(), self._leaves.view()], axis=1)
        rem, kv, where, sign = self._delta
        on = (rem >= steps[..., None]) & (where == positions[..., None])
        return alive + (on * (kv + steps[..., None]) * sign).sum(axis=-1)

    def grouped_alive(self, steps: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """:meth:`kv_alive_at` of the table's grouping (the rows as the snapshot has them):
        what the moves and placements of this call do not change, so a caller with several
        steps to ask about (dispatch: one per pending request) asks for them at once."""
        g = self.groups
        u = g.levels.shape[0]
        level = np.searchsorted(g.levels, steps, side="left")
        if positions is self.everyone:  # (no gathers)
            start, before, key_base = g.starts, g.start_prefix, g.key_base
        else:
            start, before, key_base = g.starts[positions], g.start_prefix[positions], positions * u
        # The end of each replica's rows with rem >= step (rows are longest remaining first).
        end = np.searchsorted(g.key, key_base + (u - 1 - level), side="right")
        count = end - start
        return g.prefix[end] - before + count * steps

    def _corrections(self, alive: np.ndarray, steps: np.ndarray,
                     positions: np.ndarray) -> np.ndarray:
        """:meth:`kv_alive_at`'s correction for one step and ``[P]`` positions: each touched
        position's sum over the changed rows (0.0 for the rows not there or not alive)."""
        if self._delta is None:
            self._delta = np.concatenate([self._joins.view(), self._leaves.view()], axis=1)
        rem, kv, where, sign = self._delta
        sel = np.flatnonzero(self._touched[positions])  # (elsewhere the sum is 0.0)
        if sel.size:
            on = (rem >= steps) & (where == positions[sel, None])
            alive[sel] += (on * (kv + steps) * sign).sum(axis=-1)
        return alive

    def _add_corrections(self, alive: np.ndarray, step: float, positions: np.ndarray) -> None:
        """:meth:`_corrections` in Python when fewer than 8 rows changed (dispatch's case:
        one per placement), in place: the same values. numpy sums fewer than 8 elements left
        to right from 0.0, as this loop does; the rows it skips add 0.0, which changes no
        partial sum (tests/test_scheduler_board.py checks both ways agree)."""
        sums: dict[int, float] = {}
        for rem, kv, where, sign in self._joins.rows + self._leaves.rows:
            if rem >= step:
                sums[where] = sums.get(where, 0.0) + (kv + step) * sign
        if positions is self.everyone:
            for pos, add in sums.items():
                alive[pos] += add
            return
        for i in np.flatnonzero(self._touched[positions]).tolist():
            add = sums.get(int(positions[i]))
            if add is not None:
                alive[i] += add

    def peak_pairs(self, kv: np.ndarray, rem: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Predicted peak of ``positions[k]`` if request ``(kv[k], rem[k])`` joined it. Exact at
        the old peak, at the request's own finish and at the samples. The arguments broadcast
        (``[C, 1]`` requests with ``[P]`` positions: ``[C, P]``)."""
        alive = (rem[..., None] > self.times).astype(np.float64)  # as _added
        memory = self.memory[positions] + alive * (kv[..., None] + self.times)
        t_x = np.minimum(rem, float(self.horizon))
        alive_at_x = self.kv_alive_at(t_x, positions)
        peak, peak_at = self.peak[positions], self.peak_at[positions]
        at_old_peak = np.where(rem >= peak_at, peak + kv + peak_at, peak)
        at_own_finish = alive_at_x + kv + t_x
        return np.maximum(np.maximum(at_old_peak, at_own_finish), memory.max(axis=-1))

    def joined(self, kv: float, rem: float, positions: np.ndarray | None = None,
               src: int | None = None, *, fits_in: np.ndarray | None = None,
               grouped: np.ndarray | None = None,
               ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
        """If request ``(kv, rem)`` joined each of ``positions`` (every replica by default):
        its predicted TPOT, its predicted peak (:meth:`peak_pairs`'s values) and its ``[P, S]``
        :func:`step_work`. With ``src``, ``tpot`` and ``work`` have one more row, last: ``src``
        with the request *leaving* it (a move's source, in the same evaluation of the cost
        model). With ``fits_in`` (a budget per position), the cost model is not run (``tpot``
        and ``work`` are None) when the predicted peak fits none of them. ``grouped``:
        :meth:`grouped_alive` at ``min(rem, memory horizon)`` and ``positions``, if known.

        One request at a time, in as few numpy calls as possible: a decision's cost is mostly
        the number of calls. The request is alive at the samples before its remaining length
        only; at the later ones every position keeps its own work, so the cost model runs on
        the first ``k`` samples alone (the same values as evaluating all of them)."""
        k = bisect.bisect_left(self._time_list, rem)  # the samples it is alive at (t < rem)
        added = kv + self.times[:k]  # its KV there (_added: 1.0 * (kv + t)); 0.0 later
        if positions is None:
            positions = self.everyone
            memory, work = self.memory.copy(), self.work.copy()
            memory[:, :k] += added
            batch, tokens = self.batch[:, :k] + 1.0, self.tokens + k
            peak, peak_at = self.peak, self.peak_at
        else:
            if src is None:
                memory, work = self.memory[positions], self.work[positions]
                memory[:, :k] += added
                batch, tokens = self.batch[positions, :k] + 1.0, self.tokens[positions] + k
            else:  # the source, last, with the request leaving (x - y is x + -y exactly)
                at = np.concatenate((positions, (src,)))
                memory, work = self.memory[at], self.work[at]
                memory[:-1, :k] += added
                memory[-1, :k] -= added
                batch, tokens = self.batch[at, :k], self.tokens[at]
                batch[:-1] += 1.0
                batch[-1] -= 1.0
                tokens[:-1] += k
                tokens[-1] -= k
            peak, peak_at = self.peak[positions], self.peak_at[positions]
        p = positions.shape[0]
        t_x = np.float64(min(rem, float(self.horizon)))
        alive_at_x = self.kv_alive_at(t_x, positions, grouped)
        at_old_peak = np.where(rem >= peak_at, peak + kv + peak_at, peak)
        at_own_finish = alive_at_x + kv + t_x
        peak = np.maximum(np.maximum(at_old_peak, at_own_finish), memory[:p].max(axis=1))
        if fits_in is not None and not (peak <= fits_in).any():
            return None, peak, None
        work[:, :k] = step_work(self.cost, batch, memory[:, :k])
        if k and src is None:  # every position has tokens: tpot_of_work's values, fewer calls
            return work.sum(axis=-1) / tokens, peak, work
        return tpot_of_work(work, tokens), peak, work

    def old_peak_bound(self, kv: np.ndarray, rem: np.ndarray) -> np.ndarray:
        """``[C, R]``: the part of :meth:`peak_pairs` at the old peak, a lower bound of it."""
        peak, peak_at = self.peak[None, :], self.peak_at[None, :]
        return np.where(rem[:, None] >= peak_at, peak + kv[:, None] + peak_at, peak)

    def could_take(self, kv: np.ndarray) -> np.ndarray:
        """``[C, R]``: replicas that might fit a request of ``kv`` tokens (a necessary
        condition: the new peak is at least the old one and at least today's KV plus it)."""
        return (self.peak <= self.budget)[None, :] & (
            self.memory[None, :, 0] + kv[:, None] <= self.budget[None, :])

    def tpot_moved(self, rows: np.ndarray,
                   dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted TPOT of each row's replica without it, and of ``dst`` with it (one
        evaluation of the cost model for both), and the ``[C, 2, S]`` work of the two (what
        :meth:`move` takes)."""
        src = self.rep[rows]
        d_batch, d_memory = self._added(self.kv[rows], self.rem[rows])
        batch = np.concatenate([self.batch[src] - d_batch, self.batch[dst] + d_batch])
        memory = np.concatenate([self.memory[src] - d_memory, self.memory[dst] + d_memory])
        work = step_work(self.cost, batch, memory)
        tpot = tpot_of_work(work, batch.sum(axis=-1))
        c = rows.shape[0]
        return tpot[:c], tpot[c:], np.stack([work[:c], work[c:]], axis=1)

    def token_time_saved(self, rows: np.ndarray, dst: int, tpot_src: np.ndarray,
                         tpot_dst: np.ndarray) -> np.ndarray:
        """Token-time (token x ms) the cluster saves over the horizon if each row moves to
        ``dst``, given the post-move TPOTs: the source's remaining tokens get faster, the
        destination's existing and the moved request's tokens run at the destination's new
        speed. Per sample, ``sum B * step = tpot * sum B``; samples are ``H / (S - 1)`` apart."""
        src = self.rep[rows]
        d_batch, _ = self._added(self.kv[rows], self.rem[rows])
        tokens_src, tokens_dst = self.tokens[src], self.tokens[dst]
        moved = d_batch.sum(axis=1)
        before = self.tpot[src] * tokens_src + self.tpot[dst] * tokens_dst
        after = tpot_src * (tokens_src - moved) + tpot_dst * (tokens_dst + moved)
        return (before - after) * float(self.times[-1]) / max(len(self.times) - 1, 1)

    # ------------------------------------------------------------------ predicted overflow
    def overflow_steps(self) -> np.ndarray:
        """Predicted steps until each replica's running KV passes its budget (inf: never)."""
        if self._crossing is None:
            # Only a replica whose table forecast peaks near or above its budget can cross it
            # (M's segments end at the values the peak is the maximum of); the others are
            # inf. The margin is far above the rounding that could tell the two tests apart
            # (a crossing compares (budget - KV) / ranks with a finish step, the peak compares
            # KV + ranks * finish with the budget), so the values are the whole table's.
            # When most replicas are near, the whole table's memoised segments cost less.
            budget = self.budget
            margin = 1e-6 * np.maximum(np.abs(budget), 1.0)
            near = np.flatnonzero(self._base_peak > budget - margin)
            if 4 * near.shape[0] > self.n:
                self._crossing = segments_crossings(self._segments, budget)
            else:
                self._crossing = np.full(self.n, np.inf)
                near = [p for p in near.tolist() if p not in self._rows]  # (those: below)
                if near:
                    g = self.groups
                    self._crossing[near] = self._crossings_of(
                        [g.rows[g.starts[p]:g.starts[p] + g.lengths[p]] for p in near], near)
            self._stale = set(self._rows)
        if self._stale:
            stale = sorted(self._stale)
            self._crossing[stale] = self.crossings(stale)
            self._stale.clear()
        return self._crossing

    def crossings(self, positions: list[int], *, drop: np.ndarray | None = None,
                  add: np.ndarray | None = None) -> np.ndarray:
        """``overflow_steps()`` of each position, with ``drop[i]`` (a row index) taken out of
        position ``i`` or ``add[i]`` joining it, in one evaluation."""
        return self._crossings_of([self.rows_of(p) for p in positions], positions,
                                  drop=drop, add=add)

    def _crossings_of(self, groups: list[np.ndarray], positions: list[int], *,
                      drop: np.ndarray | None = None,
                      add: np.ndarray | None = None) -> np.ndarray:
        """:meth:`crossings` of ``positions`` holding the rows ``groups`` (each longest
        remaining first)."""
        lengths = np.array([r.shape[0] for r in groups], dtype=np.int64)
        rows = np.concatenate(groups) if groups else np.zeros(0, np.int64)
        if drop is not None:  # taking a row out keeps each group sorted
            owner = np.repeat(np.arange(len(positions)), lengths)
            gone = rows == np.repeat(drop, lengths)
            rows = rows[~gone]
            lengths = lengths - np.bincount(owner[gone], minlength=len(positions))
        if add is not None:  # a row joining: regroup, longest remaining first
            owner = np.concatenate([np.repeat(np.arange(len(positions)), lengths),
                                    np.arange(len(positions))])
            rows = np.concatenate([rows, add])
            order = np.lexsort((-self.rem[rows], owner))
            rows = rows[order]
            lengths = lengths + 1
        # (ties in remaining length may come in any order: they do not change the crossing)
        finish = np.minimum(np.maximum(self.rem[rows], 0.0), float(self.horizon))
        return segments_crossings(segments_of(finish, self.kv[rows], lengths),
                                  self.budget[np.asarray(positions, dtype=np.int64)])
