"""The cluster as JSON: what ``/cluster``, the ``Stats`` RPC and the live page show."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ares_jax.cluster.core import ClusterCore
    from ares_jax.engine.slots import DecodeLoad


def cluster_state(core: ClusterCore, recent: int = 100) -> dict:
    """Every replica's identity and load, the ``recent`` last migrations and the counters."""
    replicas = []
    for h in core.prefill + core.decode:
        ld = h.load()
        replicas.append({
            "replica_id": h.info.replica_id, "role": h.info.role,
            "process_id": h.info.process_id, "address": h.info.address,
            "process": h.info.process, "healthy": h.info.replica_id not in core.dead,
            "running": len(ld.request_ids), "kv_pages_used": ld.used_pages,
            "kv_pages_free": ld.free_pages, "kv_pages_total": ld.capacity_pages,
            "page_size": h.info.page_size,
            "predicted_kv_pages": _predicted_pages(ld, core.page_size),
        })
    migrations = [{
        "request_id": m.request_id, "src": m.src, "dst": m.dst,
        "outcome": m.outcome.value if m.outcome else "active", "bytes": m.bytes_moved,
        "downtime_ms": None if m.downtime_s is None else round(m.downtime_s * 1e3, 3),
        "stages": m.stages, "reason": m.reason, "finished_at": m.finished_at,
    } for m in list(core.migration_history)[-recent:]]
    return {
        "time": time.time(), "policy": core.cluster.policy,
        "dispatch_policy": core.cluster.dispatch_policy or core.cluster.policy,
        "waiting": len(core.waiting), "running": len(core.location),
        "replicas": replicas, "migrations": migrations,
        "counters": {**{k: int(v) for k, v in core.counters.items()},
                     "migrations_committed": int(core.counters["migrations_committed"]),
                     "migrations_aborted": int(core.counters["migrations_aborted"]),
                     "migration_bytes": int(core.counters["migration_bytes"]),
                     "preemptions": int(core.counters["preemptions"]),
                     "fallback_dispatches": int(core.counters["fallback_dispatches"]),
                     "requests_finished": int(core.counters["requests_finished"])},
    }


def _predicted_pages(load: DecodeLoad, page_size: int, points: int = 8) -> list[list[int]]:
    """(steps ahead, pages) of a replica's running requests if each ran for its predicted
    remaining length (capped by max_tokens), sampled over the longest of them."""
    if not len(load.request_ids):
        return [[0, 0]]
    rem = np.where(np.isnan(load.predicted_remaining), load.max_tokens - load.generated,
                   load.predicted_remaining)
    rem = np.clip(rem, 0, np.maximum(load.max_tokens - load.generated, 0))
    horizon = int(rem.max())
    out = []
    for t in np.linspace(0, horizon, points).astype(int):
        alive = rem >= t
        out.append([int(t), int(np.sum(-(-(load.kv_tokens[alive] + t) // page_size)))])
    return out

