"""The policies' view of the live decode side, built from replica loads as columns.

Each replica reports its running requests as arrays (``DecodeLoad``), so a snapshot is a few
``np.concatenate`` calls rather than a Python object per request: at 256 replicas x 128
requests that is the difference between tens of milliseconds and about one.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ares_jax.engine.slots import DecodeLoad
from ares_jax.scheduler import ClusterSnapshot, PendingDispatch
from ares_jax.scheduler.state import RequestTable

if TYPE_CHECKING:
    from ares_jax.cluster.core import ClusterCore


def build_snapshot(core: ClusterCore, loads: Mapping[int, DecodeLoad],
                   pending: Sequence[PendingDispatch], *, with_table: bool) -> ClusterSnapshot:
    """``loads`` by replica id, for every decode replica of ``core``, in its order."""
    ids = [h.info.replica_id for h in core.decode]
    ls = [loads[i] for i in ids]
    m = len(ls)
    page = core.page_size
    pos = {rid: p for p, rid in enumerate(ids)}
    queued_kv = np.zeros(m, np.int64)
    queued_n = np.zeros(m, np.int64)
    for rid, rep in core.inserting.items():  # sent to a replica, not in its load yet
        queued_kv[pos[rep]] += core.held_kv_tokens(rid)
        queued_n[pos[rep]] += 1
    counts = np.fromiter((len(ld.request_ids) for ld in ls), np.int64, m)
    replica = np.repeat(np.arange(m, dtype=np.int64), counts)
    kv = _cat(ls, "kv_tokens", np.int64)
    return ClusterSnapshot(
        now=core.clock(),
        replica_ids=np.asarray(ids, np.int64),
        page_size=page,
        kv_capacity_tokens=np.fromiter((ld.capacity_pages for ld in ls), np.int64, m) * page,
        used_tokens=np.fromiter((ld.used_pages for ld in ls), np.int64, m) * page,
        running_kv_tokens=np.bincount(replica, weights=kv, minlength=m).astype(np.int64),
        batch_size=counts,
        queued_kv_tokens=queued_kv,
        queued_count=queued_n,
        requests=_table(core, ls, counts, replica, kv) if with_table else None,
        pending=tuple(pending),
    )


def _cat(ls: Sequence[DecodeLoad], name: str, dtype) -> np.ndarray:
    arrays = [getattr(ld, name) for ld in ls]
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


def _table(core: ClusterCore, ls: Sequence[DecodeLoad], counts: np.ndarray,
           replica: np.ndarray, kv: np.ndarray) -> RequestTable:
    n = int(counts.sum())
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    rids = RowIds([ld.request_ids for ld in ls], offsets)
    migrating = np.zeros(n, bool)
    last = np.full(n, -np.inf)
    # Few requests migrate: look each one up in its replica's rows, not every row in a dict.
    pos = {h.info.replica_id: p for p, h in enumerate(core.decode)}

    def row(rid: str) -> int | None:
        p = pos.get(core.location.get(rid, -1))
        if p is None:
            return None
        try:
            return int(offsets[p]) + ls[p].request_ids.index(rid)
        except ValueError:
            return None

    for rid in core.migrations:
        i = row(rid)
        if i is not None:
            migrating[i] = True
    for rid, t in core.last_migrated.items():
        i = row(rid)
        if i is not None:
            last[i] = t
    return RequestTable(
        request_ids=rids,  # type: ignore[arg-type]
        replica=replica,
        generated_tokens=_cat(ls, "generated", np.int64),
        kv_tokens=kv,
        max_tokens=_cat(ls, "max_tokens", np.int64),
        predicted_remaining=_cat(ls, "predicted_remaining", np.float64),
        true_remaining=np.full(n, np.nan),
        migrating=migrating,
        last_migrated_at=last,
    )


class RowIds:
    """The table's request ids, read through the replicas' own tuples: a policy names only the
    few rows it migrates (``RequestTable.id_at``), so no object array of every id is built."""

    def __init__(self, per_replica: Sequence[tuple[str, ...]], offsets: np.ndarray) -> None:
        self._per_replica = per_replica
        self._offsets = offsets.tolist()

    def __len__(self) -> int:
        return sum(len(t) for t in self._per_replica)

    def __getitem__(self, row: int) -> str:
        p = bisect.bisect_right(self._offsets, int(row)) - 1
        while p > 0 and not self._per_replica[p]:  # empty replicas share an offset
            p -= 1
        return self._per_replica[p][int(row) - self._offsets[p]]

    def __iter__(self):
        return itertools.chain.from_iterable(self._per_replica)
