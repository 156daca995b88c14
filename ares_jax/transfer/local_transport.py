"""``KvTransport`` within one process: meshes of one JAX client, ``jax.device_put`` between them.

The ticket's address (``local:N``) names a transport in this process's registry and its uuid an
offer in that transport's ``OfferBook``; nothing leaves the process, so ``to_bytes`` works but
only this process can redeem the ticket. Same lifecycle as the cross-process transport (ack,
release, expiry callback), so in-process clusters and tests exercise the real protocol.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref

import jax
from jax.sharding import NamedSharding

from ares_jax.transfer.errors import TransferError, TransferTimeout
from ares_jax.transfer.kv_transport import (
    ExpiryCallback,
    KvTicket,
    check_block,
    check_expected,
)
from ares_jax.transfer.offers import BookedOffers, Offer, OfferBook
from ares_jax.transfer.shards import shard_index, spec_entries

KIND = "local"

_registry: weakref.WeakValueDictionary[str, LocalTransport] = weakref.WeakValueDictionary()
_ids = itertools.count(1)
_lock = threading.Lock()


class LocalTransport(BookedOffers):
    """One per replica (mesh) of a single process."""

    def __init__(self) -> None:
        with _lock:
            self._address = f"local:{next(_ids)}"
            _registry[self._address] = self
        self._uuids = itertools.count(1)
        self._book = OfferBook(drop=lambda uuid: None, name=f"kv-offers-{self._address}")

    @property
    def address(self) -> str:
        return self._address

    def offer(self, k: jax.Array, v: jax.Array, *, ttl_s: float = 60.0,
              on_expire: ExpiryCallback | None = None) -> KvTicket:
        sharding = check_block(k, v)
        uuid = next(self._uuids)
        mesh = sharding.mesh
        # The whole block is one "shard" here: nothing travels, the receiver reshards.
        whole = shard_index(tuple(slice(None) for _ in k.shape), k.shape)
        ticket = KvTicket(uuid=uuid, address=self._address, kind=KIND, shape=tuple(k.shape),
                          dtype=str(k.dtype), mesh_shape=tuple(mesh.devices.shape),
                          mesh_axes=tuple(mesh.axis_names), spec=spec_entries(sharding.spec),
                          shards=(whole,), ttl_s=ttl_s)
        self._book.add(Offer(uuid=uuid, expires_at=time.monotonic() + ttl_s,
                             on_expire=on_expire, payload=(k, v)))
        return ticket

    def pull(self, ticket: KvTicket, *, target: NamedSharding | None = None,
             timeout_s: float = 30.0, shape: tuple[int, ...] | None = None,
             dtype: str | None = None) -> tuple[jax.Array, jax.Array]:
        check_expected(ticket, shape, dtype)
        if ticket.kind != KIND:
            raise TransferError(f"LocalTransport cannot pull a {ticket.kind!r} ticket")
        source = _registry.get(ticket.address)
        if source is None:
            raise TransferError(f"no local transport at {ticket.address}")
        offer = source._book.wait_for(ticket.uuid, timeout_s)
        if offer is None:
            raise TransferTimeout(f"pull of block {ticket.uuid} from {ticket.address} timed out "
                                  f"after {timeout_s} s")
        k, v = offer.payload  # type: ignore[misc]
        if target is None or target == k.sharding:
            return k, v
        try:
            return jax.device_put((k, v), target)
        except (ValueError, RuntimeError) as err:
            raise TransferError(f"device_put of a {k.shape} block to {target} failed: {err}") \
                from err

    def close(self) -> None:
        self._book.close()
        with _lock:
            _registry.pop(self._address, None)
