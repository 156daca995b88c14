"""A Llama-family decoder as plain functions over a weights pytree.

Covers Llama 2/3 (incl. Llama-3 rope scaling), Mistral, Qwen2 (QKV bias) and SmolLM2 (tied
embeddings). Layers are stacked on a leading axis and run with ``lax.scan`` so that a 30-layer
model compiles as one layer.

Two entry points serve the engine:
- ``prefill``: a padded batch of prompts -> last-token logits, hidden-state taps, and every
  layer's K/V for the prompt (the engine writes them into pages).
- ``decode_step``: one new token per sequence against a paged KV pool -> logits, taps, and the
  new token's K/V for every layer (the engine scatters it into the pool, donated).

``forward`` gives full-sequence logits, for parity tests against a reference.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax.config import config
from ares_jax.kernels import matmul, paged_attention


@config
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@config
class Config:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_seq_len: int = 4096
    # "float32" | "bfloat16"; None picks bf16 on GPU/TPU and f32 on CPU.
    dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "llama"

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype or default_dtype())

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.jnp_dtype.itemsize

    @property
    def default_tap_layer(self) -> int:
        return max(1, self.n_layers // 2)


def default_dtype() -> str:
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerWeights:
    """Per-layer weights stacked on a leading ``layers`` axis."""

    attn_norm: jax.Array  # [L, D]
    wq: jax.Array  # [L, D, H, K]
    wk: jax.Array  # [L, D, KVH, K]
    wv: jax.Array  # [L, D, KVH, K]
    wo: jax.Array  # [L, H, K, D]
    bq: jax.Array | None  # [L, H, K]
    bk: jax.Array | None  # [L, KVH, K]
    bv: jax.Array | None  # [L, KVH, K]
    mlp_norm: jax.Array  # [L, D]
    w_gate: jax.Array  # [L, D, F]
    w_up: jax.Array  # [L, D, F]
    w_down: jax.Array  # [L, F, D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Weights:
    embed: jax.Array  # [V, D]
    layers: LayerWeights
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None  # [D, V]; None when tied to embed


# Logical axis names per weight, mapped to mesh axes by ShardingRules.
LAYER_AXES = LayerWeights(
    attn_norm=("layers", "embed"),
    wq=("layers", "embed", "heads", "head_dim"),
    wk=("layers", "embed", "kv_heads", "head_dim"),
    wv=("layers", "embed", "kv_heads", "head_dim"),
    wo=("layers", "heads", "head_dim", "embed"),
    bq=("layers", "heads", "head_dim"),
    bk=("layers", "kv_heads", "head_dim"),
    bv=("layers", "kv_heads", "head_dim"),
    mlp_norm=("layers", "embed"),
    w_gate=("layers", "embed", "ffn"),
    w_up=("layers", "embed", "ffn"),
    w_down=("layers", "ffn", "embed"),
)


def weight_axes(cfg: Config) -> Weights:
    """The logical axes of every weight, as a pytree shaped like ``Weights``."""
    layers = LAYER_AXES
    if not cfg.qkv_bias:
        layers = dataclasses.replace(layers, bq=None, bk=None, bv=None)
    return Weights(
        embed=("vocab", "embed"),
        layers=layers,
        final_norm=("embed",),
        lm_head=None if cfg.tie_embeddings else ("embed", "vocab"),
    )


def weight_shapes(cfg: Config) -> Weights:
    L, D, H, KVH, K, F, V = (
        cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim,
        cfg.vocab_size,
    )
    bias = cfg.qkv_bias
    return Weights(
        embed=(V, D),
        layers=LayerWeights(
            attn_norm=(L, D), wq=(L, D, H, K), wk=(L, D, KVH, K), wv=(L, D, KVH, K),
            wo=(L, H, K, D), bq=(L, H, K) if bias else None, bk=(L, KVH, K) if bias else None,
            bv=(L, KVH, K) if bias else None, mlp_norm=(L, D), w_gate=(L, D, F), w_up=(L, D, F),
            w_down=(L, F, D),
        ),
        final_norm=(D,),
        lm_head=None if cfg.tie_embeddings else (D, V),
    )


def is_shape_leaf(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int | str) for d in x)


def init_random_weights(cfg: Config, key: jax.Array | int, scale: float = 0.02) -> Weights:
    """Random weights (tests, benchmarks), drawn on the host with numpy: one eager JAX op per
    weight would compile once per shape. Norm scales start at 1."""
    seed = int(key) if isinstance(key, int) else int(jax.random.randint(key, (), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    shapes = weight_shapes(cfg)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.ones(shape, cfg.jnp_dtype)
        return jnp.asarray(scale * rng.standard_normal(shape, np.float32), cfg.jnp_dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=is_shape_leaf)


def check_tap_layer(cfg: Config, tap_layer: int | None) -> int:
    tap = cfg.default_tap_layer if tap_layer is None else tap_layer
    if not 1 <= tap <= cfg.n_layers:
        raise ValueError(f"tap_layer must be in [1, {cfg.n_layers}] (the output of that block), "
                         f"got {tap}")
    return tap


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: Config) -> jax.Array:
    exponents = jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim
    inv = 1.0 / (cfg.rope_theta**exponents)
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    mid = (1 - smooth) * inv / s.factor + smooth * inv
    scaled = jnp.where(wavelen < high_wavelen, inv, mid)
    return jnp.where(wavelen > low_wavelen, inv / s.factor, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [..., T, heads, K], positions: [..., T]. HF "rotate_half" convention."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [..., T, K/2]
    cos = jnp.cos(angles)[..., None, :]
    sin = jnp.sin(angles)[..., None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# (weight name, x [..., Din]) -> x @ that layer weight, flattened to [..., Dout]: lets the CPU
# decode path swap in its own matmul kernel.
Project = Callable[[str, jax.Array], jax.Array]


def _qkv(lw: LayerWeights, x: jax.Array, positions: jax.Array, cfg: Config, inv_freq: jax.Array,
         project: Project | None = None):
    if project is None:
        q = jnp.einsum("btd,dhk->bthk", x, lw.wq)
        k = jnp.einsum("btd,dhk->bthk", x, lw.wk)
        v = jnp.einsum("btd,dhk->bthk", x, lw.wv)
    else:
        lead = x.shape[:-1]
        q = project("wq", x).reshape(*lead, cfg.n_heads, cfg.head_dim)
        k = project("wk", x).reshape(*lead, cfg.n_kv_heads, cfg.head_dim)
        v = project("wv", x).reshape(*lead, cfg.n_kv_heads, cfg.head_dim)
    if lw.bq is not None:
        q, k, v = q + lw.bq, k + lw.bk, v + lw.bv
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def _mlp(lw: LayerWeights, x: jax.Array, project: Project | None = None) -> jax.Array:
    if project is not None:
        return project("w_down", jax.nn.silu(project("w_gate", x)) * project("w_up", x))
    gate = jnp.einsum("btd,df->btf", x, lw.w_gate)
    up = jnp.einsum("btd,df->btf", x, lw.w_up)
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, lw.w_down)


def _grouped(q: jax.Array, n_kv_heads: int) -> jax.Array:
    """[B, T, H, K] -> [B, T, KVH, G, K] so that GQA never materialises repeated K/V."""
    b, t, h, k = q.shape
    return q.reshape(b, t, n_kv_heads, h // n_kv_heads, k)


def _logits(w: Weights, h: jax.Array) -> jax.Array:
    head = w.embed.T if w.lm_head is None else w.lm_head
    return jnp.einsum("...d,dv->...v", h, head, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- prefill / forward


def prefill(
    w: Weights, cfg: Config, tokens: jax.Array, lengths: jax.Array, tap_layer: int | None = None
) -> dict[str, jax.Array]:
    """Causal pass over right-padded prompts.

    tokens: [B, T] int32, lengths: [B] (valid tokens per row, >= 1).
    Returns ``logits`` [B, V] (f32, at each row's last prompt token), ``hidden`` [B, D] (final
    layer, after the final norm, at that token), ``hidden_tap`` [B, D] (output of block
    ``tap_layer``), ``k``/``v`` [L, B, T, KVH, K] and ``all_logits`` is not computed.
    """
    tap = check_tap_layer(cfg, tap_layer)
    h, k, v, taps = _stack(w, cfg, tokens, lengths)
    last = (lengths - 1).astype(jnp.int32)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    hidden = rms_norm(h_last, w.final_norm, cfg.rms_eps)
    return {
        "logits": _logits(w, hidden),
        "hidden": hidden,
        "hidden_tap": taps[tap - 1],
        "k": k,
        "v": v,
    }


def forward(w: Weights, cfg: Config, tokens: jax.Array) -> jax.Array:
    """Full-sequence logits [B, T, V] for unpadded ``tokens`` [B, T] (reference / tests)."""
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    h, _, _, _ = _stack(w, cfg, tokens, lengths)
    return _logits(w, rms_norm(h, w.final_norm, cfg.rms_eps))


def _stack(w: Weights, cfg: Config, tokens: jax.Array, lengths: jax.Array):
    b, t = tokens.shape
    inv_freq = rope_inv_freq(cfg)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    causal = jnp.tril(jnp.ones((t, t), bool))
    valid = positions < lengths[:, None]  # [B, T]
    mask = causal[None] & valid[:, None, :]  # [B, Tq, Tk]
    last = (lengths - 1).astype(jnp.int32)
    scale = 1.0 / math.sqrt(cfg.head_dim)

    def layer(h, lw: LayerWeights):
        x = rms_norm(h, lw.attn_norm, cfg.rms_eps)
        q, k, v = _qkv(lw, x, positions, cfg, inv_freq)
        qg = _grouped(q, cfg.n_kv_heads)
        s = jnp.einsum("bqhgk,bshk->bhgqs", qg, k, preferred_element_type=jnp.float32) * scale
        s = jnp.where(mask[:, None, None], s, -1e30)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        o = jnp.einsum("bhgqs,bshk->bqhgk", p, v).reshape(b, t, cfg.n_heads, cfg.head_dim)
        h = h + jnp.einsum("bthk,hkd->btd", o, lw.wo)
        h = h + _mlp(lw, rms_norm(h, lw.mlp_norm, cfg.rms_eps))
        tap = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        return h, (k, v, tap)

    h0 = w.embed[tokens].astype(cfg.jnp_dtype)
    h, (k, v, taps) = jax.lax.scan(layer, h0, w.layers)
    return h, k, v, taps


# ----------------------------------------------------------------------------- paged decode


BACKENDS = ("xla", "cpu_kernel")
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def pack_for_cpu_kernels(w: Weights) -> dict[str, jax.Array]:
    """The layer projections the CPU matmul kernel takes, packed into its strip layout (a copy
    of those weights: made once per model, passed to every ``decode_step``)."""
    flat = {name: _flat_stack(name, getattr(w.layers, name)) for name in PROJECTIONS}
    # The lm_head as one more [1, D, V] "layer" (for a tied embedding, its transpose).
    flat["lm_head"] = (w.embed.T if w.lm_head is None else w.lm_head)[None]
    return {name: matmul.pack(x) for name, x in flat.items() if matmul.supports(x)}


def _flat_stack(name: str, w: jax.Array) -> jax.Array:
    """A stacked projection as [L, Din, Dout]: [L, D, H, K] -> [L, D, H*K] and wo [L, H, K, D]
    -> [L, H*K, D] (contiguous reshapes, no copies)."""
    if name == "wo":
        return w.reshape(w.shape[0], -1, w.shape[-1])
    return w.reshape(w.shape[0], w.shape[1], -1)


def paged_attention_xla(
    qg: jax.Array,
    k_self: jax.Array,
    v_self: jax.Array,
    kp: jax.Array,
    vp: jax.Array,
    page_table: jax.Array,
    positions: jax.Array,
    scale: float,
) -> jax.Array:
    """Decode attention for one layer: gather the pages, then two batched matmuls.

    qg: [B, KVH, G, K]; k_self/v_self: [B, KVH, K]; kp/vp: this layer's pool [P, S, KVH, K];
    page_table: [B, W]; positions: [B] cached tokens. Returns [B, KVH, G, K].
    """
    b, width = page_table.shape
    ctx = width * kp.shape[1]
    cached = jnp.arange(ctx, dtype=jnp.int32)[None, :] < positions[:, None]  # [B, C]
    kc = kp[page_table].reshape(b, ctx, *kp.shape[2:])
    vc = vp[page_table].reshape(b, ctx, *vp.shape[2:])
    s_cache = jnp.einsum("bhgk,bchk->bhgc", qg, kc, preferred_element_type=jnp.float32)
    s_self = jnp.einsum("bhgk,bhk->bhg", qg, k_self, preferred_element_type=jnp.float32)
    s_cache = jnp.where(cached[:, None, None], s_cache * scale, -1e30)
    s = jnp.concatenate([s_cache, (s_self * scale)[..., None]], axis=-1)
    p = jax.nn.softmax(s, axis=-1).astype(vc.dtype)
    return jnp.einsum("bhgc,bchk->bhgk", p[..., :-1], vc) + p[..., -1:] * v_self[:, :, None]


def decode_step(
    w: Weights,
    cfg: Config,
    k_pages: jax.Array,
    v_pages: jax.Array,
    tokens: jax.Array,
    positions: jax.Array,
    page_table: jax.Array,
    tap_layer: int | None = None,
    backend: str = "xla",
    packed: dict[str, jax.Array] | None = None,
) -> dict[str, jax.Array]:
    """One token per sequence against a paged KV pool (read-only here).

    k_pages/v_pages: [L, P, S, KVH, K]; tokens, positions: [B] (position = tokens already
    cached for that sequence); page_table: [B, W] page ids (unused slots may hold any valid id).
    The new token attends to its cached prefix plus itself. Returns ``logits`` [B, V],
    ``hidden`` [B, D], ``hidden_tap`` [B, D] and the new token's ``k``/``v`` [L, B, KVH, K],
    which the caller scatters into the pool at (page_table[b, pos // S], pos % S).
    ``backend``: "xla" (any platform) or "cpu_kernel" (XLA:CPU, float32, one device): the
    attention reads the pages in place (``ares_jax.kernels.paged_attention``), and the layer
    projections and lm_head found in ``packed`` (``pack_for_cpu_kernels(w)``, made once) run as
    small-batch matmul kernels (``ares_jax.kernels.matmul``); the others keep XLA's dot.
    """
    tap = check_tap_layer(cfg, tap_layer)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    b = tokens.shape[0]
    inv_freq = rope_inv_freq(cfg)
    scale = 1.0 / math.sqrt(cfg.head_dim)

    packed = packed if backend == "cpu_kernel" and packed else {}
    if backend == "cpu_kernel":
        # The kernels take whole stacked arrays plus a layer index: a custom call on one
        # scanned layer's slice would copy it.
        def attend(qg, k, v, li):
            return paged_attention.paged_attention(qg, k, v, k_pages, v_pages, li, page_table,
                                                   positions, scale=scale)

        stacked = {name: _flat_stack(name, getattr(w.layers, name)) for name in PROJECTIONS}

        def projector(li) -> Project:
            def project(name, x):
                if name not in packed:
                    return x @ stacked[name][li]
                flat = x.reshape(-1, x.shape[-1])
                return matmul.layer_matmul(flat, packed[name], li).reshape(*x.shape[:-1], -1)
            return project

        per_layer = (w.layers, jnp.arange(cfg.n_layers, dtype=jnp.int32))
    else:
        def attend(qg, k, v, layer_pages):
            return paged_attention_xla(qg, k, v, *layer_pages, page_table, positions, scale)

        def projector(layer_pages) -> Project | None:
            return None

        per_layer = (w.layers, (k_pages, v_pages))

    def layer(h, xs):
        lw, layer_extra = xs
        project = projector(layer_extra)
        x = rms_norm(h, lw.attn_norm, cfg.rms_eps)
        q, k, v = _qkv(lw, x, positions[:, None], cfg, inv_freq, project)  # [B, 1, heads, K]
        qg = _grouped(q, cfg.n_kv_heads)[:, 0]  # [B, KVH, G, K]
        o = attend(qg, k[:, 0], v[:, 0], layer_extra)
        if project is None:
            h = h + jnp.einsum("bthk,hkd->btd", o.reshape(b, 1, cfg.n_heads, cfg.head_dim),
                               lw.wo)
        else:
            h = h + project("wo", o.reshape(b, 1, cfg.n_heads * cfg.head_dim))
        h = h + _mlp(lw, rms_norm(h, lw.mlp_norm, cfg.rms_eps), project)
        return h, (k[:, 0], v[:, 0], h[:, 0])

    h0 = w.embed[tokens][:, None].astype(cfg.jnp_dtype)
    h, (k_new, v_new, taps) = jax.lax.scan(layer, h0, per_layer)
    hidden = rms_norm(h[:, 0], w.final_norm, cfg.rms_eps)
    if "lm_head" in packed:
        logits = matmul.layer_matmul(hidden, packed["lm_head"], jnp.int32(0))
    else:
        logits = _logits(w, hidden)
    return {
        "logits": logits,
        "hidden": hidden,
        "hidden_tap": taps[tap - 1],
        "k": k_new,
        "v": v_new,
    }
