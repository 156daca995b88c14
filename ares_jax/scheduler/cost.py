"""Step-time cost models and the memory facts of each model/GPU pair.

A decode step runs the whole batch of a replica at once (continuous batching); its time depends on
the batch size and on the total number of KV tokens attended. Two implementations:

* :class:`LinearStepCost`: ``ms = a + b * batch + c * kv_tokens``, from the fit table in
  ``../shared/data/README.md`` or fitted from measurements with :meth:`LinearStepCost.fit_linear`
  (how the CPU engine gets its model);
* :class:`GridStepCost`: bilinear interpolation over aiconfigurator's decode grid
  (``costmodel/aic_grid.csv``), linear extrapolation outside it.

Both also give ``prefill_ms(prompt_tokens)`` by interpolating the grid's prefill rows.

Memory: a replica's KV capacity is ``tp * gpu_bytes * utilisation - weight_bytes - tp *
activation_reserve``, divided by the model's KV bytes per token. Assumptions (documented in
docs/SIMULATOR.md): bf16 weights and KV, weight bytes = 2 * parameter count, vLLM's default 0.9
memory utilisation, 1 GiB per GPU kept for activations and CUDA graphs.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

GIB = 1024**3
MIB = 1024**2


def shared_data_dir() -> Path:
    """``$ARES_SHARED_DATA`` if set, else ``<repo root>/../shared/data``."""
    env = os.environ.get("ARES_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def default_grid_path() -> Path:
    return shared_data_dir() / "costmodel" / "aic_grid.csv"


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The dimensions that decide KV size and weight memory."""

    name: str
    params: float  # parameter count
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  # bf16

    @property
    def kv_bytes_per_token(self) -> int:
        # K and V, every layer, every KV head (summed over tensor-parallel shards).
        return self.layers * self.kv_heads * self.head_dim * 2 * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    name: str
    memory_bytes: int


# Published model configs (config.json of each checkpoint).
MODELS: dict[str, ModelSpec] = {
    "llama3_8b": ModelSpec(name="llama3_8b", params=8.03e9, layers=32, kv_heads=8, head_dim=128),
    "qwen25_7b": ModelSpec(name="qwen25_7b", params=7.62e9, layers=28, kv_heads=4, head_dim=128),
    "r1_qwen_32b": ModelSpec(
        name="r1_qwen_32b", params=32.76e9, layers=64, kv_heads=8, head_dim=128
    ),
}

# Memory as nvidia-smi reports it for the SXM parts.
GPUS: dict[str, GpuSpec] = {
    "h100_sxm": GpuSpec(name="h100_sxm", memory_bytes=81559 * MIB),
    "h200_sxm": GpuSpec(name="h200_sxm", memory_bytes=143771 * MIB),
    "a100_sxm": GpuSpec(name="a100_sxm", memory_bytes=81920 * MIB),
}

# The fit table of ../shared/data/README.md: (a ms, b ms per request, c ms per KV token).
LINEAR_FITS: dict[tuple[str, str, int], tuple[float, float, float]] = {
    ("llama3_8b", "h100_sxm", 1): (6.31, 0.0129, 4.12e-5),
    ("llama3_8b", "a100_sxm", 1): (11.72, 0.036, 8.45e-5),
    ("llama3_8b", "h200_sxm", 1): (4.74, 0.016, 2.91e-5),
    ("qwen25_7b", "h100_sxm", 1): (5.72, 0.0121, 1.83e-5),
    ("r1_qwen_32b", "h100_sxm", 2): (13.60, 0.028, 4.19e-5),
}


