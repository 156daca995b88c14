"""The collected-data format: sharded ``.npz`` files plus a small JSON manifest.

A shard holds whole requests: their metadata (prompt ids, final output length, finish reason)
and their prediction points (tokens generated so far ``t``, last-layer and tap-layer hidden
states as float16). Labels are not stored; they are derived on read as ``output_len - t``. A
request that hit the ``max_tokens`` cap has ``output_len == cap``, so its label is ``cap - t``:
under the serving cap its remaining length is fully observed, and it is kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FINISH_CODES = {"stop": 0, "length": 1}


@dataclasses.dataclass
class RequestRecord:
    """One finished request and its prediction points, as the collector builds it."""

    index: int  # stable dataset index (also seeds unseeded sampling)
    source: str  # "sharegpt" | "humaneval"
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    max_tokens: int
    t: list[int] = dataclasses.field(default_factory=list)
    hidden: list[np.ndarray] = dataclasses.field(default_factory=list)
    hidden_tap: list[np.ndarray] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Dataset:
    """Everything collected, flattened: per-request arrays and per-sample arrays."""

    # per request
    index: np.ndarray  # [R] int64
    source: np.ndarray  # [R] str
    prompt_len: np.ndarray  # [R] int32
    output_len: np.ndarray  # [R] int32
    finished_by_cap: np.ndarray  # [R] bool
    max_tokens: np.ndarray  # [R] int32
    prompt_ids: list[np.ndarray]  # R arrays of int32
    # per sample (prediction point)
    sample_request: np.ndarray  # [N] row into the per-request arrays
    t: np.ndarray  # [N] int32 tokens generated so far
    hidden: np.ndarray  # [N, D] float16 (last layer, after the final norm)
    hidden_tap: np.ndarray  # [N, D] float16 (block ``tap_layer``)

    @property
    def remaining(self) -> np.ndarray:
        """Label: tokens still to generate at each prediction point (cap - t when capped)."""
        return (self.output_len[self.sample_request] - self.t).astype(np.float32)

    @property
    def sample_max_tokens(self) -> np.ndarray:
        return self.max_tokens[self.sample_request]

    @property
    def num_requests(self) -> int:
        return int(self.index.size)

    def select_requests(self, rows: np.ndarray) -> Dataset:
        """The sub-dataset of the given request rows (and all their samples)."""
        rows = np.asarray(rows, np.int64)
        remap = np.full(self.num_requests, -1, np.int64)
        remap[rows] = np.arange(rows.size)
        keep = remap[self.sample_request] >= 0
        return Dataset(
            index=self.index[rows], source=self.source[rows], prompt_len=self.prompt_len[rows],
            output_len=self.output_len[rows], finished_by_cap=self.finished_by_cap[rows],
            max_tokens=self.max_tokens[rows], prompt_ids=[self.prompt_ids[i] for i in rows],
            sample_request=remap[self.sample_request[keep]], t=self.t[keep],
            hidden=self.hidden[keep], hidden_tap=self.hidden_tap[keep])


def write_shard(path: Path, records: list[RequestRecord], hidden_size: int) -> None:
    """Write one shard atomically (a partial shard never looks complete)."""
    counts = [len(r.t) for r in records]
    prompt_offsets = np.cumsum([0] + [len(r.prompt_ids) for r in records])
    output_offsets = np.cumsum([0] + [len(r.output_ids) for r in records])

    def stack(attr: str) -> np.ndarray:
        rows = [h for r in records for h in getattr(r, attr)]
        if not rows:
            return np.zeros((0, hidden_size), np.float16)
        return np.stack(rows).astype(np.float16)

    arrays = {
        "index": np.array([r.index for r in records], np.int64),
        "source": np.array([r.source for r in records]),
        "finish": np.array([FINISH_CODES[r.finish_reason] for r in records], np.int8),
        "max_tokens": np.array([r.max_tokens for r in records], np.int32),
        "prompt_ids": np.concatenate([np.asarray(r.prompt_ids, np.int32) for r in records]
                                     or [np.zeros(0, np.int32)]),
        "prompt_offsets": prompt_offsets.astype(np.int64),
        "output_ids": np.concatenate([np.asarray(r.output_ids, np.int32) for r in records]
                                     or [np.zeros(0, np.int32)]),
        "output_offsets": output_offsets.astype(np.int64),
        "sample_request": np.repeat(np.arange(len(records)), counts).astype(np.int64),
        "t": np.array([t for r in records for t in r.t], np.int32),
        "hidden": stack("hidden"),
        "hidden_tap": stack("hidden_tap"),
    }
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def write_manifest(root: Path, manifest: dict) -> None:
    path = Path(root) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def load_dataset(root: str | Path, max_shards: int | None = None) -> Dataset:
    """Read the shards listed in the manifest (the first ``max_shards`` of them: a fixed
    snapshot of a collection that is still growing) into one :class:`Dataset`."""
    root = Path(root)
    manifest = read_manifest(root)
    if not manifest.get("shards"):
        raise FileNotFoundError(f"{root}: no {MANIFEST} with shards; run `ares-jax predictor "
                                "collect` first")
    parts = [np.load(root / s["file"]) for s in manifest["shards"][:max_shards]]
    index, source, finish, max_tokens, output_len, prompt_ids = [], [], [], [], [], []
    sample_request, t, hidden, hidden_tap = [], [], [], []
    base = 0
    for p in parts:
        n = p["index"].size
        index.append(p["index"])
        source.append(p["source"])
        finish.append(p["finish"])
        max_tokens.append(p["max_tokens"])
        output_len.append(np.diff(p["output_offsets"]).astype(np.int32))
        po = p["prompt_offsets"]
        prompt_ids.extend(p["prompt_ids"][po[i]:po[i + 1]] for i in range(n))
        sample_request.append(p["sample_request"] + base)
        t.append(p["t"])
        hidden.append(p["hidden"])
        hidden_tap.append(p["hidden_tap"])
        base += n
    return Dataset(
        index=np.concatenate(index), source=np.concatenate(source),
        prompt_len=np.array([x.size for x in prompt_ids], np.int32),
        output_len=np.concatenate(output_len),
        finished_by_cap=np.concatenate(finish) == FINISH_CODES["length"],
        max_tokens=np.concatenate(max_tokens), prompt_ids=prompt_ids,
        sample_request=np.concatenate(sample_request), t=np.concatenate(t),
        hidden=np.concatenate(hidden), hidden_tap=np.concatenate(hidden_tap))


def _unit_hash(values: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) number per value (splitmix64), independent of the other values."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_by_request(request_index: np.ndarray, seed: int,
                     fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Request rows for train / validation / test.

    Split by request, never by sample, so no request's later hidden states leak into the
    evaluation of its earlier ones. Each request's side is a hash of its dataset index and the
    seed, so it does not move when a resumed collection adds requests (a head trained on an
    earlier snapshot never sees a later snapshot's test requests); the fractions hold in
    expectation.
    """
    u = _unit_hash(np.asarray(request_index), seed)
    cut_train, cut_val = fractions[0], fractions[0] + fractions[1]
    return (np.flatnonzero(u < cut_train), np.flatnonzero((u >= cut_train) & (u < cut_val)),
            np.flatnonzero(u >= cut_val))
