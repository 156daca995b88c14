"""Paged-attention decode for XLA:CPU (``paged_attention_cpu.cc``), through the XLA FFI.

XLA:CPU runs decode attention as a gather of every sequence's pages into a fresh, transposed
``[B, ctx, KVH, K]`` block followed by two small batched matmuls, which moves each cached K/V
row three times. The kernel reads each row once, in place, and splits the work over XLA's
intra-op thread pool. GPU and TPU keep the XLA formulation in ``model.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax.kernels.build import require

TARGET = "ares_paged_attention_cpu"


def paged_attention(
    q: jax.Array,
    k_self: jax.Array,
    v_self: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    layer: jax.Array,
    page_table: jax.Array,
    positions: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """Decode attention for one layer, reading K/V in place from the whole pool.

    q: [B, KVH, G, K] f32; k_self/v_self: [B, KVH, K] (the new token's own K/V);
    k_pool/v_pool: [L, P, S, KVH, K] f32; layer: int32 scalar; page_table: [B, W] int32;
    positions: [B] int32, the tokens already cached. Returns [B, KVH, G, K] f32: softmax over
    the first ``positions[b]`` cached tokens plus the token itself, as in ``model.decode_step``.
    """
    require()
    f32 = jnp.float32
    if any(x.dtype != f32 for x in (q, k_self, v_self, k_pool, v_pool)):
        raise TypeError("paged_attention (CPU kernel) supports float32 only")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, f32))
    return call(q, k_self, v_self, k_pool, v_pool, jnp.asarray(layer, jnp.int32),
                page_table.astype(jnp.int32), positions.astype(jnp.int32),
                scale=np.float32(scale))
