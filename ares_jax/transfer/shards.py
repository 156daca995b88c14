"""Shard bookkeeping shared by the transports: which shards travel, and how the receiver puts
the block back together.

A KV block on a mesh whose ``model`` axis does not divide the KV heads is *replicated*; sending
every replica would move the same bytes once per device. So the source sends each distinct
shard once, as a single-device array (no copy: ``shard.data`` is the device buffer), and the
receiver rebuilds the source's layout on its own devices, duplicating shards locally.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ares_jax.transfer.errors import TransferError, TransferShapeMismatch
from ares_jax.transfer.kv_transport import KvTicket, ShardIndex


def spec_entries(spec: PartitionSpec) -> tuple[str | None, ...]:
    out = []
    for entry in spec:
        if entry is not None and not isinstance(entry, str):
            raise TransferError(f"multi-axis partition entries are not supported: {spec}")
        out.append(entry)
    return tuple(out)


def shard_index(index: tuple[slice, ...], shape: Sequence[int]) -> ShardIndex:
    """A ``devices_indices_map`` entry as plain (start, stop) pairs (JSON-friendly)."""
    out = []
    for sl, dim in zip(index, shape):
        start = 0 if sl.start is None else int(sl.start)
        stop = int(dim) if sl.stop is None else int(sl.stop)
        out.append((start, stop))
    return tuple(out)


def distinct_shards(x: jax.Array) -> tuple[list[jax.Array], tuple[ShardIndex, ...]]:
    """One single-device array per distinct shard of ``x``, in mesh order, and their indices."""
    sharding = x.sharding
    assert isinstance(sharding, NamedSharding)
    # Each addressable buffer as its own single-device array (no copy), keyed by its device.
    pieces = [x.addressable_data(i) for i in range(len(x.sharding.addressable_devices))]
    by_device = {next(iter(p.devices())): p for p in pieces}
    indices = sharding.devices_indices_map(x.shape)
    seen: dict[ShardIndex, jax.Array] = {}
    for device in sharding.mesh.devices.flat:
        idx = shard_index(indices[device], x.shape)
        if idx not in seen:
            if device not in by_device:
                raise TransferError(f"shard {idx} of the offered block lives on {device}, which "
                                    "this process cannot address")
            seen[idx] = by_device[device]
    return list(seen.values()), tuple(seen)


def as_source_sharding(ticket: KvTicket, devices: Sequence[jax.Device]) -> NamedSharding:
    """The source's sharding re-created on this process's first devices."""
    n = int(np.prod(ticket.mesh_shape))
    if n > len(devices):
        raise TransferShapeMismatch(f"the source block is sharded over {n} devices; this "
                                    f"process has {len(devices)}")
    mesh = Mesh(np.array(list(devices)[:n]).reshape(ticket.mesh_shape), ticket.mesh_axes)
    return NamedSharding(mesh, PartitionSpec(*ticket.spec))


def direct_layout(ticket: KvTicket, target: NamedSharding | None) -> NamedSharding | None:
    """``target`` itself when every shard of the ticket is a shard of ``target`` too: the
    shards then land on the target's own devices and only duplicates are copied locally."""
    if target is None:
        return None
    try:
        indices = {shard_index(index, ticket.shape)
                   for index in target.devices_indices_map(ticket.shape).values()}
    except (ValueError, TypeError):
        return None
    return target if set(ticket.shards) <= indices else None


def landing_devices(ticket: KvTicket, layout: NamedSharding) -> list[jax.Device]:
    """For each distinct shard of the ticket, the local device it is pulled onto."""
    first: dict[ShardIndex, jax.Device] = {}
    for device, index in layout.devices_indices_map(ticket.shape).items():
        first.setdefault(shard_index(index, ticket.shape), device)
    try:
        return [first[idx] for idx in ticket.shards]
    except KeyError as err:
        raise TransferShapeMismatch(f"the ticket's shards {ticket.shards} do not match its own "
                                    f"sharding {ticket.spec} on {ticket.mesh_shape}") from err


def assemble(ticket: KvTicket, pieces: Sequence[jax.Array], layout: NamedSharding,
             target: NamedSharding | None) -> jax.Array:
    """One of K/V from its distinct shards (pulled onto ``landing_devices(ticket, layout)``),
    on ``target`` (default: ``layout``).

    Each device of ``layout`` gets its shard: the pulled piece itself where it landed there,
    a local copy elsewhere (a replica). Only when ``layout`` is not ``target`` does the whole
    block move once more, with ``device_put``.
    """
    by_index = dict(zip(ticket.shards, pieces))
    arrays = []
    for device, index in layout.devices_indices_map(ticket.shape).items():
        piece = by_index[shard_index(index, ticket.shape)]
        arrays.append(piece if piece.devices() == {device} else jax.device_put(piece, device))
    whole = jax.make_array_from_single_device_arrays(ticket.shape, layout, arrays)
    if target is not None and target != layout:
        whole = jax.device_put(whole, target)
    return whole


def block_ticket(*, uuid: int, address: str, kind: str, k: jax.Array, sharding: NamedSharding,
                 shards: Sequence[ShardIndex], ttl_s: float, chunk_bytes: int = 0) -> KvTicket:
    """The ticket of an offered block ``k`` (and its ``v`` twin) laid out by ``sharding``."""
    mesh = sharding.mesh
    return KvTicket(uuid=uuid, address=address, kind=kind, shape=tuple(k.shape),
                    dtype=str(k.dtype), mesh_shape=tuple(mesh.devices.shape),
                    mesh_axes=tuple(mesh.axis_names), spec=spec_entries(sharding.spec),
                    shards=tuple(shards), ttl_s=ttl_s, chunk_bytes=chunk_bytes)
