"""The KV transport a replica process uses for blocks that cross process boundaries.

A thin seam over ``ares_jax.transfer.remote`` (``jax.experimental.transfer``): ``offer``
makes a block pullable once and returns a ticket (bytes, carried in a protobuf field);
``pull`` fetches it with the source's exact sharding. Another transport (e.g. NIXL on GPUs)
plugs in by implementing the same three calls.
"""

from __future__ import annotations

from typing import Protocol

import jax

from ares_jax.transfer.remote import KVTransferServer, PageTicket


class KvTransport(Protocol):
    address: str

    def offer(self, k: jax.Array, v: jax.Array) -> bytes: ...

    def pull(self, ticket: bytes, *, timeout_s: float) -> tuple[jax.Array, jax.Array]: ...

    def close(self) -> None: ...


class JaxTransferTransport:
    """``jax.experimental.transfer`` between processes (one server per process)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._server = KVTransferServer(f"{host}:0")

    @property
    def address(self) -> str:
        return self._server.address

    def offer(self, k: jax.Array, v: jax.Array) -> bytes:
        return self._server.offer(k, v).to_json().encode()

    def pull(self, ticket: bytes, *, timeout_s: float) -> tuple[jax.Array, jax.Array]:
        return self._server.pull(PageTicket.from_json(ticket.decode()), timeout_s=timeout_s)

    def close(self) -> None:
        pass  # the runtime's server lives as long as the process


def make_transport(kind: str, host: str = "127.0.0.1") -> KvTransport | None:
    if kind == "none":
        return None
    if kind == "jax":
        return JaxTransferTransport(host)
    raise ValueError(f"unknown KV transport {kind!r} (jax | none)")
