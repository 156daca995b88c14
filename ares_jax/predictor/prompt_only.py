"""TetriInfer-style prompt-only baseline: a separate copy of SmolLM2-135M that reads only the
prompt and classifies the total output length into equal-width buckets.

What is fine-tuned: the last ``trainable_blocks`` transformer blocks, the final norm and a new
linear classifier on the last prompt token; the embedding and the earlier blocks stay frozen
(full fine-tuning of 135M parameters does not fit this CPU's budget). The frozen blocks run
once per prompt; their outputs are cached, so each epoch costs only the trainable blocks.
``trainable_blocks=0`` trains the classifier alone on the frozen copy's last-token final hidden
state; that is exactly the t = 0 hidden state the collector recorded from the same weights, so
it is read from the dataset instead of recomputed. The parameter count is the *whole* auxiliary
model, as the paper counts OPT-125M. The estimate at step t is ``max(predicted total - t, 0)``.

The classifier is plain JAX + optax (a pytree of arrays) because it reuses the serving model's
own block function rather than a second transformer implementation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from ares_jax.config import config, from_dict, to_dict
from ares_jax.model import model as llama
from ares_jax.model.loader import LoadedModel, load_model
from ares_jax.predictor.data import Dataset, split_by_request

META = "prompt_only.json"


@config
class PromptOnlyConfig:
    # 0 by default: caching the frozen blocks' outputs over every prompt costs about as much as
    # the collection's prefills (~30 min of this shared CPU for 700 prompts), so the shipped
    # comparison fine-tunes the classifier only. k > 0 is implemented and tested on small data.
    trainable_blocks: int = 0
    num_buckets: int = 8  # TetriInfer uses 200-token buckets; 8 buckets of 64 under a 512 cap
    epochs: int = 30
    batch_size: int = 16
    learning_rate: float = 1e-4  # the fine-tuned blocks
    classifier_learning_rate: float = 1e-3
    weight_decay: float = 0.01
    patience: int = 5
    seed: int = 0
    split_seed: int = 0


def _split_weights(w: llama.Weights, trainable_blocks: int):
    cut = jax.tree.leaves(w.layers)[0].shape[0] - trainable_blocks
    frozen = dataclasses.replace(w, layers=jax.tree.map(lambda x: x[:cut], w.layers))
    top = jax.tree.map(lambda x: x[cut:], w.layers)
    return frozen, top


def _pad_batch(prompts: list[np.ndarray], batch: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(32, 1 << math.ceil(math.log2(max(len(p) for p in prompts))))
    tokens = np.zeros((batch, width), np.int32)
    lengths = np.ones(batch, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        lengths[i] = len(p)
    return tokens, lengths


@jax.jit
def _frozen_pass(frozen: llama.Weights, tokens, lengths, cfg_holder):
    return llama._stack(frozen, cfg_holder.value, tokens, lengths)[0]


@dataclasses.dataclass(frozen=True)
class _Static:
    """Hashable wrapper so the model Config rides through jit as a static pytree node."""

    value: llama.Config


jax.tree_util.register_static(_Static)


def _classify(trainable: dict, h_in: jax.Array, lengths: jax.Array, cfg_holder: _Static,
              embed_template: llama.Weights) -> jax.Array:
    """The trainable blocks over cached block inputs, then norm + classifier at the last token.

    The cached activations are fed through the model's own block stack by making them the
    "embedding table" and the token ids their row numbers.
    """
    cfg = cfg_holder.value
    b, t, d = h_in.shape
    w = dataclasses.replace(embed_template, embed=h_in.reshape(b * t, d),
                            layers=trainable["layers"], final_norm=trainable["final_norm"])
    rows = jnp.arange(b * t, dtype=jnp.int32).reshape(b, t)
    h = llama._stack(w, cfg, rows, lengths)[0]
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    x = llama.rms_norm(last, trainable["final_norm"], cfg.rms_eps)
    return x @ trainable["w"] + trainable["b"]


def _bucket(total: np.ndarray, max_tokens: int, n: int) -> np.ndarray:
    return np.clip(total * n // max(max_tokens, 1), 0, n - 1).astype(np.int32)


@dataclasses.dataclass
class PromptOnlyPredictor:
    model: LoadedModel
    trainable: dict
    bucket_values: np.ndarray  # representative total length per bucket (training medians)
    cfg: PromptOnlyConfig

    @property
    def num_params(self) -> int:
        """The whole auxiliary model (frozen + fine-tuned) plus the classifier."""
        backbone = sum(int(x.size) for x in jax.tree.leaves(self.model.weights))
        return backbone + int(self.trainable["w"].size + self.trainable["b"].size)

    @property
    def fine_tuned_description(self) -> str:
        n = self.model.cfg.n_layers
        if self.cfg.trainable_blocks == 0:
            return (f"the {self.cfg.num_buckets}-bucket linear classifier only; all {n} blocks, "
                    "the embedding and the final norm frozen")
        return (f"blocks {n - self.cfg.trainable_blocks}-{n - 1} of {n}, final norm and the "
                f"{self.cfg.num_buckets}-bucket classifier; embedding and blocks 0-"
                f"{n - self.cfg.trainable_blocks - 1} frozen")

    def logits(self, prompts: list[np.ndarray]) -> np.ndarray:
        """Run the auxiliary model on the prompts: [n, num_buckets] logits."""
        frozen, _ = _split_weights(self.model.weights, self.cfg.trainable_blocks)
        holder = _Static(self.model.cfg)
        out = []
        for s in range(0, len(prompts), self.cfg.batch_size):
            chunk = prompts[s:s + self.cfg.batch_size]
            tokens, lengths = _pad_batch(chunk, self.cfg.batch_size)
            if self.cfg.trainable_blocks == 0:
                h = _last_hidden(self.model.weights, tokens, lengths, holder)
                logits = h @ self.trainable["w"] + self.trainable["b"]
            else:
                h = _frozen_pass(frozen, tokens, lengths, holder)
                logits = _classify_jit(self.trainable, h, lengths, holder, frozen)
            out.append(np.asarray(logits)[: len(chunk)])
        return np.concatenate(out)

    def predict_totals(self, prompts: list[np.ndarray],
                       last_hidden: np.ndarray | None = None) -> np.ndarray:
        """Predicted total output length per prompt. With ``trainable_blocks=0`` the recorded
        t = 0 hidden states (``last_hidden``, the same model's output) may stand in for the
        prompt pass."""
        if self.cfg.trainable_blocks == 0 and last_hidden is not None:
            logits = last_hidden.astype(np.float32) @ np.asarray(self.trainable["w"]) \
                + np.asarray(self.trainable["b"])
        else:
            logits = self.logits(prompts)
        return self.bucket_values[logits.argmax(-1)].astype(np.float32)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        path = Path(path).absolute()
        path.mkdir(parents=True, exist_ok=True)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path / "state", self.trainable, force=True)
        meta = {"config": to_dict(self.cfg), "model": self.model.source,
                "bucket_values": self.bucket_values.tolist(), "params": self.num_params,
                "fine_tuned": self.fine_tuned_description, **(extra or {})}
        (path / META).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, model: LoadedModel | None = None) -> PromptOnlyPredictor:
        path = Path(path).absolute()
        meta = json.loads((path / META).read_text())
        cfg = from_dict(PromptOnlyConfig, meta["config"])
        model = model or load_model(dtype="float32")
        target = _init_trainable(model, cfg, seed=0)
        with ocp.StandardCheckpointer() as ckptr:
            trainable = ckptr.restore(path / "state", target)
        return cls(model, trainable, np.asarray(meta["bucket_values"], np.float32), cfg)


_classify_jit = jax.jit(_classify)


@jax.jit
def _last_hidden(weights: llama.Weights, tokens, lengths, cfg_holder: _Static):
    return llama.prefill(weights, cfg_holder.value, tokens, lengths)["hidden"]


def t0_hidden(ds: Dataset) -> np.ndarray:
    """[R, D] each request's recorded last-layer hidden state at t = 0 (the prompt pass)."""
    rows = np.flatnonzero(ds.t == 0)
    out = np.zeros((ds.num_requests, ds.hidden.shape[1]), np.float16)
    out[ds.sample_request[rows]] = ds.hidden[rows]
    return out


def _init_trainable(model: LoadedModel, cfg: PromptOnlyConfig, seed: int) -> dict:
    d = model.cfg.d_model
    w = jax.random.normal(jax.random.key(seed), (d, cfg.num_buckets), jnp.float32) * 0.02
    head = {"w": w, "b": jnp.zeros(cfg.num_buckets, jnp.float32)}
    if cfg.trainable_blocks == 0:
        return head
    _, top = _split_weights(model.weights, cfg.trainable_blocks)
    return {"layers": jax.tree.map(jnp.array, top),
            "final_norm": jnp.array(model.weights.final_norm), **head}


def train_prompt_only(ds: Dataset, cfg: PromptOnlyConfig, out_dir: str | Path,
                      progress: bool = True, model: LoadedModel | None = None) -> dict:
    model = model or load_model(dtype="float32")  # a separate copy from any serving model
    max_tokens = int(ds.max_tokens.max())
    train_rows, val_rows, _ = split_by_request(ds.index, cfg.split_seed)
    labels = _bucket(ds.output_len, max_tokens, cfg.num_buckets)
    totals = ds.output_len.astype(np.float32)
    bucket_values = np.array([np.median(totals[train_rows][labels[train_rows] == b])
                              if (labels[train_rows] == b).any()
                              else (b + 0.5) * max_tokens / cfg.num_buckets
                              for b in range(cfg.num_buckets)], np.float32)
    frozen, _ = _split_weights(model.weights, cfg.trainable_blocks)
    holder = _Static(model.cfg)
    trainable = _init_trainable(model, cfg, cfg.seed)
    predictor = PromptOnlyPredictor(model, trainable, bucket_values, cfg)

    # Cache the frozen part's outputs once, in length-sorted batches (little padding). Each
    # batch is (inputs, request rows); ``forward`` maps (params, inputs) -> logits.
    def batches(rows: np.ndarray) -> list[tuple[tuple, np.ndarray]]:
        if cfg.trainable_blocks == 0:
            feats = t0_hidden(ds)
            return [((feats[rows[s:s + cfg.batch_size]],), rows[s:s + cfg.batch_size])
                    for s in range(0, rows.size, cfg.batch_size)]
        order = rows[np.argsort(ds.prompt_len[rows], kind="stable")]
        out = []
        for s in tqdm(range(0, order.size, cfg.batch_size), desc="prompt-only: frozen pass",
                      disable=not progress, leave=False):
            chunk = order[s:s + cfg.batch_size]
            tokens, lengths = _pad_batch([ds.prompt_ids[i] for i in chunk], cfg.batch_size)
            h = np.asarray(_frozen_pass(frozen, tokens, lengths, holder), np.float16)
            out.append(((h, lengths), chunk))
        return out

    def forward(params, inputs):
        if cfg.trainable_blocks == 0:
            return inputs[0].astype(jnp.float32) @ params["w"] + params["b"]
        h, lengths = inputs
        return _classify(params, h.astype(jnp.float32), lengths, holder, frozen)

    train_b, val_b = batches(train_rows), batches(val_rows)
    groups = {k: "classifier" if k in ("w", "b") else "backbone" for k in trainable}
    tx = optax.multi_transform(
        {"backbone": optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay),
         "classifier": optax.adamw(cfg.classifier_learning_rate,
                                   weight_decay=cfg.weight_decay)}, groups)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(params, opt_state, inputs, y, valid):
        def loss_fn(p):
            ce = optax.softmax_cross_entropy_with_integer_labels(forward(p, inputs), y)
            return (ce * valid).sum() / valid.sum()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    forward_jit = jax.jit(forward)

    def val_mae(params) -> float:
        errs = []
        for inputs, chunk in val_b:
            logits = np.asarray(forward_jit(params, inputs))[: chunk.size]
            errs.append(np.abs(bucket_values[logits.argmax(-1)] - totals[chunk]))
        return float(np.concatenate(errs).mean())

    rng = np.random.default_rng(cfg.seed)
    best, best_epoch, history = math.inf, -1, []
    bar = tqdm(range(cfg.epochs), desc="prompt-only: train", unit="epoch", disable=not progress)
    for epoch in bar:
        losses = []
        for i in rng.permutation(len(train_b)):
            inputs, chunk = train_b[i]
            if cfg.trainable_blocks == 0 and chunk.size < cfg.batch_size:  # one shape only
                pad = cfg.batch_size - chunk.size
                inputs = (np.pad(inputs[0], ((0, pad), (0, 0))),)
            y = np.zeros(cfg.batch_size, np.int32)
            y[: chunk.size] = labels[chunk]
            valid = (np.arange(cfg.batch_size) < chunk.size).astype(np.float32)
            trainable, opt_state, loss = step(trainable, opt_state, inputs, y, valid)
            losses.append(loss)
        mae = val_mae(trainable)
        history.append({"epoch": epoch, "loss": float(np.mean(jax.device_get(losses))),
                        "val_mae_total_at_t0": mae})
        bar.set_postfix(val_mae=f"{mae:.1f}")
        if mae < best:
            best, best_epoch = mae, epoch
            predictor.trainable = trainable
            predictor.save(Path(out_dir) / "best", {"epoch": epoch, "history": history})
        if epoch - best_epoch >= cfg.patience:
            break
    return {"best_epoch": best_epoch, "best_val_mae_total_at_t0": best,
            "params": predictor.num_params, "fine_tuned": predictor.fine_tuned_description,
            "checkpoint": str(Path(out_dir) / "best")}
