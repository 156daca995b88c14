"""Cost of building the policies' snapshot from live replica loads (``cluster/snapshot.py``).

Simulated decode replicas (the real ``SlotTable`` bookkeeping, no model) are filled with
requests; the scheduler core then builds its columnar snapshot from their loads, with and
without the request table, and with some requests marked as recently migrated. Prints JSON:
median and p90 milliseconds per build over ``--rounds``.

    .venv/bin/python benchmarks/snapshot_build.py --replicas 256 --requests 128
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ares_jax.cluster import ClusterConfig, ClusterCore
from ares_jax.engine.sampling import SamplingParams, TokenInfo
from ares_jax.engine.types import Request
from ares_jax.replica.simulated import SimulatedDecodeReplica, SimulatedPrefillReplica
from ares_jax.replica.types import Prefilled


def build_core(replicas: int, requests: int, page_size: int = 16) -> ClusterCore:
    kw = dict(page_size=page_size, max_model_len=8192, kv_bytes_per_token=1024)
    decode = [SimulatedDecodeReplica(i, num_pages=requests * 40, max_num_seqs=requests, **kw,
                                     predict=lambda g, m: (m - g).astype(np.float64))
              for i in range(replicas)]
    prefill = SimulatedPrefillReplica(replicas, **kw)
    core = ClusterCore([prefill], decode, None, vocab_size=1000,
                       cluster=ClusterConfig(policy="ares"))
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=2048, ignore_eos=True)
    for h in decode:
        for j in range(requests):
            rid = f"r{h.info.replica_id}-{j}"
            n = int(rng.integers(16, 512))
            req = Request(request_id=rid, prompt_ids=[5] * n, params=params)
            h.insert(req, Prefilled(replica_id=replicas, request_id=rid, first=TokenInfo(7),
                                    num_tokens=n, predicted_remaining=float(rng.integers(1, 900)),
                                    finish_reason=None, stop_reason=None, kv=None))
            core.location[rid] = h.info.replica_id
        h.poll()
    # A few requests migrated recently: the snapshot marks them (cool-downs).
    for rid in list(core.location)[:: max(1, len(core.location) // 64)]:
        core.last_migrated[rid] = 0.0
    return core


def timed(fn, rounds: int) -> dict:
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": round(float(np.median(samples)), 3),
            "p90_ms": round(float(np.percentile(samples, 90)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--replicas", type=int, default=256)
    ap.add_argument("--requests", type=int, default=128, help="running requests per replica")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    core = build_core(args.replicas, args.requests)
    from ares_jax.cluster.snapshot import build_snapshot

    def loads():
        return {h.info.replica_id: h.load() for h in core.decode}

    ld = loads()
    print(json.dumps({
        "replicas": args.replicas, "requests_per_replica": args.requests,
        "loads": timed(loads, args.rounds),
        "snapshot_from_loads": timed(lambda: build_snapshot(core, ld, (), with_table=True),
                                     args.rounds),
        "snapshot_aggregates_only": timed(
            lambda: build_snapshot(core, ld, (), with_table=False), args.rounds),
        "loads_plus_snapshot": timed(lambda: build_snapshot(core, loads(), (),
                                                            with_table=True), args.rounds),
    }))


if __name__ == "__main__":
    main()
