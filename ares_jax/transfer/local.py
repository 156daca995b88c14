"""Handoff within a process: a request's pages to another mesh with ``jax.device_put``."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding

from ares_jax.transfer.errors import TransferError


def handoff(k: jax.Array, v: jax.Array, target: NamedSharding) -> tuple[jax.Array, jax.Array]:
    """Copy one request's page block ([L, n, S, KVH, K] each) onto ``target``'s devices.

    Only the request's pages travel, never the pool. The copy is asynchronous; the caller's
    subsequent jitted write consumes it without a host round trip.
    """
    if k.shape != v.shape:
        raise TransferError(f"K and V page blocks differ in shape: {k.shape} vs {v.shape}")
    try:
        return jax.device_put((k, v), target)
    except (ValueError, RuntimeError) as err:
        raise TransferError(f"device_put of a {k.shape} page block to {target} failed: {err}") \
            from err
