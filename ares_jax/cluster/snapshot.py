"""The policies' view of the live decode side, built from replica loads as columns.

Each replica reports its running requests as arrays (``DecodeLoad``), so a snapshot is a few
``np.concatenate`` calls rather than a Python object per request: at 256 replicas x 128
requests that is the difference between tens of milliseconds and about one.
"""

from __future__ import annotations

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
    page = core.page_size
    pos = {rid: p for p, rid in enumerate(ids)}
    queued_kv = np.zeros(len(ids), np.int64)
    queued_n = np.zeros(len(ids), np.int64)
    for rid, rep in core.inserting.items():  # sent to a replica, not in its load yet
        queued_kv[pos[rep]] += core.held_kv_tokens(rid)
        queued_n[pos[rep]] += 1
    counts = np.fromiter((len(ld.request_ids) for ld in ls), np.int64, len(ls))
    table = None
    if with_table:
        table = _table(core, ls, counts)
    return ClusterSnapshot(
        now=core.clock(),
        replica_ids=np.asarray(ids, np.int64),
        page_size=page,
        kv_capacity_tokens=np.fromiter((ld.capacity_pages * page for ld in ls), np.int64,
                                       len(ls)),
        used_tokens=np.fromiter((ld.used_pages * page for ld in ls), np.int64, len(ls)),
        running_kv_tokens=np.fromiter((int(ld.kv_tokens.sum()) for ld in ls), np.int64,
                                      len(ls)),
        batch_size=counts,
        queued_kv_tokens=queued_kv,
        queued_count=queued_n,
        requests=table,
        pending=tuple(pending),
    )


def _table(core: ClusterCore, ls: Sequence[DecodeLoad], counts: np.ndarray) -> RequestTable:
    n = int(counts.sum())
    rids = np.empty(n, dtype=object)
    at = 0
    for ld in ls:
        rids[at:at + len(ld.request_ids)] = ld.request_ids
        at += len(ld.request_ids)
    cat = lambda name, dtype: (np.concatenate([getattr(ld, name) for ld in ls]).astype(  # noqa
        dtype, copy=False) if n else np.zeros(0, dtype))
    migrating = np.zeros(n, bool)
    last = np.full(n, -np.inf)
    # Few requests migrate: look each one up in its replica's rows, not every row in a dict.
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
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
        request_ids=rids,
        replica=np.repeat(np.arange(len(ls), dtype=np.int64), counts),
        generated_tokens=cat("generated", np.int64),
        kv_tokens=cat("kv_tokens", np.int64),
        max_tokens=cat("max_tokens", np.int64),
        predicted_remaining=cat("predicted_remaining", np.float64),
        true_remaining=np.full(n, np.nan),
        migrating=migrating,
        last_migrated_at=last,
    )
