"""Remaining-length predictions with a documented error model (see ``PredictionConfig``).

The noise is a deterministic hash of (seed, request, refresh index), so a prediction is the same
whenever it is asked for (a per-request memo only saves drawing it again): the simulator can
evaluate it vectorised over all running requests at each policy call.
"""

from __future__ import annotations

import csv

import numpy as np

from ares_jax.sim.config import PredictionConfig


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # (uint64 arithmetic wraps modulo 2**64 by itself: no mask needed)
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hashed_normal(seed: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Standard normals, a pure function of ``(seed, a, b)`` (Box-Muller on two hashes)."""
    with np.errstate(over="ignore"):
        key = (
            np.asarray(a, dtype=np.uint64) * np.uint64(0x100000001B3)
            + np.asarray(b, dtype=np.uint64) * np.uint64(0x9E3779B1)
            + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0xC2B2AE3D27D4EB4F)
        )
    h1 = _splitmix64(key)
    h2 = _splitmix64(h1)
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    u2 = (h2 >> np.uint64(11)).astype(np.float64) / 2.0**53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


class ErrorModel:
    """``predict(...)``: predicted remaining tokens for requests at given progress."""

    def __init__(self, cfg: PredictionConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self._table: tuple[np.ndarray, np.ndarray] | None = None
        if cfg.table:
            self._table = load_sigma_table(cfg.table)
        # Memo per request index: its persistent normal (NaN: not drawn yet), the last refresh
        # asked for (-1: none) and that refresh's factor exp(sigma(g_k) * z). All are pure
        # functions of (seed, request, refresh index); every policy call asks for every running
        # request, and between two calls most have not reached a new refresh, so only those
        # that did are drawn again. The memo changes no value (each element is computed with
        # the same operations on the same operands).
        self._persistent = np.zeros(0)
        self._fresh_k = np.zeros(0, dtype=np.int64)
        self._factor = np.zeros(0)

    def _grow(self, need: int) -> None:
        have = self._fresh_k.shape[0]
        if need > have:
            grow = max(need, 2 * have) - have
            self._persistent = np.concatenate([self._persistent, np.full(grow, np.nan)])
            self._fresh_k = np.concatenate([self._fresh_k, np.full(grow, -1, dtype=np.int64)])
            self._factor = np.concatenate([self._factor, np.zeros(grow)])

    def _persistent_normals(self, index: np.ndarray) -> np.ndarray:
        """``hashed_normal(seed, index, -1)``, memoised (``index``: non-negative)."""
        persistent = self._persistent[index]
        miss = np.flatnonzero(np.isnan(persistent))
        if miss.size:
            persistent[miss] = hashed_normal(self.seed, index[miss],
                                             np.full(miss.size, -1, dtype=np.int64))
            self._persistent[index[miss]] = persistent[miss]
        return persistent

    def _refresh_factor(self, persistent: np.ndarray, index: np.ndarray, k: np.ndarray,
                        g_k: np.ndarray) -> np.ndarray:
        """``exp(sigma(g_k) * z)`` of each request at its last refresh ``k`` (at ``g_k``
        generated tokens): the multiplicative error of the prediction made there."""
        rho = self.cfg.persistence
        z = rho * persistent + np.sqrt(max(1.0 - rho * rho, 0.0)) * hashed_normal(
            self.seed, index, k)
        return np.exp(self.sigma(g_k) * z)

    def _factors(self, index: np.ndarray, k: np.ndarray, g_k: np.ndarray) -> np.ndarray:
        """:meth:`_refresh_factor`, memoised per request index (drawn again only for the
        requests whose refresh index changed since they were last asked for)."""
        if index.size == 0 or index.min() < 0:
            persistent = hashed_normal(self.seed, index, np.full_like(k, -1))
            return self._refresh_factor(persistent, index, k, g_k)
        self._grow(int(index.max()) + 1)
        factor = self._factor[index]
        stale = np.flatnonzero(self._fresh_k[index] != k)
        if stale.size:
            at = index[stale]
            factor[stale] = self._refresh_factor(self._persistent_normals(at), at, k[stale],
                                                 g_k[stale])
            self._fresh_k[at] = k[stale]
            self._factor[at] = factor[stale]
        return factor

    def sigma(self, generated: np.ndarray) -> np.ndarray:
        g = np.asarray(generated, dtype=np.float64)
        if self._table is not None:
            return np.interp(g, *self._table)
        c = self.cfg
        return c.sigma_floor + (c.sigma_start - c.sigma_floor) * c.half_tokens / (
            c.half_tokens + g
        )

    def predict(
        self,
        request_index: np.ndarray,
        generated: np.ndarray,
        output_tokens: np.ndarray,
        max_tokens: np.ndarray,
    ) -> np.ndarray:
        c = self.cfg
        g = np.asarray(generated, dtype=np.int64)
        refresh = max(c.refresh_tokens, 1)
        shift = int(refresh).bit_length() - 1
        if refresh == 1 << shift:  # (a shift is a floor division by a power of two, faster)
            k = g >> shift  # index of the last refresh
            g_k = k << shift
        else:
            k = g // refresh
            g_k = k * refresh
        factor = self._factors(np.asarray(request_index, dtype=np.int64), k, g_k)
        at_refresh = (output_tokens - g_k) * factor
        pred = at_refresh - (g - g_k)
        # The engine knows the request is still running and how much max_tokens allows.
        # (np.clip's values: the bounds are ordered and nothing is NaN; minimum and maximum
        # cost less on 32k rows)
        upper = np.maximum(max_tokens - g, 1)
        return np.minimum(np.maximum(pred, 1.0), upper).astype(np.float64, copy=False)


def load_sigma_table(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A measured error-vs-progress table: CSV rows ``generated_tokens,sigma`` (header ok)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            try:
                rows.append((float(row[0]), float(row[1])))
            except (ValueError, IndexError):
                continue  # header or blank line
    if not rows:
        raise ValueError(f"{path}: no generated_tokens,sigma rows")
    rows.sort()
    g, s = zip(*rows, strict=True)
    return np.array(g), np.array(s)
