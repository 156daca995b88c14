"""The ``/cluster`` JSON of an in-process serving loop.

A loop that publishes ``cluster_state()`` is used as is. For today's ``ServingLoop`` and
``ClusterLoop``, ``fallback_cluster_state`` computes the same schema from engine internals.
Only ``LoopBackend``'s owner thread calls these (the loop is not thread-safe).

Schema (shared with the multi-process scheduler; the page and the metrics read it)::

    {"time", "policy", "waiting", "running",
     "replicas": [{"replica_id", "role", "process_id", "address", "healthy", "running",
                   "kv_pages_used", "kv_pages_free", "kv_pages_total", "page_size",
                   "predicted_kv_pages": [[steps_ahead, pages], ...]}],
     "migrations": [{"request_id", "src", "dst", "outcome", "bytes", "downtime_ms",
                     "finished_at"}],            # newest last, at most 100
     "counters": {"migrations_committed", "migrations_aborted", "migration_bytes",
                  "preemptions", "fallback_dispatches", "requests_finished"}}
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

MAX_MIGRATIONS = 100
DEFAULT_HORIZON_STEPS = 256
TRAJECTORY_SAMPLES = 17
# perf_counter -> wall clock, fixed once so that a migration's finished_at never changes between
# states (the metrics recognise migrations they have already counted by it).
_WALL_MINUS_PERF = time.time() - time.perf_counter()


def loop_cluster_state(loop: Any, counters: Mapping[str, int]) -> dict:
    """The loop's own state when it publishes one, else the fallback below."""
    if hasattr(loop, "cluster_state"):
        return loop.cluster_state()
    return fallback_cluster_state(loop, counters)


# ==================================================================================== FALLBACK
# Reads ServingLoop/ClusterLoop/DecodeEngine internals (slots, allocator, trackers, migration
# history). Those are becoming private: this one function goes away once the loop publishes
# cluster_state() itself. Nothing else in ares_jax.frontend touches engine internals.

def fallback_cluster_state(loop: Any, counters: Mapping[str, int]) -> dict:
    """``counters`` carries what only the caller sees: requests_finished and preemptions."""
    now_perf = time.perf_counter()
    cluster = getattr(loop, "cluster", None)
    ares = getattr(cluster, "ares", None)
    horizon = int(getattr(ares, "horizon_steps", DEFAULT_HORIZON_STEPS))
    times = np.linspace(0, horizon, TRAJECTORY_SAMPLES).round().astype(int)
    replicas = []
    for i, engine in enumerate(loop.decoders):
        alloc = engine.allocator
        replicas.append({
            "replica_id": i, "role": "decode", "process_id": os.getpid(),
            "address": "in-process", "healthy": True, "running": len(engine.slots),
            "kv_pages_used": int(alloc.num_used), "kv_pages_free": int(alloc.num_free),
            "kv_pages_total": int(alloc.capacity), "page_size": int(engine.page_size),
            "predicted_kv_pages": _predicted_pages(loop, engine, times),
        })
    stats = loop.stats() if hasattr(loop, "stats") else {}
    manager = getattr(loop, "migrations", None)
    history = list(getattr(manager, "history", []))[-MAX_MIGRATIONS:]
    migrations = []
    for rec in history:
        downtime = None
        if rec.detached_at is not None and rec.adopted_at is not None:
            downtime = (rec.adopted_at - rec.detached_at) * 1e3
        finished = rec.finished_at if rec.finished_at is not None else now_perf
        migrations.append({
            "request_id": rec.request_id, "src": int(rec.src), "dst": int(rec.dst),
            "outcome": rec.outcome.value if rec.outcome is not None else "running",
            "bytes": int(rec.bytes_moved), "downtime_ms": downtime,
            "finished_at": _WALL_MINUS_PERF + finished,
        })
    waiting = len(loop.waiting)
    return {
        "time": time.time(),
        "policy": getattr(cluster, "policy", "least-loaded"),
        "waiting": waiting,
        "running": max(len(loop.trackers) - waiting, 0),
        "replicas": replicas,
        "migrations": migrations,
        "counters": {
            "migrations_committed": int(stats.get("migrations_committed", 0)),
            "migrations_aborted": int(stats.get("migrations_aborted", 0)),
            "migration_bytes": int(stats.get("migration_bytes", 0)),
            "preemptions": int(counters.get("preemptions", 0)),
            "fallback_dispatches": int(stats.get("fallback_dispatches", 0)),
            "requests_finished": int(counters.get("requests_finished", 0)),
        },
    }


def _predicted_pages(loop: Any, engine: Any, times: np.ndarray) -> list[list[int]]:
    """ARES's load model in pages: a request holds ceil((kv + t) / page_size) pages until its
    predicted remaining length runs out (no prediction: what max_tokens still allows)."""
    kv, rem = [], []
    for rid, slot in list(engine.slots.items()):
        allowed = max(slot.request.params.max_tokens - slot.generated, 0)
        tracker = loop.trackers.get(rid)
        pred = getattr(tracker, "predicted_remaining", None)
        kv.append(slot.num_cached)
        rem.append(min(max(pred, 0.0), allowed) if pred is not None else allowed)
    if not kv:
        return [[int(t), 0] for t in times]
    kv_a, rem_a = np.asarray(kv, float), np.asarray(rem, float)
    alive = rem_a[:, None] > times[None, :]
    pages = np.where(alive, np.ceil((kv_a[:, None] + times[None, :]) / engine.page_size), 0)
    return [[int(t), int(p)] for t, p in zip(times, pages.sum(axis=0))]
