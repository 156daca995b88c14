"""Small-batch layer matmuls for XLA:CPU decode steps (``matmul_cpu.cc``), through the XLA FFI.

At decode batch sizes (a few rows against a weight matrix) XLA:CPU's dots read the weights
slower than memory allows. The kernel streams each weight once per 8 rows with the
accumulators in registers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ares_jax.kernels.build import require

TARGET = "ares_layer_matmul_cpu"
LANES = 16  # the kernel's vector width: output columns must be a multiple of it


def supports(w_stacked: jax.Array) -> bool:
    """Whether ``layer_matmul`` takes this stacked weight (f32, [L, K, N], N % 16 == 0)."""
    return (w_stacked.ndim == 3 and w_stacked.dtype == jnp.float32
            and w_stacked.shape[2] % LANES == 0)


def layer_matmul(x: jax.Array, w_stacked: jax.Array, layer: jax.Array) -> jax.Array:
    """``x [M, K] @ w_stacked[layer] [K, N] -> [M, N]`` (f32), without slicing the layer out."""
    require()
    if not supports(w_stacked) or x.dtype != jnp.float32 or x.ndim != 2:
        raise TypeError(f"layer_matmul takes f32 x [M, K] and w [L, K, N] with N % {LANES} == "
                        f"0; got x {x.dtype}{list(x.shape)}, w {w_stacked.dtype}"
                        f"{list(w_stacked.shape)}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w_stacked.shape[2]),
                                                         jnp.float32))
    return call(x, w_stacked, jnp.asarray(layer, jnp.int32))
