"""Load model and cost models, on cases small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ares_jax.scheduler.cost import (
    GPUS,
    MODELS,
    GridStepCost,
    LinearStepCost,
    TransferCost,
    default_grid_path,
    grid_step_cost,
    kv_capacity_tokens,
)
from ares_jax.scheduler.load import forecast, peak_kv, steps_to_overflow, trajectories


def test_trajectories_by_hand() -> None:
    kv = np.array([100.0, 200.0, 50.0])
    rem = np.array([10.0, 50.0, 5.0])
    rep = np.array([0, 0, 1])
    batch, memory = trajectories(kv, rem, rep, 2, np.array([0.0, 20.0, 60.0]))
    # replica 0: both alive at 0; only the 50-remaining one at 20 (with 220 KV); none at 60.
    np.testing.assert_array_equal(batch, [[2, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(memory, [[300, 220, 0], [50, 0, 0]])


def test_peak_is_just_before_a_finish() -> None:
    kv = np.array([100.0, 200.0])
    rem = np.array([10.0, 50.0])
    peak, at = peak_kv(kv, rem, np.array([0, 0]), 1, horizon_steps=1000)
    # Just before step 10 both are alive: 110 + 210 = 320 (> 250 just before step 50).
    assert peak[0] == 320 and at[0] == 10
    peak, at = peak_kv(kv, rem, np.array([0, 0]), 1, horizon_steps=5)
    assert peak[0] == 310 and at[0] == 5  # the horizon cuts the growth


def test_steps_to_overflow_by_hand() -> None:
    kv = np.array([100.0, 10.0, 50.0])
    rem = np.array([10.0, 500.0, 5.0])
    rep = np.array([0, 0, 1])
    # Replica 0: 110 + 2t until step 10 (130), then 10 + t. Replica 1: 50 + t for 5 steps.
    for budget, want in (([200.0, 60.0], [190.0, np.inf]),  # in the second segment
                         ([120.0, 40.0], [5.0, 0.0]),  # in the first; already over now
                         ([100.0, 55.0], [0.0, np.inf])):  # 55 is reached, not passed
        got = steps_to_overflow(kv, rem, rep, 2, np.array(budget), 1000)
        np.testing.assert_array_equal(got, want)
    # The horizon cuts it: 10 + t passes 200 at 190, beyond a 100-step horizon.
    assert steps_to_overflow(kv, rem, rep, 2, np.array([200.0, 60.0]), 100)[0] == np.inf


def test_steps_to_overflow_matches_dense_evaluation() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        n, replicas, horizon = int(rng.integers(0, 15)), 3, 40
        kv = rng.integers(1, 50, n).astype(float)
        rem = rng.integers(0, 60, n).astype(float)
        rep = rng.integers(0, replicas, n)
        budget = rng.integers(-5, 300, replicas).astype(float)
        got = steps_to_overflow(kv, rem, rep, replicas, budget, horizon)
        t = np.arange(0.0, horizon + 1e-9, 0.125)
        alive = np.minimum(rem, horizon)[:, None] >= t[None, :]
        memory = np.stack([((kv[:, None] + t) * alive * (rep == r)[:, None]).sum(axis=0)
                           for r in range(replicas)])
        over = memory > budget[:, None]
        want = np.where(over.any(axis=1), t[np.argmax(over, axis=1)], np.inf)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], atol=0.125)


def test_peak_matches_dense_evaluation() -> None:
    rng = np.random.default_rng(3)
    n, replicas, horizon = 60, 4, 300
    kv = rng.integers(1, 500, n).astype(float)
    rem = rng.integers(0, 400, n).astype(float)
    rep = rng.integers(0, replicas, n)
    peak, _ = peak_kv(kv, rem, rep, replicas, horizon)
    t = np.arange(horizon + 1, dtype=float) - 1e-9  # just before each integer step
    t[0] = 0.0
    alive = rem[:, None] >= t[None, :] + 1e-9
    alive[:, 0] = True  # everyone holds KV now
    for r in range(replicas):
        mask = rep == r
        dense = (alive[mask] * (kv[mask][:, None] + np.maximum(t, 0)[None, :])).sum(0)
        assert peak[r] == pytest.approx(dense.max(), abs=1e-6)
    assert peak[rep.max() + 1 :].sum() == 0 if rep.max() + 1 < replicas else True


def test_forecast_tpot_is_token_weighted_step_time() -> None:
    cost = LinearStepCost(a=0.0, b=1.0, c=0.0)  # step time = batch size
    fc = forecast(np.array([10.0, 10.0]), np.array([100.0, 1000.0]), np.array([0, 0]), 2, cost,
                  horizon_steps=200, samples=3)  # samples at 0, 100, 200
    # B = [2, 1, 1] -> steps [2, 1, 1] weighted by B: (4 + 1 + 1) / 4 = 1.5; replica 1 idle.
    np.testing.assert_allclose(fc.tpot_ms, [1.5, 0.0])


def test_linear_cost_and_fit() -> None:
    cost = LinearStepCost(a=1.0, b=2.0, c=0.5)
    assert float(cost.step_ms(3, 10)) == 12.0
    assert float(cost.step_ms(0, 0)) == 0.0
    rows = [(b, k, 1.0 + 2.0 * b + 0.5 * k) for b in (1, 4, 9) for k in (10, 300, 5000)]
    fitted = LinearStepCost.fit_linear(rows, [(128, 5.0), (1024, 20.0)])
    assert (fitted.a, fitted.b, fitted.c) == pytest.approx((1.0, 2.0, 0.5))
    assert float(fitted.prefill_ms(576)) == pytest.approx(12.5)
    with pytest.raises(ValueError):
        LinearStepCost.fit_linear([(1, 1, 1)])


def test_kv_bytes_and_capacity_from_model_dims() -> None:
    llama = MODELS["llama3_8b"]
    assert llama.kv_bytes_per_token == 32 * 8 * 128 * 2 * 2  # 128 KiB
    h100 = GPUS["h100_sxm"]
    expected = (h100.memory_bytes * 0.9 - 8.03e9 * 2 - 1024**3) // llama.kv_bytes_per_token
    assert kv_capacity_tokens(llama, h100, 1) == int(expected)
    assert 400_000 < expected < 500_000
    # 32B on TP2 holds fewer tokens than 8B on one GPU: its KV is twice as large per token.
    assert kv_capacity_tokens(MODELS["r1_qwen_32b"], h100, 2) < expected
    with pytest.raises(ValueError):
        kv_capacity_tokens(MODELS["r1_qwen_32b"], h100, 1, memory_utilization=0.5)


def test_transfer_cost() -> None:
    t = TransferCost(kv_bytes_per_token=1000, link_gbytes_per_s=1.0, stall_ms=2.0)
    assert t.copy_ms(1_000_000) == pytest.approx(1000.0)  # 1 GB at 1 GB/s
    assert t.migration_ms(1000) == pytest.approx(3.0)


@pytest.mark.skipif(not default_grid_path().is_file(),
                    reason="../shared/data/costmodel/aic_grid.csv absent")
def test_grid_cost_reproduces_grid_points_and_extrapolates() -> None:
    cost = grid_step_cost("llama3_8b", "h100_sxm", 1)
    # Rows of aic_grid.csv: batch 16 x len 4096 and batch 128 x len 8192.
    assert float(cost.step_ms(16, 16 * 4096)) == pytest.approx(9.98768305227168)
    assert float(cost.step_ms(128, 128 * 8192)) == pytest.approx(50.610536928351465)
    lengths = np.array([1000, 8000, 16384, 24000, 32000]) * 32.0
    steps = cost.step_ms(np.full(5, 32), lengths)
    assert np.all(np.diff(steps) > 0)  # more KV, slower, beyond the grid too
    assert float(cost.prefill_ms(1024)) == pytest.approx(22.109286510104102)
    assert float(cost.prefill_ms(32768)) > float(cost.prefill_ms(16384))


def _grid_step_ms_reference(cost: GridStepCost, batch: np.ndarray, kv: np.ndarray) -> np.ndarray:
    """GridStepCost.step_ms before its precomputed brackets (a binary search per element)."""
    def bracket(axis: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.minimum(np.maximum(np.searchsorted(axis, x, side="right") - 1, 0), axis.size - 2)
        return i, (x - axis[i]) / np.diff(axis)[i]

    n, kv = np.asarray(batch, dtype=np.float64), np.asarray(kv, dtype=np.float64)
    safe_n = np.maximum(n, 1.0)
    bi, bw = bracket(cost.batches, np.maximum(safe_n, cost.batches[0]))
    li, lw = bracket(cost.lens, np.maximum(kv / safe_n, cost.lens[0]))
    g = cost.grid
    low = g[bi, li] * (1 - lw) + g[bi, li + 1] * lw
    high = g[bi + 1, li] * (1 - lw) + g[bi + 1, li + 1] * lw
    return np.where(n > 0, low * (1 - bw) + high * bw, 0.0)


def test_grid_cost_precomputed_brackets_give_the_same_values() -> None:
    """Integer batch sizes read a precomputed bracket; the values must be bit-identical to the
    binary search's, inside the grid, beyond it, and on the general path (fractions, NaN)."""
    rng = np.random.default_rng(3)
    cost = GridStepCost([1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512],
                        [256, 512, 1024, 2048, 4096, 8192, 16384], rng.uniform(5, 80, (13, 7)),
                        [1, 8192], [1.0, 200.0])
    batch = rng.integers(0, 5000, (64, 9)).astype(np.float64)  # some past the table (4096)
    kv = batch * rng.uniform(0, 40_000, batch.shape)
    for b in (batch, np.minimum(batch, 700), np.clip(batch, 1, 700), batch + 0.5,
              np.where(batch > 9, np.nan, batch)):
        got, want = cost.step_ms(b, kv), _grid_step_ms_reference(cost, b, kv)
        np.testing.assert_array_equal(got, want)
    assert float(cost.step_ms(7, 7 * 3000)) == float(_grid_step_ms_reference(cost, 7, 7 * 3000))
    np.testing.assert_array_equal(cost.step_ms(np.array([3.0, 0.0]), 4096.0),
                                  _grid_step_ms_reference(cost, np.array([3.0, 0.0]), 4096.0))


