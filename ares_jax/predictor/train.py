"""Training a head (``ares-jax predictor train``): AdamW with warmup + cosine decay, early stopping
on validation MAE, orbax checkpoints of the best and the latest epoch.

The split is by request (70/15/15, ``split_seed``); the test requests are never read here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from ares_jax.config import to_dict
from ares_jax.predictor.checkpoint import save_head
from ares_jax.predictor.config import TrainConfig
from ares_jax.predictor.data import Dataset, split_by_request
from ares_jax.predictor.heads import (
    L1_OUTPUT_SCALE,
    LengthHead,
    count_params,
    remaining_bins,
    select_input,
)

EVAL_BATCH = 4096


@dataclasses.dataclass
class Points:
    """Prediction points as the heads consume them (hidden states stay float16 on the host)."""

    hidden: np.ndarray  # [N, D] last layer
    hidden_tap: np.ndarray  # [N, D] tap layer
    t: np.ndarray  # [N] int32
    max_tokens: np.ndarray  # [N] int32
    remaining: np.ndarray  # [N] float32 labels

    @classmethod
    def from_dataset(cls, ds: Dataset) -> Points:
        return cls(ds.hidden, ds.hidden_tap, ds.t.astype(np.int32),
                   ds.sample_max_tokens.astype(np.int32), ds.remaining)

    def __len__(self) -> int:
        return int(self.t.size)


@nnx.jit
def _predict_batch(head: LengthHead, h, ht, t, m) -> jax.Array:
    return head.predict(h, ht, t, m)


def predict_points(head: LengthHead, points: Points) -> np.ndarray:
    """Clipped predictions for every point, in fixed-size batches (one compiled shape)."""
    n = len(points)
    out = np.empty(n, np.float32)
    for s in range(0, n, EVAL_BATCH):
        e = min(s + EVAL_BATCH, n)
        h, ht, t, m = padded_batch(points, s, e, EVAL_BATCH)
        out[s:e] = np.asarray(_predict_batch(head, h, ht, t, m))[: e - s]
    return out


def padded_batch(points: Points, start: int, end: int, size: int):
    """Points [start, end) padded to ``size`` rows (one compiled shape for every batch)."""
    pad = size - (end - start)
    return (np.pad(points.hidden[start:end], ((0, pad), (0, 0))),
            np.pad(points.hidden_tap[start:end], ((0, pad), (0, 0))),
            np.pad(points.t[start:end], (0, pad)),
            np.pad(points.max_tokens[start:end], (0, pad), constant_values=1))


def _loss(head: LengthHead, h, ht, t, m, y, rngs: nnx.Rngs) -> jax.Array:
    raw = head(h, ht, t, m, rngs=rngs)
    if head.cfg.kind == "trail":
        labels = remaining_bins(y, m, head.cfg.num_bins)
        return optax.softmax_cross_entropy_with_integer_labels(raw, labels).mean()
    if head.cfg.loss == "log_l1":
        return jnp.abs(raw - jnp.log1p(y)).mean()
    return jnp.abs(head.to_tokens(raw, t, m) - y).mean() / L1_OUTPUT_SCALE


@nnx.jit
def _train_step(head: LengthHead, opt: nnx.Optimizer, h, ht, t, m, y,
                rngs: nnx.Rngs) -> jax.Array:
    loss, grads = nnx.value_and_grad(_loss)(head, h, ht, t, m, y, rngs)
    opt.update(head, grads)
    return loss


def init_head(cfg: TrainConfig, train: Points) -> LengthHead:
    """A fresh head with input statistics and output calibrated on the training points."""
    head = LengthHead(cfg.head, train.hidden.shape[1], rngs=nnx.Rngs(params=cfg.seed))
    x = select_input(cfg.head.layer, train.hidden, train.hidden_tap).astype(np.float32)
    head.in_mean.set_value(jnp.asarray(x.mean(0)))
    # A floor on the scale keeps near-constant dimensions from exploding after standardising.
    head.in_scale.set_value(jnp.asarray(1.0 / np.maximum(x.std(0), 1e-2)))
    if cfg.head.kind == "trail":
        frac = train.remaining / np.maximum(train.max_tokens, 1)
        bins = np.asarray(remaining_bins(jnp.asarray(train.remaining),
                                         jnp.asarray(train.max_tokens), cfg.head.num_bins))
        centers = (np.arange(cfg.head.num_bins) + 0.5) / cfg.head.num_bins
        values = [np.median(frac[bins == b]) if (bins == b).any() else centers[b]
                  for b in range(cfg.head.num_bins)]
        head.bin_values.set_value(jnp.asarray(values, jnp.float32))
    else:
        # Start from the training median: early epochs then refine rather than climb.
        if cfg.head.loss == "log_l1":
            start = np.median(np.log1p(train.remaining))
        elif cfg.head.loss == "budget_l1":
            frac = np.median(train.remaining / np.maximum(train.max_tokens - train.t, 1))
            frac = np.clip(frac, 0.01, 0.99)
            start = np.log(frac / (1 - frac))
        else:
            start = np.median(train.remaining) / L1_OUTPUT_SCALE
        head.out.bias.set_value(jnp.full((1,), float(start), jnp.float32))
    return head


def train_head(ds: Dataset, cfg: TrainConfig, out_dir: str | Path, progress: bool = True,
               provenance: dict | None = None) -> dict:
    """Train, early-stop and checkpoint a head. ``provenance`` (the data's model, layers and
    cap) is stored in the checkpoint so serving can refuse a head that does not fit."""
    train_rows, val_rows, _ = split_by_request(ds.index, cfg.split_seed)
    train = Points.from_dataset(ds.select_requests(train_rows))
    val = Points.from_dataset(ds.select_requests(val_rows))
    if len(train) < cfg.batch_size:
        raise ValueError(f"{len(train)} training points; need at least batch_size="
                         f"{cfg.batch_size}")
    head = init_head(cfg, train)
    steps_per_epoch = len(train) // cfg.batch_size
    total = steps_per_epoch * cfg.max_epochs
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, min(cfg.warmup_steps, max(1, total // 10)), total,
        end_value=cfg.learning_rate * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=cfg.weight_decay))
    opt = nnx.Optimizer(head, tx, wrt=nnx.Param)
    rngs = nnx.Rngs(dropout=cfg.seed + 1)
    shuffle = np.random.default_rng(cfg.seed)
    out_dir = Path(out_dir)
    best_mae, best_epoch, history = math.inf, -1, []
    bar = tqdm(range(cfg.max_epochs), desc=f"train {cfg.head.kind}/{cfg.head.layer}",
               unit="epoch", disable=not progress)
    for epoch in bar:
        order = shuffle.permutation(len(train))
        losses = []
        for s in range(steps_per_epoch):
            idx = np.sort(order[s * cfg.batch_size:(s + 1) * cfg.batch_size])
            losses.append(_train_step(head, opt, train.hidden[idx], train.hidden_tap[idx],
                                      train.t[idx],
                                      train.max_tokens[idx], train.remaining[idx], rngs))
        val_mae = float(np.abs(predict_points(head, val) - val.remaining).mean())
        history.append({"epoch": epoch, "loss": float(np.mean(jax.device_get(losses))),
                        "val_mae": val_mae})
        summary = {"config": to_dict(cfg), "data": provenance or {}, "params": count_params(head),
                   "train_requests": int(train_rows.size), "val_requests": int(val_rows.size),
                   "train_points": len(train), "val_points": len(val), "history": history}
        save_head(out_dir / "latest", head, {**summary, "epoch": epoch, "val_mae": val_mae})
        if val_mae < best_mae:
            best_mae, best_epoch = val_mae, epoch
            save_head(out_dir / "best", head, {**summary, "epoch": epoch, "val_mae": val_mae})
        bar.set_postfix(loss=history[-1]["loss"], val_mae=f"{val_mae:.1f}",
                        best=f"{best_mae:.1f}@{best_epoch}")
        if epoch - best_epoch >= cfg.patience:
            break
    bar.close()
    return {"best_epoch": best_epoch, "best_val_mae": best_mae, "epochs_run": len(history),
            "params": count_params(head), "train_points": len(train), "val_points": len(val),
            "checkpoint": str(out_dir / "best")}
