"""Simulator speed: 256 decode replicas, 100,000 ServeGen-R1 requests (target: < 60 s).

    .venv/bin/python benchmarks/sim_speed.py [--policy static,ares] [--requests 100000]
"""

from __future__ import annotations

import argparse
import json
import time

from ares_jax.sim import SimClusterConfig, SimConfig, WorkloadConfig, load_workload, simulate
from ares_jax.sim.metrics import summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policy", default="static,ares")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--decode-replicas", type=int, default=256)
    parser.add_argument("--prefill-replicas", type=int, default=64)
    parser.add_argument("--rate", type=float, default=600.0)
    args = parser.parse_args()
    start = time.perf_counter()
    workload = load_workload(WorkloadConfig(name="servegen-r1", num_requests=args.requests,
                                            rate=args.rate))
    load_s = time.perf_counter() - start
    cfg = SimConfig(cluster=SimClusterConfig(decode_replicas=args.decode_replicas,
                                          prefill_replicas=args.prefill_replicas))
    for policy in args.policy.split(","):
        t0, c0 = time.perf_counter(), time.process_time()
        summary = summarize(simulate(workload, policy, cfg), cfg.slo)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        keys = ("policy", "requests", "rate_req_s", "sim_duration_s", "tpot_ms_p50",
                "tpot_ms_p99", "ttft_s_p99", "slo_attainment", "preemptions", "migrations")
        # CPU time next to wall time: on a machine shared with other jobs it is what the
        # simulation itself cost.
        print(json.dumps({k: summary[k] for k in keys} | {"workload_load_s": round(load_s, 2),
                                                         "wall_s": round(wall, 2),
                                                         "cpu_s": round(cpu, 2)}))


if __name__ == "__main__":
    main()