def kv_capacity_tokens(
    model: ModelSpec,
    gpu: GpuSpec,
    tp: int,
    *,
    memory_utilization: float = 0.9,
    activation_reserve_bytes: float = 1 * GIB,
) -> int:
    """KV tokens one replica (``tp`` GPUs) can hold."""
    budget = tp * gpu.memory_bytes * memory_utilization - model.weight_bytes
    budget -= tp * activation_reserve_bytes
    if budget <= 0:
        raise ValueError(f"{model.name} does not fit on {tp} x {gpu.name}")
    return int(budget // model.kv_bytes_per_token)


class StepCostModel(Protocol):
    """Time of one decode step of a whole batch, and of one prefill."""

    def step_ms(self, batch: ArrayLike, kv_tokens: ArrayLike) -> np.ndarray:
        """Decode step time for ``batch`` requests holding ``kv_tokens`` KV tokens in total."""
        ...

    def prefill_ms(self, prompt_tokens: ArrayLike) -> np.ndarray:
        ...


class _PrefillCurve:
    """Piecewise-linear prefill time over prompt length; flat below, last slope above."""

    def __init__(self, tokens: ArrayLike, ms: ArrayLike) -> None:
        order = np.argsort(np.asarray(tokens, dtype=np.float64))
        self.tokens = np.asarray(tokens, dtype=np.float64)[order]
        self.ms = np.asarray(ms, dtype=np.float64)[order]
        if self.tokens.size >= 2:
            self.tail_slope = (self.ms[-1] - self.ms[-2]) / (self.tokens[-1] - self.tokens[-2])
        else:
            self.tail_slope = 0.0

    def __call__(self, prompt_tokens: ArrayLike) -> np.ndarray:
        x = np.asarray(prompt_tokens, dtype=np.float64)
        inside = np.interp(x, self.tokens, self.ms)
        beyond = self.ms[-1] + self.tail_slope * (x - self.tokens[-1])
        return np.where(x > self.tokens[-1], beyond, inside)


@dataclass(frozen=True, kw_only=True)
class LinearStepCost:
    """``ms = a + b * batch + c * kv_tokens`` (0 for an empty batch)."""

    a: float
    b: float
    c: float
    prefill_tokens: tuple[float, ...] = (1.0, 8192.0)
    prefill_times_ms: tuple[float, ...] = (1.0, 200.0)

    def step_ms(self, batch: ArrayLike, kv_tokens: ArrayLike) -> np.ndarray:
        n = np.asarray(batch, dtype=np.float64)
        ms = self.a + self.b * n + self.c * np.asarray(kv_tokens, dtype=np.float64)
        return np.where(n > 0, ms, 0.0)

    def prefill_ms(self, prompt_tokens: ArrayLike) -> np.ndarray:
        return _PrefillCurve(self.prefill_tokens, self.prefill_times_ms)(prompt_tokens)

    @classmethod
    def fit_linear(
        cls,
        samples: Iterable[tuple[float, float, float]],
        prefill_samples: Iterable[tuple[float, float]] = (),
    ) -> LinearStepCost:
        """Least-squares fit from measured ``(batch, kv_tokens, ms)`` decode rows.

        ``prefill_samples`` are ``(prompt_tokens, ms)`` rows, interpolated as-is.
        """
        rows = np.asarray(list(samples), dtype=np.float64)
        if rows.ndim != 2 or rows.shape[0] < 3 or rows.shape[1] != 3:
            raise ValueError("fit_linear needs at least 3 (batch, kv_tokens, ms) rows")
        design = np.column_stack([np.ones(len(rows)), rows[:, 0], rows[:, 1]])
        (a, b, c), *_ = np.linalg.lstsq(design, rows[:, 2], rcond=None)
        pre = sorted(prefill_samples)
        if pre:
            tokens, times = zip(*pre, strict=True)
            return cls(a=a, b=b, c=c, prefill_tokens=tokens, prefill_times_ms=times)
        return cls(a=a, b=b, c=c)


_COUNTS = 4096  # batch sizes with a precomputed bracket (GridStepCost.step_ms)


class GridStepCost:
    """Bilinear interpolation of decode step time over (batch, KV tokens per request)."""

    def __init__(
        self,
        batches: ArrayLike,
        lens: ArrayLike,
        grid_ms: ArrayLike,
        prefill_tokens: ArrayLike,
        prefill_times_ms: ArrayLike,
    ) -> None:
        self.batches = np.asarray(batches, dtype=np.float64)
        self.lens = np.asarray(lens, dtype=np.float64)
        self.grid = np.asarray(grid_ms, dtype=np.float64)  # [batch index, len index]
        if self.grid.shape != (self.batches.size, self.lens.size):
            raise ValueError("grid shape does not match its axes")
        self._prefill = _PrefillCurve(prefill_tokens, prefill_times_ms)
        # Precomputed for step_ms, the hot path of ARES's forecasts: cell widths and the grid
        # as a flat array (the same values as computing them per call).
        self._batch_width = np.diff(self.batches)
        self._len_width = np.diff(self.lens)
        flat = np.ascontiguousarray(self.grid).ravel()
        cols = self.lens.size
        # The four corners of every cell, indexed by the flat index of its lower corner: one
        # ``take`` along the columns of this [4, cells] table gathers all four (four
        # contiguous rows) instead of four gathers.
        cells = flat.size - cols - 1
        self._corners = np.stack([flat[:cells], flat[1:cells + 1], flat[cols:cols + cells],
                                  flat[cols + 1:cols + 1 + cells]])
        # Batch sizes are counts wherever ARES forecasts: the batch axis's bracket of every
        # count below _COUNTS, computed once with step_ms's own arithmetic, replaces a binary
        # search per element (the costliest part of a call); other values take the general
        # path. Same values either way.
        counts = np.arange(float(_COUNTS))
        bi, bw = self._bracket(self.batches, self._batch_width,
                               np.maximum(np.maximum(counts, 1.0), self.batches[0]))
        self._count_row, self._count_w, self._count_w1 = bi * cols, bw, 1 - bw

    @staticmethod
    def _bracket(axis: np.ndarray, width: np.ndarray,
                 x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lower index and weight for linear interpolation; weights outside [0, 1] extrapolate."""
        # The lower index clipped to [0, size - 2]: the count of interior points <= x
        # (searchsorted over all points, minus one, clipped: the same index in one call).
        i = np.searchsorted(axis[1:-1], x, side="right")
        w = (x - axis.take(i)) / width.take(i)
        return i, w

    @staticmethod
    def _as_counts(n: np.ndarray) -> tuple[np.ndarray | None, bool]:
        """``n`` as indices of the precomputed brackets (None unless every value is an integer
        in ``[0, _COUNTS)``; NaN fails the first test, before any cast), and whether every
        value is known to be positive."""
        if n.size == 0:
            return None, False
        lowest = n.min()
        if not (lowest >= 0 and n.max() < _COUNTS):
            return None, False
        count = n.astype(np.intp)
        return (count if (count == n).all() else None), bool(lowest > 0)

    def step_ms(self, batch: ArrayLike, kv_tokens: ArrayLike) -> np.ndarray:
        n = np.asarray(batch, dtype=np.float64)
        kv = np.asarray(kv_tokens, dtype=np.float64)
        count, positive = self._as_counts(n)
        # (counts of at least 1 are their own maximum with 1.0)
        safe_n = n if positive and count is not None else np.maximum(n, 1.0)
        # Below the grid's first row (batch 1 / 256 tokens) the step time is flat: clamp there.
        length = np.maximum(kv / safe_n, self.lens[0])
        li, lw = self._bracket(self.lens, self._len_width, length)
        if count is not None:
            at = self._count_row.take(count) + li  # grid[bi, li] in the flat grid
            bw, bw1 = self._count_w.take(count), self._count_w1.take(count)
        else:
            bi, bw = self._bracket(self.batches, self._batch_width,
                                   np.maximum(safe_n, self.batches[0]))
            at = bi * self.lens.size + li
            bw1 = 1 - bw
        g00, g01, g10, g11 = self._corners.take(at, axis=1)
        lw1 = 1 - lw
        low = g00 * lw1 + g01 * lw
        high = g10 * lw1 + g11 * lw
        ms = low * bw1 + high * bw
        return ms if positive else np.where(n > 0, ms, 0.0)

    def prefill_ms(self, prompt_tokens: ArrayLike) -> np.ndarray:
        return self._prefill(prompt_tokens)


@lru_cache(maxsize=8)
def _read_grid(path: str) -> tuple[tuple[str, ...], ...]:
    with open(path, newline="") as f:
        return tuple(tuple(row) for row in csv.reader(f))


def _grid_rows(model: str, gpu: str, tp: int, path: Path | None) -> list[dict[str, str]]:
    rows = _read_grid(str(path or default_grid_path()))
    header, body = rows[0], rows[1:]
    picked = [dict(zip(header, r, strict=True)) for r in body]
    picked = [
        r for r in picked if r["model"] == model and r["system"] == gpu and int(r["tp"]) == tp
    ]
    if not picked:
        raise ValueError(f"no aic_grid rows for model={model} gpu={gpu} tp={tp}")
    return picked


def _prefill_points(rows: list[dict[str, str]]) -> tuple[list[float], list[float]]:
    pre = sorted((float(r["len"]), float(r["ms"])) for r in rows if r["phase"] == "prefill")
    return [t for t, _ in pre], [m for _, m in pre]


def grid_step_cost(model: str, gpu: str, tp: int, path: Path | None = None) -> GridStepCost:
    rows = _grid_rows(model, gpu, tp, path)
    decode = [r for r in rows if r["phase"] == "decode"]
    batches = sorted({float(r["batch"]) for r in decode})
    lens = sorted({float(r["len"]) for r in decode})
    grid = np.full((len(batches), len(lens)), np.nan)
    for r in decode:
        grid[batches.index(float(r["batch"])), lens.index(float(r["len"]))] = float(r["ms"])
    if np.isnan(grid).any():
        raise ValueError(f"aic_grid decode rows for {model}/{gpu}/tp{tp} are not a full grid")
    tokens, times = _prefill_points(rows)
    return GridStepCost(batches, lens, grid, tokens, times)


def linear_step_cost(model: str, gpu: str, tp: int, path: Path | None = None) -> LinearStepCost:
    """The README's fit when it has the pair, else a fit of the grid's decode rows."""
    rows = _grid_rows(model, gpu, tp, path)
    tokens, times = _prefill_points(rows)
    if (model, gpu, tp) in LINEAR_FITS:
        a, b, c = LINEAR_FITS[(model, gpu, tp)]
        return LinearStepCost(
            a=a, b=b, c=c, prefill_tokens=tuple(tokens), prefill_times_ms=tuple(times)
        )
    samples = [
        (float(r["batch"]), float(r["tokens"]), float(r["ms"]))
        for r in rows
        if r["phase"] == "decode"
    ]
    return LinearStepCost.fit_linear(samples, zip(tokens, times, strict=True))


def build_cost_model(
    kind: str, model: str, gpu: str, tp: int, path: Path | None = None
) -> StepCostModel:
    if kind == "grid":
        return grid_step_cost(model, gpu, tp, path)
    if kind == "linear":
        return linear_step_cost(model, gpu, tp, path)
    raise ValueError(f"unknown cost model {kind!r}; expected 'grid' or 'linear'")


@dataclass(frozen=True, kw_only=True)
class TransferCost:
    """Moving KV between replicas: bytes over a link, plus a fixed stall per stop-and-copy.

    ``copy_slowdown`` is the fraction by which a copy slows the decode steps of both replicas
    while it runs (the copy shares HBM bandwidth and the NIC with decoding); 0 = none."""

    kv_bytes_per_token: int
    link_gbytes_per_s: float = 50.0
    stall_ms: float = 1.0
    copy_slowdown: float = 0.0

    def copy_ms(self, kv_tokens: float) -> float:
        return kv_tokens * self.kv_bytes_per_token / (self.link_gbytes_per_s * 1e9) * 1e3

    def migration_ms(self, kv_tokens: float) -> float:
        """What a migration costs: the full copy plus the final stall."""
        return self.copy_ms(kv_tokens) + self.stall_ms
