"""The KV transport of a replica process, and the bookkeeping of what it has offered.

Blocks leave the process as ``KvTicket``s of the ``KvTransport`` seam
(``ares_jax/transfer/kv_transport.py``; ``jax.experimental.transfer`` by default, or
``/dev/shm`` segments between processes of one host with ``--transport shm``). The
process remembers which offers belong to which request, so an offer is dropped as soon as the
scheduler says the block is no longer needed (the decode side took it, the request moved on or
ended) instead of waiting for its expiry.
"""

from __future__ import annotations

import threading

import jax

from ares_jax.transfer.kv_transport import KvTicket, KvTransport

OFFER_TTL_S = 120.0  # an offer nobody pulls is dropped after this (the pull deadline is 30 s)


def make_transport(kind: str, host: str = "127.0.0.1") -> KvTransport | None:
    if kind == "none":
        return None
    if kind == "jax":
        from ares_jax.transfer.remote import JaxTransferTransport

        return JaxTransferTransport(f"{host}:0")
    if kind == "shm":  # same-host processes only: the segments live in this host's /dev/shm
        from ares_jax.transfer.shm import ShmTransport

        return ShmTransport()
    raise ValueError(f"unknown KV transport {kind!r} (jax | shm | none)")


class Offers:
    """Offers by request over one transport."""

    def __init__(self, transport: KvTransport) -> None:
        self.transport = transport
        self._by_request: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return self.transport.address

    def offer(self, request_id: str, k: jax.Array, v: jax.Array) -> bytes:
        ticket = self.transport.offer(k, v, ttl_s=OFFER_TTL_S,
                                      on_expire=lambda uuid: self._forget_uuid(request_id, uuid))
        with self._lock:
            self._by_request.setdefault(request_id, []).append(ticket.uuid)
        return ticket.to_bytes()

    def pull(self, ticket: bytes, *, timeout_s: float) -> tuple[jax.Array, jax.Array]:
        return self.transport.pull(KvTicket.from_bytes(ticket), timeout_s=timeout_s)

    def drop(self, request_id: str) -> None:
        """The request's offered blocks are no longer needed (pulled, or never will be)."""
        with self._lock:
            uuids = self._by_request.pop(request_id, [])
        for uuid in uuids:
            self.transport.release(uuid)

    def drop_all(self) -> None:
        with self._lock:
            requests = list(self._by_request)
        for rid in requests:
            self.drop(rid)

    def _forget_uuid(self, request_id: str, uuid: int) -> None:
        with self._lock:
            left = [u for u in self._by_request.get(request_id, []) if u != uuid]
            if left:
                self._by_request[request_id] = left
            else:
                self._by_request.pop(request_id, None)

    def pending(self) -> int:
        return self.transport.pending_offers()

    def close(self) -> None:
        self.transport.close()
