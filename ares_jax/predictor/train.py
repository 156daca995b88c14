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
    MEMBER_AXIS,
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
def _member_batch(head: LengthHead, h, ht, t, m) -> jax.Array:
    return head.member_predictions(h, ht, t, m)


def member_predictions(head: LengthHead, points: Points) -> np.ndarray:
    """[K, N] each member's clipped predictions, in fixed-size batches (one compiled shape)."""
    n = len(points)
    out = np.empty((head.cfg.members, n), np.float32)
    for s in range(0, n, EVAL_BATCH):
        e = min(s + EVAL_BATCH, n)
        h, ht, t, m = padded_batch(points, s, e, EVAL_BATCH)
        out[:, s:e] = np.asarray(_member_batch(head, h, ht, t, m))[: e - s].T
    return out


def predict_points(head: LengthHead, points: Points) -> np.ndarray:
    """[N] the head's predictions (the members' mean), as ``LengthHead.predict`` computes."""
    return member_predictions(head, points).mean(axis=0)


def padded_batch(points: Points, start: int, end: int, size: int):
    """Points [start, end) padded to ``size`` rows (one compiled shape for every batch)."""
    pad = size - (end - start)
    return (np.pad(points.hidden[start:end], ((0, pad), (0, 0))),
            np.pad(points.hidden_tap[start:end], ((0, pad), (0, 0))),
            np.pad(points.t[start:end], (0, pad)),
            np.pad(points.max_tokens[start:end], (0, pad), constant_values=1))


def _loss(head: LengthHead, h, ht, t, m, y, rngs: nnx.Rngs) -> jax.Array:
    # Inputs and labels are [B, K]: one batch per member. Summed over members (each a mean over
    # its batch), so every member gets the gradient it would get trained alone.
    raw = head(h, ht, t, m, rngs=rngs)
    if head.cfg.kind == "trail":
        labels = remaining_bins(y, m, head.cfg.num_bins)
        return optax.softmax_cross_entropy_with_integer_labels(raw, labels).mean(0).sum()
    if head.cfg.loss == "log_l1":
        return jnp.abs(raw - jnp.log1p(y)).mean(0).sum()
    return jnp.abs(head.to_tokens(raw, t, m) - y).mean(0).sum() / L1_OUTPUT_SCALE


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
        head.out.bias.set_value(jnp.full((1, cfg.head.members, 1), float(start), jnp.float32))
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
    # The norm of K members' joint gradient is ~sqrt(K) times one member's: clip accordingly.
    tx = optax.chain(optax.clip_by_global_norm(math.sqrt(cfg.head.members)),
                     optax.adamw(schedule, weight_decay=cfg.weight_decay))
    opt = nnx.Optimizer(head, tx, wrt=nnx.Param)
    rngs = nnx.Rngs(dropout=cfg.seed + 1)
    shuffle = np.random.default_rng(cfg.seed)
    out_dir = Path(out_dir)
    best = MemberSelection(head, val)
    history = []
    bar = tqdm(range(cfg.max_epochs), desc=f"train {cfg.head.kind}/{cfg.head.layer}",
               unit="epoch", disable=not progress)
    for epoch in bar:
        # Each member sees its own batch order (inputs [B, K, ...]): shared batches would make
        # the members' errors more alike and the ensemble less useful.
        order = np.stack([shuffle.permutation(len(train)) for _ in range(cfg.head.members)], 1)
        losses = []
        for s in range(steps_per_epoch):
            idx = np.sort(order[s * cfg.batch_size:(s + 1) * cfg.batch_size], axis=0)
            losses.append(_train_step(head, opt, train.hidden[idx], train.hidden_tap[idx],
                                      train.t[idx],
                                      train.max_tokens[idx], train.remaining[idx], rngs))
        val_mae, improved = best.update(head, epoch)
        history.append({"epoch": epoch, "loss": float(np.mean(jax.device_get(losses))),
                        "val_mae": val_mae, "best_val_mae": best.mae,
                        "member_val_mae": best.last_member_mae})
        summary = {"config": to_dict(cfg), "data": provenance or {}, "params": count_params(head),
                   "train_requests": int(train_rows.size), "val_requests": int(val_rows.size),
                   "train_points": len(train), "val_points": len(val), "history": history}
        save_head(out_dir / "latest", head, {**summary, "epoch": epoch, "val_mae": val_mae})
        if improved:
            save_head(out_dir / "best", best.head(head),
                      {**summary, "epoch": epoch, "member_epochs": best.epochs.tolist(),
                       "val_mae": best.mae})
        bar.set_postfix(loss=history[-1]["loss"], val_mae=f"{val_mae:.1f}",
                        best=f"{best.mae:.1f}")
        if epoch - int(best.epochs.max()) >= cfg.patience:
            break
    bar.close()
    return {"best_epoch": int(best.epochs.max()), "member_best_epochs": best.epochs.tolist(),
            "best_val_mae": best.mae, "epochs_run": len(history),
            "params": count_params(head), "train_points": len(train), "val_points": len(val),
            "checkpoint": str(out_dir / "best")}


class MemberSelection:
    """Early stopping per ensemble member: each member keeps the weights of the epoch with its
    own lowest validation MAE, and the best head is those weights stacked. Every parameter of a
    ``LengthHead`` has the member axis at ``MEMBER_AXIS``, so a member's weights are slice ``k``
    of each."""

    def __init__(self, head: LengthHead, val: Points) -> None:
        k = head.cfg.members
        self.val = val
        self.member_mae = np.full(k, np.inf)
        self.last_member_mae: list[float] = []
        self.epochs = np.full(k, -1)
        self.preds = np.zeros((k, len(val)), np.float32)
        self.params = jax.tree.map(np.array, nnx.state(head, nnx.Param))
        self.mae = math.inf

    def update(self, head: LengthHead, epoch: int) -> tuple[float, bool]:
        """Score this epoch; returns (this epoch's ensemble MAE, whether any member improved)."""
        preds = member_predictions(head, self.val)
        mae = np.abs(preds - self.val.remaining).mean(axis=1)
        self.last_member_mae = [float(x) for x in mae]
        better = mae < self.member_mae
        if better.any():
            current = nnx.state(head, nnx.Param)
            self.params = jax.tree.map(
                lambda kept, now: np.where(_along_members(better, kept.ndim),
                                           np.asarray(now), kept), self.params, current)
            self.member_mae[better] = mae[better]
            self.epochs[better] = epoch
            self.preds[better] = preds[better]
            self.mae = float(np.abs(self.preds.mean(0) - self.val.remaining).mean())
        return float(np.abs(preds.mean(0) - self.val.remaining).mean()), bool(better.any())

    def head(self, like: LengthHead) -> LengthHead:
        """A copy of ``like`` carrying every member's best weights."""
        out = nnx.clone(like)
        nnx.update(out, jax.tree.map(jnp.asarray, self.params))
        return out


def _along_members(mask: np.ndarray, ndim: int) -> np.ndarray:
    """A per-member mask shaped to broadcast against a parameter with ``ndim`` dimensions."""
    shape = [1] * ndim
    shape[MEMBER_AXIS] = mask.size
    return mask.reshape(shape)
