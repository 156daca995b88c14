"""Records that cross the replica boundary: identities, KV block references and events.

Every field is plain data (ints, strings, numpy arrays, token infos), so the gRPC transport
encodes them one to one; a ``KvBlock`` holds device arrays only when source and destination
share a process (then the copy is a ``jax.device_put``), else a transport ticket.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ares_jax.engine.sampling import TokenInfo

_frozen = dataclasses.dataclass(frozen=True, kw_only=True)


@_frozen
class ReplicaInfo:
    """What the scheduler knows about a replica from its registration."""

    replica_id: int
    role: str  # "prefill" | "decode"
    page_size: int
    capacity_pages: int
    max_num_seqs: int
    max_model_len: int
    kv_bytes_per_token: int
    # Replicas with the same ``process`` share an OS process (meshes of one host): KV between
    # them moves by device_put, which the policy may prefer.
    process: str = "in-process"
    process_id: int = 0
    address: str = "in-process"
    devices: int = 1


@_frozen
class KvBlock:
    """A request's pages [start, start + pages) made available by ``source`` for one pull."""

    source: int  # replica id
    request_id: str
    pages: int  # real pages in the block (the arrays may be padded to a bucket)
    nbytes: int
    # ((k, v, pages), ...) power-of-two chunks as device arrays, same process only.
    arrays: tuple[tuple[Any, Any, int], ...] | None = None
    # Across processes: a KvTransport ticket per chunk, and each chunk's real pages.
    tickets: tuple[bytes, ...] = ()
    chunk_pages: tuple[int, ...] = ()
    start: int = 0  # first page of the block in the request's page list


@_frozen
class Prefilled:
    """A prefill finished: the first token, and the KV to hand to a decode replica."""

    replica_id: int
    request_id: str
    first: TokenInfo
    num_tokens: int  # KV tokens (prompt + resumed tokens)
    predicted_remaining: float | None
    finish_reason: str | None  # the first token already ended it (then ``kv`` is None)
    stop_reason: int | None
    kv: KvBlock | None
    elapsed_s: float = 0.0


@_frozen
class PrefillFailed:
    replica_id: int
    request_ids: tuple[str, ...]
    error: str


@_frozen
class InsertDone:
    """A decode replica took (ok) or refused (error) a prefilled request."""

    replica_id: int
    request_id: str
    ok: bool
    error: str = ""


@_frozen
class ImportDone:
    """A migration copy stage landed on (ok) or failed at the destination."""

    replica_id: int
    request_id: str
    start: int
    pages: int
    nbytes: int
    ok: bool
    error: str = ""


@_frozen
class Stepped:
    """One decode step on one replica: a row per request that was in the batch.

    Rows that finished (token-level stop) are already released by the replica; ``preempted``
    requests were evicted for pages and must be recomputed elsewhere.
    """

    replica_id: int
    request_ids: tuple[str, ...]
    tokens: tuple[TokenInfo, ...]
    finish_reasons: tuple[str | None, ...]
    stop_reasons: tuple[int | None, ...]
    predicted_remaining: np.ndarray | None  # float64 per row
    preempted: tuple[str, ...]
    elapsed_s: float
    kv_tokens: int  # KV tokens in the batch before the step (for the step-cost fit)


@_frozen
class Detached:
    """A request taken off a source's batch for the stop-and-copy stage of a migration."""

    request_id: str
    num_cached: int
    last_token: int
    generated: int
    predicted_remaining: float


@_frozen
class ReplicaFailed:
    """The replica stopped answering or reported a fatal error."""

    replica_id: int
    error: str


Event = Prefilled | PrefillFailed | InsertDone | ImportDone | Stepped | ReplicaFailed
