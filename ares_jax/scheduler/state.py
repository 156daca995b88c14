"""Snapshot and decision types shared by every scheduling policy.

A policy sees the decode side of the cluster as a :class:`ClusterSnapshot` and answers with
:class:`Decisions`. Two ways to build a snapshot:

* :meth:`ClusterSnapshot.from_views` from per-request :class:`RequestView` and per-replica
  :class:`ReplicaView` objects: convenient for the live scheduler and for tests.
* Directly from columns (numpy arrays), which is what the simulator does: building tens of
  thousands of view objects per decision would dominate a 256-replica simulation.

Replicas are addressed inside the snapshot by *position* (index into the replica arrays);
decisions name them by ``replica_id``. Requests are named by their ``request_id`` (a string in
the live system, an int in the simulator).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RequestId = str | int

_frozen = dataclass(frozen=True, kw_only=True)
_frozen_arrays = dataclass(frozen=True, kw_only=True, eq=False)  # numpy fields: identity equality


@_frozen
class RequestView:
    """One running or queued request on a decode replica."""

    request_id: RequestId
    prompt_tokens: int
    generated_tokens: int
    kv_tokens: int
    max_tokens: int
    predicted_remaining: float | None = None  # latest prediction; None before the first one
    true_remaining: int | None = None  # only known to the oracle (simulator)
    migrating: bool = False
    last_migrated_at: float | None = None
    arrival_s: float = 0.0


@_frozen
class ReplicaView:
    """One decode (or prefill) replica."""

    replica_id: int
    role: str  # 'prefill' | 'decode'
    kv_capacity_tokens: int
    page_size: int
    running: tuple[RequestView, ...] = ()
    queued: tuple[RequestView, ...] = ()  # dispatched here, waiting for KV pages
    reserved_kv_tokens: int = 0  # pages held for in-flight KV transfers / incoming migrations


@_frozen
class PendingDispatch:
    """A request whose prefill finished and that needs a decode replica."""

    request_id: RequestId
    kv_tokens: int  # KV to place: the prompt (or prompt + generated after a preemption)
    generated_tokens: int
    max_tokens: int
    predicted_remaining: float | None = None
    true_remaining: int | None = None


@_frozen_arrays
class RequestTable:
    """Running requests of all decode replicas, one row each (columnar)."""

    request_ids: np.ndarray  # object or int64
    replica: np.ndarray  # int64 position of the replica in the snapshot
    generated_tokens: np.ndarray  # int64
    kv_tokens: np.ndarray  # int64
    max_tokens: np.ndarray  # int64
    predicted_remaining: np.ndarray  # float64, NaN when unknown
    true_remaining: np.ndarray  # float64, NaN when unknown
    migrating: np.ndarray  # bool
    last_migrated_at: np.ndarray  # float64, -inf when never migrated

    def __len__(self) -> int:
        return int(self.replica.shape[0])

    def id_at(self, row: int) -> RequestId:
        """The request id of a row as a plain Python value."""
        value = self.request_ids[row]
        return value.item() if isinstance(value, np.generic) else value

    @staticmethod
    def empty() -> RequestTable:
        i = np.zeros(0, np.int64)
        f = np.zeros(0, np.float64)
        return RequestTable(
            request_ids=i, replica=i, generated_tokens=i, kv_tokens=i, max_tokens=i,
            predicted_remaining=f, true_remaining=f, migrating=np.zeros(0, bool),
            last_migrated_at=f,
        )


@_frozen_arrays
class ClusterSnapshot:
    """The decode replicas at one instant, as seen by a policy.

    Per-replica arrays have one entry per decode replica, all in the same order. Memory is in
    KV tokens (``pages * page_size``):

    * ``used_tokens``: everything allocated (running KV rounded up to pages, in-flight transfers,
      reservations for incoming migrations);
    * ``running_kv_tokens``: the exact KV of running requests, the part that grows each step.

    ``requests`` may be ``None`` when the caller knows the policy only reads replica aggregates
    (``policy.needs_request_table`` is False); the simulator uses that to stay fast.
    """

    now: float
    replica_ids: np.ndarray  # int64
    page_size: int
    kv_capacity_tokens: np.ndarray
    used_tokens: np.ndarray
    running_kv_tokens: np.ndarray
    batch_size: np.ndarray
    queued_kv_tokens: np.ndarray
    queued_count: np.ndarray
    requests: RequestTable | None = None
    pending: tuple[PendingDispatch, ...] = ()

    @property
    def num_replicas(self) -> int:
        return int(self.replica_ids.shape[0])

    def table(self) -> RequestTable:
        if self.requests is None:
            raise ValueError("this snapshot was built without its request table")
        return self.requests

    def with_pending(self, pending: Sequence[PendingDispatch]) -> ClusterSnapshot:
        return dataclasses.replace(self, pending=tuple(pending))

    @staticmethod
    def from_views(
        now: float,
        replicas: Sequence[ReplicaView],
        pending: Sequence[PendingDispatch] = (),
    ) -> ClusterSnapshot:
        """Build a snapshot from view objects; prefill replicas are left out."""
        decode = [r for r in replicas if r.role == "decode"]
        if not decode:
            raise ValueError("a snapshot needs at least one decode replica")
        page_sizes = {r.page_size for r in decode}
        if len(page_sizes) != 1:
            raise ValueError(f"decode replicas disagree on page size: {sorted(page_sizes)}")
        page = page_sizes.pop()
        rows = [(pos, q) for pos, r in enumerate(decode) for q in r.running]

        def col(get, dtype) -> np.ndarray:  # noqa: ANN001 - tiny local helper
            return np.array([get(q) for _, q in rows], dtype=dtype)

        def nan_if_none(v: float | None) -> float:
            return math.nan if v is None else float(v)

        table = RequestTable(
            request_ids=np.array([q.request_id for _, q in rows], dtype=object),
            replica=np.array([pos for pos, _ in rows], dtype=np.int64),
            generated_tokens=col(lambda q: q.generated_tokens, np.int64),
            kv_tokens=col(lambda q: q.kv_tokens, np.int64),
            max_tokens=col(lambda q: q.max_tokens, np.int64),
            predicted_remaining=col(lambda q: nan_if_none(q.predicted_remaining), np.float64),
            true_remaining=col(lambda q: nan_if_none(q.true_remaining), np.float64),
            migrating=col(lambda q: q.migrating, bool),
            last_migrated_at=col(
                lambda q: -math.inf if q.last_migrated_at is None else q.last_migrated_at,
                np.float64,
            ),
        )

        def pages_tokens(reqs: tuple[RequestView, ...]) -> int:
            return sum(-(-q.kv_tokens // page) * page for q in reqs)

        return ClusterSnapshot(
            now=now,
            replica_ids=np.array([r.replica_id for r in decode], dtype=np.int64),
            page_size=page,
            kv_capacity_tokens=np.array([r.kv_capacity_tokens for r in decode], np.int64),
            used_tokens=np.array(
                [pages_tokens(r.running) + r.reserved_kv_tokens for r in decode], np.int64
            ),
            running_kv_tokens=np.array(
                [sum(q.kv_tokens for q in r.running) for r in decode], np.int64
            ),
            batch_size=np.array([len(r.running) for r in decode], np.int64),
            queued_kv_tokens=np.array(
                [sum(q.kv_tokens for q in r.queued) for r in decode], np.int64
            ),
            queued_count=np.array([len(r.queued) for r in decode], np.int64),
            requests=table,
            pending=tuple(pending),
        )


@_frozen
class Dispatch:
    request_id: RequestId
    replica_id: int


@_frozen
class Migration:
    request_id: RequestId
    src: int  # replica_id
    dst: int  # replica_id


@_frozen
class Decisions:
    dispatches: tuple[Dispatch, ...] = ()
    migrations: tuple[Migration, ...] = ()

    def dispatch_map(self) -> dict[RequestId, int]:
        return {d.request_id: d.replica_id for d in self.dispatches}


@_frozen
class PolicyState:
    """Policy memory carried between calls (policies never mutate it; they return a new one)."""

    round_robin_next: int = 0
