"""The baseline policies, the policy protocol and the registry.

Every policy is an immutable object whose two methods are pure functions of their inputs:

* ``dispatch(snapshot, state) -> (Decisions, state)`` places ``snapshot.pending`` requests; a
  policy may leave some unplaced (ARES holds requests no replica has memory for): the caller
  keeps them and offers them again at its next call;
* ``reschedule(snapshot, state) -> (Decisions, state)`` proposes migrations (called every period).

Policy memory (the round-robin cursor) travels in :class:`PolicyState`; cool-downs come from the
snapshot's ``last_migrated_at`` column. Decisions name replicas by ``replica_id``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from ares_jax.config import config
from ares_jax.scheduler.state import (
    ClusterSnapshot,
    Decisions,
    Dispatch,
    Migration,
    PolicyState,
)


class Policy(Protocol):
    name: str
    # False when ``dispatch`` reads only per-replica aggregates, so callers may leave the
    # snapshot's request table out. ``reschedule`` always gets the table.
    needs_request_table: bool
    # False when ``reschedule`` never migrates (callers may skip calling it).
    migrates: bool

    def dispatch(
        self, snapshot: ClusterSnapshot, state: PolicyState
    ) -> tuple[Decisions, PolicyState]: ...

    def reschedule(
        self, snapshot: ClusterSnapshot, state: PolicyState
    ) -> tuple[Decisions, PolicyState]: ...


def pages_as_tokens(kv_tokens: int | np.ndarray, page_size: int) -> int | np.ndarray:
    """KV tokens rounded up to whole pages."""
    return -(-kv_tokens // page_size) * page_size


class DispatchScore(Protocol):
    """A current-load dispatch rule over one call's placements: ``choice()`` is the replica
    position the rule picks now, ``place`` records a request put there."""

    def choice(self) -> int: ...

    def place(self, pos: int, kv_tokens: int) -> None: ...


class LeastLoadScore:
    """Least committed KV memory (allocated + queued) as a fraction of capacity."""

    def __init__(self, snapshot: ClusterSnapshot) -> None:
        self.page = snapshot.page_size
        self.committed = (snapshot.used_tokens + snapshot.queued_kv_tokens).astype(np.float64)
        self.capacity = np.maximum(snapshot.kv_capacity_tokens, 1).astype(np.float64)

    def choice(self) -> int:
        return int(np.argmin(self.committed / self.capacity))

    def place(self, pos: int, kv_tokens: int) -> None:
        self.committed[pos] += pages_as_tokens(kv_tokens, self.page)


def llumnix_free_blocks_and_batch(snapshot: ClusterSnapshot) -> tuple[np.ndarray, np.ndarray]:
    """Llumnix's free blocks ("virtual usage": the queue's blocks count as used) and batch."""
    page = snapshot.page_size
    queued_blocks = np.ceil(snapshot.queued_kv_tokens / page)
    free = (snapshot.kv_capacity_tokens - snapshot.used_tokens) // page - queued_blocks
    return free.astype(np.float64), snapshot.batch_size.astype(np.float64)


def llumnix_freeness(free_blocks: np.ndarray, batch: np.ndarray) -> np.ndarray:
    return free_blocks / np.maximum(batch, 1.0)


class LlumnixScore:
    """Most free blocks per running request (Llumnix's freeness)."""

    def __init__(self, snapshot: ClusterSnapshot) -> None:
        self.page = snapshot.page_size
        self.free, self.batch = llumnix_free_blocks_and_batch(snapshot)

    def choice(self) -> int:
        return int(np.argmax(llumnix_freeness(self.free, self.batch)))

    def place(self, pos: int, kv_tokens: int) -> None:
        self.free[pos] -= -(-kv_tokens // self.page)
        self.batch[pos] += 1


DISPATCH_SCORES: dict[str, type[LeastLoadScore] | type[LlumnixScore]] = {
    "least-load": LeastLoadScore, "llumnix": LlumnixScore,
}


def dispatch_by_score(snapshot: ClusterSnapshot, score: DispatchScore) -> Decisions:
    """Place every pending request where ``score`` points, updating it after each."""
    out = []
    for p in snapshot.pending:
        pos = score.choice()
        out.append(Dispatch(request_id=p.request_id, replica_id=int(snapshot.replica_ids[pos])))
        score.place(pos, p.kv_tokens)
    return Decisions(dispatches=tuple(out))


@dataclass(frozen=True)
class StaticPolicy:
    """Round-robin dispatch and no migration, as in vLLM's PD proxy."""

    name: ClassVar[str] = "static"
    needs_request_table: ClassVar[bool] = False
    migrates: ClassVar[bool] = False

    def dispatch(
        self, snapshot: ClusterSnapshot, state: PolicyState
    ) -> tuple[Decisions, PolicyState]:
        n = snapshot.num_replicas
        cursor = state.round_robin_next % n
        out = []
        for p in snapshot.pending:
            replica_id = int(snapshot.replica_ids[cursor])
            out.append(Dispatch(request_id=p.request_id, replica_id=replica_id))
            cursor = (cursor + 1) % n
        return Decisions(dispatches=tuple(out)), dataclasses.replace(
            state, round_robin_next=cursor
        )

    def reschedule(
        self, snapshot: ClusterSnapshot, state: PolicyState
    ) -> tuple[Decisions, PolicyState]:
        return Decisions(), state


@dataclass(frozen=True)
class LeastLoadPolicy:
    """Dispatch to the replica with the least current KV memory (allocated + queued); no migration.

    This is what JetStream and SGLang's routers do with current load.
    """

    name: ClassVar[str] = "least-load"
    needs_request_table: ClassVar[bool] = False
    migrates: ClassVar[bool] = False

    def dispatch(
        self, snapshot: ClusterSnapshot, state: PolicyState
    ) -> tuple[Decisions, PolicyState]:
        return dispatch_by_score(snapshot, LeastLoadScore(snapshot)), state

    def reschedule(
        self, snapshot: ClusterSnapshot, state: PolicyState
    ) -> tuple[Decisions, PolicyState]:
        return Decisions(), state


@config
class LlumnixConfig:
    # Llumnix's --migrate-out-threshold (3.0) on its 'remaining_steps' metric: free blocks per
    # running request. Below it a replica migrates out.
    migrate_out_threshold: float = 3.0


@dataclass(frozen=True)
class LlumnixPolicy:
    """Llumnix (OSDI'24) on current load.

    Freeness = (free blocks - blocks wanted by queued requests) / batch size ("virtual usage"
    counts the queue as used). Dispatch goes to the freest replica. Each period, replicas below
    the migrate-out threshold (busiest first) are paired with the freest replicas; the pair
    migrates its source's shortest running request ('SR', Llumnix's default) if that shrinks the
    pair's freeness gap.
    """

    config: LlumnixConfig = LlumnixConfig()
    name: ClassVar[str] = "llumnix"
    needs_request_table: ClassVar[bool] = False
    migrates: ClassVar[bool] = True

    def dispatch(
        self, snapshot: ClusterSnapshot, state: PolicyState
    ) -> tuple[Decisions, PolicyState]:
        return dispatch_by_score(snapshot, LlumnixScore(snapshot)), state

    def reschedule(
        self, snapshot: ClusterSnapshot, state: PolicyState
    ) -> tuple[Decisions, PolicyState]:
        table = snapshot.table()
        free, batch = llumnix_free_blocks_and_batch(snapshot)
        f = llumnix_freeness(free, batch)
        threshold = self.config.migrate_out_threshold
        sources = [int(i) for i in np.argsort(f, kind="stable") if f[i] < threshold]
        dests = [int(i) for i in np.argsort(-f, kind="stable") if f[i] >= threshold]
        blocks = -(-table.kv_tokens // snapshot.page_size)
        movable = ~table.migrating
        out = []
        for src, dst in zip(sources, dests, strict=False):
            rows = np.flatnonzero((table.replica == src) & movable)
            if rows.size == 0:
                continue
            row = int(rows[np.argmin(table.kv_tokens[rows])])
            b = blocks[row]
            src_after = (free[src] + b) / max(batch[src] - 1, 1.0)
            dst_after = (free[dst] - b) / (batch[dst] + 1)
            if abs(src_after - dst_after) >= abs(f[src] - f[dst]):
                continue
            out.append(
                Migration(
                    request_id=table.id_at(row),
                    src=int(snapshot.replica_ids[src]),
                    dst=int(snapshot.replica_ids[dst]),
                )
            )
        return Decisions(migrations=tuple(out)), state
