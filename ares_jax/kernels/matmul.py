"""Small-batch layer matmuls for XLA:CPU decode steps (``matmul_cpu.cc``), through the XLA FFI.

At decode batch sizes (a few rows against a weight matrix) XLA:CPU's dots read the weights
slower than memory allows. The kernel streams each weight once per 8 rows with the
accumulators in registers, from a copy packed once into contiguous 64-column strips.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ares_jax.kernels.build import require

TARGET = "ares_layer_matmul_cpu"
STRIP = 64  # output columns per packed strip: N must be a multiple of it


def supports(w_stacked: jax.Array) -> bool:
    """Whether ``pack`` takes this stacked weight (f32, [L, K, N], N % 64 == 0)."""
    return (w_stacked.ndim == 3 and w_stacked.dtype == jnp.float32
            and w_stacked.shape[2] % STRIP == 0)


@jax.jit
def pack(w_stacked: jax.Array) -> jax.Array:
    """[L, K, N] -> [L, N / 64, K, 64]: each 64-column strip contiguous (a copy, made once)."""
    n_layers, k, n = w_stacked.shape
    return w_stacked.reshape(n_layers, k, n // STRIP, STRIP).transpose(0, 2, 1, 3)


def layer_matmul(x: jax.Array, w_packed: jax.Array, layer: jax.Array) -> jax.Array:
    """``x [M, K] @ w[layer] [K, N] -> [M, N]`` (f32) from ``pack(w)``, without slicing the
    layer out."""
    require()
    if (w_packed.ndim != 4 or w_packed.shape[3] != STRIP or w_packed.dtype != jnp.float32
            or x.dtype != jnp.float32 or x.ndim != 2 or x.shape[1] != w_packed.shape[2]):
        raise TypeError(f"layer_matmul takes f32 x [M, K] and a packed w [L, N/{STRIP}, K, "
                        f"{STRIP}]; got x {x.dtype}{list(x.shape)}, w {w_packed.dtype}"
                        f"{list(w_packed.shape)}")
    n = w_packed.shape[1] * STRIP
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return call(x, w_packed, jnp.asarray(layer, jnp.int32))
