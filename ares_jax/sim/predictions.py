"""Remaining-length predictions with a documented error model (see ``PredictionConfig``).

The noise is a deterministic hash of (seed, request, refresh index), so a prediction is the same
whenever it is asked for, with no per-request state: the simulator can evaluate it vectorised
over all running requests at each policy call.
"""

from __future__ import annotations

import csv

import numpy as np

from ares_jax.sim.config import PredictionConfig

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
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
        # Memo of the normals per request index: the persistent one (NaN: not yet drawn) and
        # the fresh one of the last refresh asked for (-1: none). Every policy call asks for
        # every running request, and between two calls most have not reached a new refresh;
        # the hash is a pure function, so the memo changes no value.
        self._persistent = np.zeros(0)
        self._fresh_k = np.zeros(0, dtype=np.int64)
        self._fresh = np.zeros(0)

    def _normals(self, index: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``hashed_normal(seed, index, -1)`` and ``hashed_normal(seed, index, k)``."""
        if index.size == 0 or index.min() < 0:
            return (hashed_normal(self.seed, index, np.full_like(k, -1)),
                    hashed_normal(self.seed, index, k))
        need = int(index.max()) + 1
        if need > self._persistent.shape[0]:
            size = max(need, 2 * self._persistent.shape[0])
            grow = size - self._persistent.shape[0]
            self._persistent = np.r_[self._persistent, np.full(grow, np.nan)]
            self._fresh_k = np.r_[self._fresh_k, np.full(grow, -1, dtype=np.int64)]
            self._fresh = np.r_[self._fresh, np.zeros(grow)]
        persistent = self._persistent[index]
        miss = np.flatnonzero(np.isnan(persistent))
        if miss.size:
            persistent[miss] = hashed_normal(self.seed, index[miss],
                                             np.full(miss.size, -1, dtype=np.int64))
            self._persistent[index[miss]] = persistent[miss]
        fresh = self._fresh[index]
        stale = np.flatnonzero(self._fresh_k[index] != k)
        if stale.size:
            fresh[stale] = hashed_normal(self.seed, index[stale], k[stale])
            self._fresh_k[index[stale]] = k[stale]
            self._fresh[index[stale]] = fresh[stale]
        return persistent, fresh

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
        refresh = np.maximum(c.refresh_tokens, 1)
        k = g // refresh  # index of the last refresh
        g_k = k * refresh
        persistent, fresh = self._normals(np.asarray(request_index, dtype=np.int64), k)
        rho = c.persistence
        z = rho * persistent + np.sqrt(max(1.0 - rho * rho, 0.0)) * fresh
        at_refresh = (output_tokens - g_k) * np.exp(self.sigma(g_k) * z)
        pred = at_refresh - (g - g_k)
        # The engine knows the request is still running and how much max_tokens allows.
        return np.clip(pred, 1.0, np.maximum(max_tokens - g, 1)).astype(np.float64)


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
