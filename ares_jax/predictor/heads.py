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


# Every parameter of a LengthHead has its ensemble-member axis here: kernels are [in, K, out] and
# biases [1, K, out], so that serving's shared input [B, in] meets the widest layer as one plain
# [B, in] @ [in, K * out] GEMM (a [K, in, out] kernel costs XLA:CPU a transposing copy of the
# weights on every call: 0.50 vs 0.29 ms for the shipped head's first layer at batch 32).
MEMBER_AXIS = 1


class StackedLinear(nnx.Module):
    """``members`` independent linear layers applied in one einsum: [B, in] (shared by the
    members) or [B, K, in] (one input each) -> [B, K, out]. Each member is initialised as
    ``nnx.Linear`` would be (LeCun normal over its own fan-in, zero bias)."""

    def __init__(self, members: int, d_in: int, d_out: int, *, rngs: nnx.Rngs) -> None:
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=2, batch_axis=(MEMBER_AXIS,))
        self.kernel = nnx.Param(init(rngs.params(), (d_in, members, d_out), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((1, members, d_out), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        spec = "bi,iko->bko" if x.ndim == 2 else "bki,iko->bko"
        return jnp.einsum(spec, x, self.kernel.get_value()) + self.bias.get_value()


class LengthHead(nnx.Module):
    """An MLP on one layer's hidden state plus the known features; ``cfg.members`` of them,
    trained together and averaged (a deep ensemble: the members differ only in initialisation
    and dropout masks, and averaging them removes part of each one's variance).

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
        if cfg.members < 1:
            raise ValueError(f"HeadConfig.members must be >= 1, got {cfg.members}")
        k = cfg.members
        sizes = [width + NUM_EXTRA_FEATURES, *cfg.hidden_sizes]
        self.layers = nnx.List([StackedLinear(k, a, b, rngs=rngs)
                                for a, b in zip(sizes, sizes[1:])])
        self.dropout = nnx.Dropout(cfg.dropout)
        n_out = cfg.num_bins if cfg.kind == "trail" else 1
        self.out = StackedLinear(k, sizes[-1], n_out, rngs=rngs)
        self.bin_values = BinValues(jnp.zeros(cfg.num_bins if cfg.kind == "trail" else 1,
                                              jnp.float32))

    def __call__(self, hidden: jax.Array, hidden_tap: jax.Array, t: jax.Array,
                 max_tokens: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Raw outputs per member: [B, K] regression values (head space) or [B, K, bins]
        logits. Inputs are shared by the members ([B, ...]) or one batch each ([B, K, ...], in
        training). Dropout is on only when ``rngs`` is given (training)."""
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

    def member_predictions(self, hidden: jax.Array, hidden_tap: jax.Array, t: jax.Array,
                           max_tokens: jax.Array) -> jax.Array:
        """[B, K] each member's clipped remaining-length estimate."""
        raw = self(hidden, hidden_tap, t, max_tokens)
        if t.ndim == 1:  # shared by the members
            t, max_tokens = t[:, None], max_tokens[:, None]
        if self.cfg.kind == "trail":
            pred = (jax.nn.softmax(raw, axis=-1) @ self.bin_values.get_value()) \
                * max_tokens.astype(jnp.float32)
        else:
            pred = self.to_tokens(raw, t, max_tokens)
        return clip_remaining(pred, t, max_tokens)

    def predict(self, hidden: jax.Array, hidden_tap: jax.Array, t: jax.Array,
                max_tokens: jax.Array) -> jax.Array:
        """[B] the members' mean estimate (within the clip range, as every member is)."""
        return self.member_predictions(hidden, hidden_tap, t, max_tokens).mean(axis=1)

    def bin_probs(self, hidden: jax.Array, hidden_tap: jax.Array, t: jax.Array,
                  max_tokens: jax.Array) -> jax.Array:
        """[B, bins] the members' mean bin probabilities (TRAIL)."""
        return jax.nn.softmax(self(hidden, hidden_tap, t, max_tokens), axis=-1).mean(axis=1)


def remaining_bins(remaining: jax.Array, max_tokens: jax.Array, num_bins: int) -> jax.Array:
    """TRAIL's label: equal-width bins of the remaining length over [0, max_tokens]."""
    width = jnp.maximum(max_tokens.astype(jnp.float32), 1.0) / num_bins
    return jnp.clip((remaining / width).astype(jnp.int32), 0, num_bins - 1)


def count_params(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
