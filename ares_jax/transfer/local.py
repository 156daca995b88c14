"""Handoff within a process: a request's pages to another mesh with ``jax.device_put``.

Within a multi-controller group (``ares_jax/serving/multihost.py``) the two meshes span the
same processes, and JAX's CPU and GPU runtimes refuse a cross-host ``device_put`` between
different device sets ("input and target sharding should have the same set of devices"; only
TPU has experimental support). There every process copies the shards it holds onto its own
devices of the target (``per_process_copy``): nothing crosses hosts, because the meshes of a
group are laid out alike (mesh i takes the same local devices of every process).
"""

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
    if not (k.is_fully_addressable and target.is_fully_addressable) and \
            k.sharding.device_set != target.device_set:
        return per_process_copy(k, target), per_process_copy(v, target)
    try:
        return jax.device_put((k, v), target)
    except (ValueError, RuntimeError) as err:
        raise TransferError(f"device_put of a {k.shape} page block to {target} failed: {err}") \
            from err


def _key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def per_process_copy(x: jax.Array, target: NamedSharding) -> jax.Array:
    """``x`` on ``target``, each process copying only between its own devices.

    Every process of the group must call it (it assembles one global array). Raises
    ``TransferError`` when a slice this process must hold on ``target`` is held by another
    process on ``x``'s sharding: that would need a cross-host copy, which the runtime lacks.
    """
    held = {}
    for shard in x.addressable_shards:
        held.setdefault(_key(shard.index, x.shape), shard.data)
    pieces = []
    for device, index in target.addressable_devices_indices_map(x.shape).items():
        data = held.get(_key(index, x.shape))
        if data is None:
            raise TransferError(
                f"a {x.shape} page block on {x.sharding} cannot move to {target} within a "
                f"multi-controller group: slice {index} for {device} lives in another process "
                "(the two meshes are not laid out alike over the group's processes)")
        pieces.append(jax.device_put(data, device))
    return jax.make_array_from_single_device_arrays(x.shape, target, pieces)