def test_descending_order_of_remaining_lengths() -> None:
    """group_rows's sort (indices in a float sort's low bits) orders like argsort, ties in any
    order, and falls back to argsort when two values differ only in those bits."""
    from ares_jax.scheduler.load import _descending

    rng = np.random.default_rng(5)
    for values in (rng.gamma(1.0, 600.0, 5000), np.round(rng.gamma(1.0, 600.0, 5000) / 64) * 64,
                   np.concatenate([np.zeros(50), -np.zeros(50), rng.normal(0, 1e3, 100)]),
                   np.array([3.0]), np.zeros(0)):
        order, ordered = _descending(values)
        np.testing.assert_array_equal(np.sort(order), np.arange(values.shape[0]))
        np.testing.assert_array_equal(ordered, values[order])
        np.testing.assert_array_equal(ordered, np.sort(values)[::-1])
    # 1 ulp apart, the larger first: their keys differ only in the index bits, in the wrong
    # order, so only the fallback gets this right.
    close = np.array([np.nextafter(1.0, 2.0), 1.0, 0.5])
    assert _descending(close)[0].tolist() == [0, 1, 2]


def test_stable_order_of_replicas() -> None:
    """group_rows's replica sort (key and position packed in int32) is a stable argsort, and
    falls back to one when they do not fit in 31 bits."""
    from ares_jax.scheduler.load import _stable_order

    rng = np.random.default_rng(6)
    for n, bound in ((0, 4), (1, 1), (7, 3), (32108, 256), (5000, 300), (70000, 70000)):
        keys = rng.integers(0, bound, n)
        np.testing.assert_array_equal(_stable_order(keys, bound),
                                      np.argsort(keys, kind="stable"))
