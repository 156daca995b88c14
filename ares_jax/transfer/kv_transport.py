"""The KV transport seam: how one replica hands a request's page block to another.

Flow (prefill -> decode handoff, or a staged decode -> decode migration)::

    source                                   receiver
    ------                                   --------
    ticket = t.offer(k, v, ttl_s=.., on_expire=free_pages)
    send ticket.to_bytes() over gRPC  ---->  ticket = KvTicket.from_bytes(..)
                                             k, v = t.pull(ticket, target=.., timeout_s=..,
                                                           shape=.., dtype=..)
    t.ack(uuid)  <----  gRPC "got it"  <---- (import k, v into the pool)
    owner frees its pages

An offer nobody acknowledges expires after ``ttl_s``: the transport drops it and calls the
owner's ``on_expire(uuid)`` so the owner frees its pages. ``release(uuid)`` drops an offer early
(the request was aborted). ``pending_offers()`` counts what is still offered, for leak tests.

Implementations: ``remote.JaxTransferTransport`` (across processes and hosts, over
``jax.experimental.transfer``) and ``local_transport.LocalTransport`` (one process,
``jax.device_put`` between meshes). See ``docs/KV_TRANSFER.md``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import jax
from jax.sharding import NamedSharding

from ares_jax.transfer.errors import TransferError, TransferShapeMismatch

#: A shard's position in the global block: (start, stop) per dimension.
ShardIndex = tuple[tuple[int, int], ...]

ExpiryCallback = Callable[[int], None]


@dataclasses.dataclass(frozen=True, kw_only=True)
class KvTicket:
    """What a receiver needs to pull one offered page block (K and V); small and serialisable.

    ``shards`` lists the *distinct* shards of the source's sharding in the order they travel
    (a replicated block travels once, not once per replica). ``mesh_shape``/``mesh_axes``/
    ``spec`` describe the source's logical sharding, which the receiver re-creates on its own
    devices when the caller names no target.
    """

    uuid: int
    address: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    mesh_shape: tuple[int, ...]
    mesh_axes: tuple[str, ...]
    spec: tuple[str | None, ...]
    shards: tuple[ShardIndex, ...]
    ttl_s: float
    chunk_bytes: int = 0  # the source's bulk chunk size; the receiver's must be at least this

    @property
    def nbytes(self) -> int:
        """Logical bytes of K plus V."""
        n = 1
        for d in self.shape:
            n *= d
        return 2 * n * jax.numpy.dtype(self.dtype).itemsize

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> KvTicket:
        d = json.loads(text)
        return KvTicket(
            uuid=int(d["uuid"]), address=d["address"], kind=d["kind"], shape=tuple(d["shape"]),
            dtype=d["dtype"], mesh_shape=tuple(d["mesh_shape"]), mesh_axes=tuple(d["mesh_axes"]),
            spec=tuple(d["spec"]),
            shards=tuple(tuple((int(a), int(b)) for a, b in s) for s in d["shards"]),
            ttl_s=float(d["ttl_s"]), chunk_bytes=int(d.get("chunk_bytes", 0)))

    def to_bytes(self) -> bytes:
        """For a protobuf ``bytes`` field (a few hundred bytes of UTF-8 JSON)."""
        return self.to_json().encode()

    @staticmethod
    def from_bytes(data: bytes) -> KvTicket:
        return KvTicket.from_json(data.decode())


@runtime_checkable
class KvTransport(Protocol):
    """Moves page blocks between replicas. One instance per process (per replica)."""

    @property
    def address(self) -> str:
        """Where peers reach this transport (``host:port``, or ``local:N`` in-process)."""
        ...

    def offer(self, k: jax.Array, v: jax.Array, *, ttl_s: float,
              on_expire: ExpiryCallback | None = None) -> KvTicket:
        """Make K/V (``[layers, n_pages, page_size, kv_heads, head_dim]`` each, one
        ``NamedSharding``) pullable until acknowledged, released, or ``ttl_s`` passes (then
        ``on_expire(uuid)`` fires, on the transport's expiry thread: an owner that is not
        thread-safe should hand the freeing to its own loop)."""
        ...

    def pull(self, ticket: KvTicket, *, target: NamedSharding | None = None,
             timeout_s: float = 30.0, shape: tuple[int, ...] | None = None,
             dtype: str | None = None) -> tuple[jax.Array, jax.Array]:
        """Fetch an offered block with the source's exact layout, then reshard onto ``target``.

        Raises ``TransferShapeMismatch`` (before any byte moves) when ``shape``/``dtype`` differ
        from the ticket, ``TransferTimeout`` past ``timeout_s``, ``TransferError`` otherwise.
        """
        ...

    def ack(self, ticket_or_uuid: KvTicket | int) -> bool:
        """The receiver has the block: drop the offer. False if it was no longer offered
        (expired or released), in which case the handoff must be treated as failed."""
        ...

    def release(self, uuid: int) -> bool:
        """Drop an offer without an acknowledgement (e.g. the request was aborted)."""
        ...

    def pending_offers(self) -> int:
        """Offers not yet acknowledged, released or expired."""
        ...

    def close(self) -> None:
        """Drop every offer (without callbacks) and stop background work."""
        ...


def uuid_of(ticket_or_uuid: KvTicket | int) -> int:
    return ticket_or_uuid.uuid if isinstance(ticket_or_uuid, KvTicket) else int(ticket_or_uuid)


def check_block(k: jax.Array, v: jax.Array) -> NamedSharding:
    """The offered pair's sharding; K and V must agree in shape, dtype and sharding."""
    sharding = k.sharding
    if not isinstance(sharding, NamedSharding) or v.sharding != sharding or \
            k.shape != v.shape or k.dtype != v.dtype:
        raise TransferError("offer needs K and V of one shape and dtype on one NamedSharding; "
                            f"got {k.shape}/{k.dtype}/{k.sharding} and "
                            f"{v.shape}/{v.dtype}/{v.sharding}")
    return sharding


def check_expected(ticket: KvTicket, shape: tuple[int, ...] | None, dtype: str | None) -> None:
    """Refuse a pull whose caller expects another block than the one offered."""
    if shape is not None and tuple(shape) != ticket.shape:
        raise TransferShapeMismatch(f"expected a page block of shape {tuple(shape)}, the "
                                    f"source offers {ticket.shape}")
    if dtype is not None and str(jax.numpy.dtype(dtype)) != ticket.dtype:
        raise TransferShapeMismatch(f"expected dtype {dtype}, the source offers {ticket.dtype}")
