"""The board's shortcuts give the values of the plain numpy formulation, bit for bit.

ARES's decisions compare forecasts for exact ties, so a faster path of ``Board`` must give the
very same floats as the one it replaces, not merely close ones: here, "KV just before step t"
corrected in Python for the few rows a call moved or placed, against the numpy correction, and
both against a sum over each replica's current rows; and a move's peaks of one replica at a
time against the grouped formula over both.
"""

from __future__ import annotations

import numpy as np
import pytest

from ares_jax.scheduler import AresConfig, build_cost_model
from ares_jax.scheduler.board import Board
from ares_jax.scheduler.forecast import _replicas_peak
from ares_jax.scheduler.load import grouped_segments, segments_crossings
from ares_jax.sim.synthetic import random_snapshot


@pytest.fixture(scope="module")
def cost():
    return build_cost_model("grid", "llama3_8b", "h100_sxm", 1)


def _brute_force(board: Board, step: float, positions: np.ndarray) -> np.ndarray:
    """``M`` just before ``step`` from each position's current rows (order: any)."""
    out = []
    for pos in positions.tolist():
        rows = board.rows_of(pos)
        alive = board.rem[rows] >= step
        out.append(float((board.kv[rows][alive] + step).sum()))
    return np.array(out)


def _check_alive(board: Board, rng: np.random.Generator) -> int:
    """Both corrections agree exactly at a few steps (the changed rows' own remaining lengths,
    where ``>=`` decides, and random ones), for every replica and for a shuffled subset."""
    changed = [r[0] for r in board._joins.rows]
    steps = [0.0, float(board.horizon), *changed, *rng.uniform(0, board.horizon, 4).tolist()]
    subset = rng.permutation(board.n)[: max(board.n // 2, 1)]
    checked = 0
    for step in steps:
        for positions in (board.everyone, subset):
            base = board.grouped_alive(np.float64(step), positions)
            python = base.copy()
            board._add_corrections(python, step, positions)
            numpy = board._corrections(base.copy(), np.float64(step), positions)
            np.testing.assert_array_equal(python, numpy)
            np.testing.assert_array_equal(board.kv_alive_at(np.float64(step), positions), numpy)
            np.testing.assert_allclose(numpy, _brute_force(board, step, positions), rtol=1e-12)
            checked += 1
    return checked


@pytest.mark.parametrize("seed", range(4))
def test_corrections_in_python_equal_numpy(cost, seed: int) -> None:
    rng = np.random.default_rng(seed)
    snap = random_snapshot(rng, 6, 12)
    board = Board(snap, cost, AresConfig(), room=3)
    checked = 0
    # 7 changed rows, the most the Python path takes: 3 placements, then 2 moves (2 each).
    for _ in range(3):
        rem = float(rng.choice([rng.uniform(1, 3000), board.rem[int(rng.integers(board.size))]]))
        board.place(float(rng.integers(100, 5000)), rem, int(rng.integers(board.n)), 1.0, 0.0,
                    board.work[0].copy())
        checked += _check_alive(board, rng)
    moved = set()
    while board._joins.size + board._leaves.size < 7:
        row = int(rng.integers(len(snap.table())))
        if row in moved:
            continue
        moved.add(row)
        dst = int((board.rep[row] + 1 + rng.integers(board.n - 1)) % board.n)
        src = int(board.rep[row])
        board.move(row, dst)
        checked += _check_alive(board, rng)
        # The two replicas' peaks: the grouped formula's values (segments_peak of both).
        rows = [board.rows_of(src), board.rows_of(dst)]
        both = np.concatenate(rows)
        peak, peak_at = _replicas_peak(board.kv[both], board.rem[both],
                                       np.array([r.shape[0] for r in rows]), board.horizon)
        np.testing.assert_array_equal(board.peak[[src, dst]], peak)
        np.testing.assert_array_equal(board.peak_at[[src, dst]], peak_at)
        assert np.all(np.diff(board.rem[rows[1]]) <= 0)  # dst's rows: longest remaining first
    assert board._joins.size + board._leaves.size == 7
    assert checked > 50


@pytest.mark.parametrize("fill", [(0.5, 0.7), (0.9, 1.1), (2.1, 2.12)],
                         ids=["mixed", "near-budget", "all-over"])
def test_overflow_steps_equal_the_whole_tables(cost, fill: tuple[float, float]) -> None:
    """Crossings evaluated only where the peak comes near the budget (a few replicas) or from
    the whole table (most of them) are the whole table's, including budgets set exactly at,
    and a hair around, the peaks of two replicas or of all; then after a move."""
    rng = np.random.default_rng(7)
    snap = random_snapshot(rng, 12, 16, fill=fill, hot_fraction=0.2)
    cfg = AresConfig()
    for nudge in (None, 0.0, -1e-9, 1e-9, -1.0):
        for few in (True, False):
            board = Board(snap, cost, cfg)
            if nudge is not None:  # budgets right at the forecast peaks (of two replicas)
                at = board.peak * (1.0 + nudge) + nudge
                board.budget = np.where(np.arange(board.n) < 2, at, board.peak * 2 + 10) \
                    if few else at
            whole = segments_crossings(grouped_segments(board.groups, cfg.memory_horizon_steps),
                                       board.budget)
            np.testing.assert_array_equal(board.overflow_steps(), whole)
            if nudge is not None and nudge < 0:  # budgets below their peaks: those cross
                assert np.isfinite(whole[:2] if few else whole).all()
            row = int(board.rows_of(int(np.argmax(board.groups.lengths)))[0])
            board.move(row, int(np.argmin(board.groups.lengths)))
            changed = board.overflow_steps()
            np.testing.assert_array_equal(changed, board.crossings(list(range(board.n))))
