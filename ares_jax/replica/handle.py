"""``ReplicaHandle``: the whole engine boundary, as the scheduler core sees it.

Commands return at once; what they produce arrives later as events from ``poll()``. In this
process (``replica/local.py``) a command runs to completion before it returns and
``advance()`` runs one decode step; behind gRPC (``serving/remote.py``) commands are RPCs,
the replica process steps on its own (``advance()`` does nothing) and ``poll()`` drains what
it streamed since the last call. The core is written once
against this protocol and cannot tell the two apart.

Flow of one request: ``prefill`` on a prefill replica -> ``Prefilled`` (first token, a
``KvBlock``) -> ``insert`` on the chosen decode replica -> ``InsertDone`` -> ``Stepped`` rows
until the replica reports a finish (it releases the request itself) or the core calls
``release`` (a stop string, an abort). The prefill side's block is dropped with ``drop_kv``
once the decode side has it.

A live migration, staged: ``reserve`` on the destination; rounds of ``export`` on the source
and ``import_kv`` on the destination while the request keeps decoding; then ``detach`` on the
source, the last ``export``/``import_kv``, ``adopt`` on the destination and ``release`` on the
source (or ``reattach`` on the source and ``release`` on the destination to abandon it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ares_jax.engine.slots import DecodeLoad
from ares_jax.engine.types import Request
from ares_jax.replica.types import Detached, Event, KvBlock, Prefilled, ReplicaInfo


class ReplicaHandle(Protocol):
    info: ReplicaInfo

    def poll(self) -> list[Event]:
        """Events since the last call."""
        ...

    def advance(self) -> None:
        """Let the replica make progress: one decode step in this process; nothing for a
        replica process, which steps on its own."""
        ...

    def load(self) -> DecodeLoad:
        """The latest known load (decode replicas; a prefill replica reports its pages too)."""
        ...

    # prefill replicas ------------------------------------------------------------------

    def prefill(self, requests: Sequence[Request]) -> None:
        """Prefill ``requests`` -> one ``Prefilled`` (or a ``PrefillFailed``) each."""
        ...

    def drop_kv(self, request_id: str) -> None:
        """The prefilled block of ``request_id`` is no longer needed. Idempotent."""
        ...

    # decode replicas -------------------------------------------------------------------

    def insert(self, request: Request, prefilled: Prefilled) -> None:
        """Take a prefilled request (pulling its KV) -> ``InsertDone``."""
        ...

    def release(self, request_id: str) -> None:
        """Stop a request here and free its pages (running, detached or reserved). Idempotent."""
        ...

    def reserve(self, request_id: str, pages: int) -> bool:
        """Hold ``pages`` more pages for an incoming migration; False when they are not free."""
        ...

    def export(self, request_id: str, start: int, end: int,
               to: ReplicaInfo | None = None) -> KvBlock:
        """Offer pages [start, end) of a request held here for one ``import_kv`` on ``to``
        (a destination in the same process reads them directly)."""
        ...

    def import_kv(self, request_id: str, start: int, block: KvBlock) -> None:
        """Write ``block`` into the request's reserved pages from ``start`` -> ``ImportDone``."""
        ...

    def detach(self, request_id: str) -> Detached | None:
        """Take a running request off the batch, keeping its pages; None if it is not here."""
        ...

    def reattach(self, request_id: str) -> None:
        """Resume a detached request where it stopped."""
        ...

    def adopt(self, request: Request, state: Detached) -> None:
        """Start decoding a migrated request whose pages were imported; raises on failure."""
        ...
