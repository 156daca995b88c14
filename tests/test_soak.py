"""A CI-sized soak on real processes: 1 prefill + 2 decode replica processes of a tiny random
model, 8 gRPC clients of mixed traffic (requests of various lengths, greedy and sampled, some
cancelled after a few tokens, some with deadlines shorter than they need) for 12 s, and one
decode process SIGKILLed a third of the way in. It must end with every request finished or
failed explicitly (none lost or hung), every page free on the surviving replicas, the
cluster still serving, and no process left behind. ``benchmarks/soak.py`` is the long one."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from ares_jax.engine.sampling import SamplingParams
from ares_jax.serving.local_cluster import LocalCluster, process_alive

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench():
    spec = importlib.util.spec_from_file_location("soak_bench", BENCH / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_soak_with_cancellations_deadlines_and_a_replica_kill_loses_nothing():
    bench = _bench()
    cluster = LocalCluster(bench.serve_args(2), start_timeout_s=300)
    try:
        decode = [r for r in cluster.client.stats()["replicas"] if r["role"] == "decode"]
        victim = decode[0]
        result = bench.soak(cluster.address, seconds=12, clients=8, kill_at=4,
                            victim_pid=victim["process_id"], hang_s=40)
        audit = bench.pages_audit(cluster.client)
        print(json.dumps({**result, **audit}))
        assert result["clients_stuck"] == 0 and not result["lost"], result
        # Every kind of ending happened (how many depends on the machine's speed).
        outcomes = result["outcomes"]
        assert all(outcomes.get(k, 0) >= 1 for k in ("length", "cancelled",
                                                       "DEADLINE_EXCEEDED")), outcomes
        assert audit["dead_replicas"] == [victim["replica_id"]]
        assert audit["replica_failures"] == 1
        assert audit["running_after"] == 0 and audit["waiting_after"] == 0, audit
        assert not any(audit["pages_used_after"].values()), audit
        assert not process_alive(victim["process_id"])
        out = cluster.client.generate([[5, 6, 7]], SamplingParams(temperature=0.0,
                                                                  max_tokens=6))[0]
        assert len(out.token_ids) == 6
    finally:
        cluster.close()  # raises if a replica process outlives the cluster
    assert not [pid for pid in cluster.pids if process_alive(pid)]
