"""Learned remaining-length heads (Flax NNX), all behind one ``predict`` interface.

``predict(hidden, hidden_tap, t, max_tokens) -> remaining`` takes the final layer's and the tap
layer's hidden states [B, D], tokens generated so far ``t`` [B] and the request's ``max_tokens``
[B], and returns a float [B] clipped to ``[0, max_tokens - t]``. The same method runs in the
trainer, the evaluator, standalone inference and (through ``serving.fused_head_fn``) inside the
engine's jitted decode step, so every path computes the same numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ares_jax.predictor.config import HeadConfig

# Token-space L1 regression predicts ``raw * L1_OUTPUT_SCALE`` so that unit-scale outputs reach
# the few-hundred-token range without huge final-layer weights.
L1_OUTPUT_SCALE = 100.0
NUM_EXTRA_FEATURES = 3
KINDS = ("ares", "trail")
LAYERS = ("last", "tap", "both")
LOSSES = ("l1", "log_l1", "budget_l1")


class InputStat(nnx.Variable):
    """Input standardisation statistics: saved with the head, never trained."""


class BinValues(nnx.Variable):
    """The TRAIL head's representative remaining length per bin, as a fraction of max_tokens
    (the training median of the bin)."""


def remaining_budget(t: jax.Array, max_tokens: jax.Array) -> jax.Array:
    return jnp.maximum(max_tokens.astype(jnp.float32) - t.astype(jnp.float32), 0.0)


def clip_remaining(pred: jax.Array, t: jax.Array, max_tokens: jax.Array) -> jax.Array:
    return jnp.clip(pred, 0.0, remaining_budget(t, max_tokens))


def select_input(layer: str, hidden, hidden_tap):
    """The head's input layer(s): "last", "tap", or "both" (concatenated). Works on numpy
    arrays (for input statistics) and jax arrays alike."""
    if layer == "last":
        return hidden
    if layer == "tap":
        return hidden_tap
    xp = jnp if isinstance(hidden, jax.Array) else np
    return xp.concatenate([hidden, hidden_tap], axis=-1)


def known_features(t: jax.Array, max_tokens: jax.Array) -> jax.Array:
    """What the engine knows exactly, scaled to O(1): log(1 + t), log(1 + max_tokens), t / max."""
    t = t.astype(jnp.float32)
    m = jnp.maximum(max_tokens.astype(jnp.float32), 1.0)
    return jnp.stack([jnp.log1p(t) / 8.0, jnp.log1p(m) / 8.0, t / m], axis=-1)


class LengthHead(nnx.Module):
    """An MLP on one layer's hidden state plus the known features.

    ``kind="ares"`` regresses the remaining length: L1 in tokens (``l1``), L1 in log space
    (``log_l1``), or L1 in tokens on a prediction parametrised as a fraction of the remaining
    budget, ``sigmoid(raw) * (max_tokens - t)`` (``budget_l1``): a repetition loop that will run
    to the cap is then one saturated output rather than an exact regression target;
    ``kind="trail"`` classifies it into ``num_bins`` equal bins over ``[0, max_tokens]`` and its
    point estimate is the probability-weighted bin value (the evaluator adds TRAIL's Bayesian
    refinement across refreshes).
    """

    def __init__(self, cfg: HeadConfig, hidden_size: int, *, rngs: nnx.Rngs) -> None:
        if cfg.kind not in KINDS or cfg.layer not in LAYERS or cfg.loss not in LOSSES:
            raise ValueError(f"HeadConfig: kind must be one of {KINDS}, layer one of {LAYERS}, "
                             f"loss one of {LOSSES}; got {cfg.kind!r}, {cfg.layer!r}, "
                             f"{cfg.loss!r}")
        self.cfg = cfg
        self.hidden_size = hidden_size
        width = hidden_size * (2 if cfg.layer == "both" else 1)
        self.in_mean = InputStat(jnp.zeros(width, jnp.float32))
        self.in_scale = InputStat(jnp.ones(width, jnp.float32))
        sizes = [width + NUM_EXTRA_FEATURES, *cfg.hidden_sizes]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
        self.dropout = nnx.Dropout(cfg.dropout)
        n_out = cfg.num_bins if cfg.kind == "trail" else 1
        self.out = nnx.Linear(sizes[-1], n_out, rngs=rngs)
        self.bin_values = BinValues(jnp.zeros(cfg.num_bins if cfg.kind == "trail" else 1,
                                              jnp.float32))

    def __call__(self, hidden: jax.Array, hidden_tap: jax.Array, t: jax.Array,
                 max_tokens: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Raw outputs: [B] regression value (head space) or [B, bins] logits. Dropout is on
        only when ``rngs`` is given (training)."""
        x = select_input(self.cfg.layer, hidden.astype(jnp.float32),
                         hidden_tap.astype(jnp.float32))
        x = (x - self.in_mean.get_value()) * self.in_scale.get_value()
        x = jnp.concatenate([x, known_features(t, max_tokens)], axis=-1)
        for layer in self.layers:
            x = nnx.gelu(layer(x))
            x = self.dropout(x, deterministic=rngs is None, rngs=rngs)
        y = self.out(x)
        return y if self.cfg.kind == "trail" else y[..., 0]

    def to_tokens(self, raw: jax.Array, t: jax.Array, max_tokens: jax.Array) -> jax.Array:
        """Regression output (head space) -> tokens, before clipping."""
        if self.cfg.loss == "log_l1":
            return jnp.expm1(jnp.clip(raw, 0.0, 20.0))
        if self.cfg.loss == "budget_l1":
            return jax.nn.sigmoid(raw) * remaining_budget(t, max_tokens)
        return raw * L1_OUTPUT_SCALE

    def predict(self, hidden: jax.Array, hidden_tap: jax.Array, t: jax.Array,
                max_tokens: jax.Array) -> jax.Array:
        raw = self(hidden, hidden_tap, t, max_tokens)
        if self.cfg.kind == "trail":
            pred = (jax.nn.softmax(raw, axis=-1) @ self.bin_values.get_value()) \
                * max_tokens.astype(jnp.float32)
        else:
            pred = self.to_tokens(raw, t, max_tokens)
        return clip_remaining(pred, t, max_tokens)

    def bin_probs(self, hidden: jax.Array, hidden_tap: jax.Array, t: jax.Array,
                  max_tokens: jax.Array) -> jax.Array:
        return jax.nn.softmax(self(hidden, hidden_tap, t, max_tokens), axis=-1)


def remaining_bins(remaining: jax.Array, max_tokens: jax.Array, num_bins: int) -> jax.Array:
    """TRAIL's label: equal-width bins of the remaining length over [0, max_tokens]."""
    width = jnp.maximum(max_tokens.astype(jnp.float32), 1.0) / num_bins
    return jnp.clip((remaining / width).astype(jnp.int32), 0, num_bins - 1)


def count_params(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
