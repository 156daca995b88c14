"""Random cluster snapshots for timing and testing policies without running a simulation.

:func:`random_snapshot` builds a :class:`ClusterSnapshot` directly from columns, as the
simulator does, with the awkward cases a policy meets in a real run mixed in at chosen rates:
idle replicas, requests with no prediction yet (NaN), requests migrating or cooling down after
a migration, queued requests and in-flight reservations. Replicas are loaded unevenly (a
fill fraction per replica, a few hot outliers) so that every branch of a rescheduling round
(memory guard, overflow delay, balancing) has something to do.
"""

from __future__ import annotations

import numpy as np

from ares_jax.scheduler.state import ClusterSnapshot, PendingDispatch, RequestTable

# Llama-3.1-8B on one H100 SXM at 0.9 utilisation (docs/SIMULATOR.md, "Memory facts").
H100_8B_CAPACITY = 456_504


def random_snapshot(
    rng: np.random.Generator,
    replicas: int,
    per_replica: int,
    *,
    capacity: int = H100_8B_CAPACITY,
    page_size: int = 16,
    fill: tuple[float, float] = (0.5, 0.7),
    hot_fraction: float = 0.05,
    hot_fill: tuple[float, float] = (0.9, 1.3),
    pending: int = 0,
    idle_fraction: float = 0.05,
    nan_fraction: float = 0.05,
    migrating_fraction: float = 0.02,
    cooled_fraction: float = 0.05,
    now: float = 100.0,
) -> ClusterSnapshot:
    """A snapshot of ``replicas`` decode replicas with about ``per_replica`` running requests
    each (a replica's batch is drawn around it; ``idle_fraction`` of replicas are empty).

    ``fill`` bounds each replica's predicted peak KV over its capacity, by scaling the
    requests' KV; ``hot_fraction`` of the replicas draw from ``hot_fill`` instead (outliers:
    above 1 the memory guard has work, and they stand out of the balancing noise gate).
    ``pending`` requests wait for dispatch.
    Request ids are ints, unique across the snapshot.
    """
    batch = rng.integers(per_replica // 2, per_replica * 3 // 2 + 1, size=replicas)
    batch[rng.random(replicas) < idle_fraction] = 0
    n = int(batch.sum())
    rep = np.repeat(np.arange(replicas, dtype=np.int64), batch)
    generated = rng.integers(1, 4000, size=n)
    prompt = np.exp(rng.normal(6.5, 1.0, size=n)).astype(np.int64) + 16
    true_remaining = np.exp(rng.normal(6.8, 1.2, size=n)).astype(np.int64) + 1
    # Scale each replica's KV now so that it plus its growth over the horizon (2048 steps)
    # lands near the replica's fill target: the predicted peak is about that sum.
    hot = rng.random(replicas) < hot_fraction
    target = np.where(hot, rng.uniform(*hot_fill, size=replicas),
                      rng.uniform(*fill, size=replicas)) * capacity
    growth = np.bincount(rep, weights=np.minimum(true_remaining, 2048), minlength=replicas)
    raw = np.bincount(rep, weights=prompt + generated, minlength=replicas)
    scale = np.maximum(target - growth, 0.1 * target) / np.maximum(raw, 1.0)
    kv = np.maximum((prompt + generated) * scale[rep], 1.0).astype(np.int64)
    max_tokens = generated + true_remaining + rng.integers(0, 2000, size=n)
    noise = np.exp(rng.normal(0.0, 0.6, size=n))
    predicted = np.maximum(true_remaining * noise, 1.0)
    predicted[rng.random(n) < nan_fraction] = np.nan
    migrating = rng.random(n) < migrating_fraction
    last = np.full(n, -np.inf)
    cooled = rng.random(n) < cooled_fraction
    last[cooled] = now - rng.uniform(0.0, 20.0, size=int(cooled.sum()))  # some still cooling
    table = RequestTable(
        request_ids=np.arange(n, dtype=np.int64), replica=rep, generated_tokens=generated,
        kv_tokens=kv, max_tokens=max_tokens, predicted_remaining=predicted,
        true_remaining=true_remaining.astype(np.float64), migrating=migrating,
        last_migrated_at=last,
    )
    running_kv = np.bincount(rep, weights=kv, minlength=replicas).astype(np.int64)
    pages = np.bincount(rep, weights=-(-kv // page_size) * page_size,
                        minlength=replicas).astype(np.int64)
    # Transfers in flight and queued requests: up to a few percent of the pool.
    reserved = rng.integers(0, 4, size=replicas) * rng.integers(0, capacity // 200 + 1,
                                                                size=replicas)
    queued_count = rng.integers(0, 3, size=replicas) * (batch > 0)
    queued_kv = queued_count * rng.integers(capacity // 5000 + 1, capacity // 150 + 2,
                                            size=replicas)
    pend = tuple(
        PendingDispatch(
            request_id=n + i, kv_tokens=int(rng.integers(16, 8000)), generated_tokens=1,
            max_tokens=32768,
            predicted_remaining=None if rng.random() < nan_fraction
            else float(np.exp(rng.normal(6.8, 1.2))),
            true_remaining=int(np.exp(rng.normal(6.8, 1.2))) + 1,
        )
        for i in range(pending)
    )
    return ClusterSnapshot(
        now=now, replica_ids=np.arange(100, 100 + replicas, dtype=np.int64),
        page_size=page_size, kv_capacity_tokens=np.full(replicas, capacity, np.int64),
        used_tokens=pages + reserved, running_kv_tokens=running_kv,
        batch_size=batch.astype(np.int64), queued_kv_tokens=queued_kv.astype(np.int64),
        queued_count=queued_count.astype(np.int64), requests=table, pending=pend,
    )
