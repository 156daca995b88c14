"""The simulator's prediction error model: its per-request memo changes no value.

``ErrorModel.predict`` memoises each request's refresh factor and draws it again only when the
request reaches a new refresh; the values must be those of the formula evaluated from scratch
(the documented model, computed here directly from ``hashed_normal``), bit for bit, whatever
the order and subsets of the calls.
"""

from __future__ import annotations

import numpy as np
import pytest

from ares_jax.sim.config import PredictionConfig
from ares_jax.sim.predictions import ErrorModel, hashed_normal


def _from_scratch(cfg: PredictionConfig, seed: int, sigma: ErrorModel, index: np.ndarray,
                  gen: np.ndarray, out: np.ndarray, max_tokens: np.ndarray) -> np.ndarray:
    """The error model with no memo: z mixes a per-request normal and one per refresh."""
    refresh = max(cfg.refresh_tokens, 1)
    k = gen // refresh
    g_k = k * refresh
    rho = cfg.persistence
    z = (rho * hashed_normal(seed, index, np.full_like(k, -1))
         + np.sqrt(max(1.0 - rho * rho, 0.0)) * hashed_normal(seed, index, k))
    pred = (out - g_k) * np.exp(sigma.sigma(g_k) * z) - (gen - g_k)
    return np.clip(pred, 1.0, np.maximum(max_tokens - gen, 1)).astype(np.float64)


@pytest.mark.parametrize("cfg", [
    PredictionConfig(),
    PredictionConfig(refresh_tokens=1, persistence=0.3),
    PredictionConfig(refresh_tokens=64, persistence=1.0),
], ids=["default", "every-token", "persistent"])
def test_memoised_predictions_equal_the_formula(cfg: PredictionConfig) -> None:
    rng = np.random.default_rng(3)
    model, seed, n = ErrorModel(cfg, 11), 11, 600
    gen = rng.integers(0, 40, n)
    out = gen + rng.integers(1, 4000, n)
    max_tokens = out + rng.integers(0, 50, n)
    drawn = 0
    for _ in range(60):  # requests come and go; progress moves by 0-8 tokens a call
        index = np.sort(rng.choice(n, int(rng.integers(1, 400)), replace=False))
        got = model.predict(index, gen[index], out[index], max_tokens[index])
        want = _from_scratch(cfg, seed, model, index, gen[index], out[index],
                             max_tokens[index])
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)
        drawn += int((got != np.clip(out[index] - gen[index], 1, None)).sum())
        gen += rng.integers(0, 9, n)
    assert drawn > 0  # the error model did perturb the lengths


def test_memo_is_per_request_and_refresh() -> None:
    """The same request at the same refresh gives the same factor; a new refresh a new one; a
    different seed a different one."""
    cfg = PredictionConfig(refresh_tokens=16)
    a, b = ErrorModel(cfg, 1), ErrorModel(cfg, 2)
    index, out, mx = np.array([5, 9]), np.array([1000, 1000]), np.array([2000, 2000])
    first = a.predict(index, np.array([16, 16]), out, mx)
    # 4 tokens later, same refresh: the prediction counts down by exactly 4.
    np.testing.assert_array_equal(a.predict(index, np.array([20, 20]), out, mx), first - 4)
    # Next refresh: a fresh draw (not a countdown).
    assert not np.array_equal(a.predict(index, np.array([32, 32]), out, mx), first - 16)
    assert not np.array_equal(b.predict(index, np.array([16, 16]), out, mx), first)
    # Asked out of order and for one request alone: the same values.
    np.testing.assert_array_equal(a.predict(index[1:], np.array([16]), out[1:], mx[1:]),
                                  first[1:])
