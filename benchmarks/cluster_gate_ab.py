"""A/B of ARES's live-cluster gating on the demo's request stream: ``static``, ``ares`` as
shipped, and ``ares`` with the balancing noise gate active from 3 replicas and a 1 GB/s modelled
link (what the CPU copy path measures, docs/results_transfer.md). Interleaved rounds after a
warm-up replay; every run must produce the same tokens. Prints one JSON line per run.

    .venv/bin/python benchmarks/cluster_gate_ab.py [--rounds 2]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402

from ares_jax import LLM  # noqa: E402
from ares_jax.cluster import ClusterConfig  # noqa: E402
from ares_jax.cluster.stream import StreamConfig, compare_configs, sharegpt_stream  # noqa: E402
from ares_jax.engine.types import EngineConfig  # noqa: E402

METRICS = ("replica_tpot_ms_p50", "replica_tpot_ms_p99", "wall_tpot_ms_p99", "throughput_tok_s",
           "migrations_committed", "migrations_aborted", "preemptions")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)

    llm = LLM(max_model_len=1024, predictor="default")
    base = ClusterConfig(policy="ares", reschedule_every=2)
    gated = dataclasses.replace(
        base, link_gbytes_per_s=1.0,
        ares=dataclasses.replace(base.ares, balance_noise_min_replicas=3))
    variants = [("static", dataclasses.replace(base, policy="static")), ("ares", base),
                ("ares-gated3", gated)]
    engine = EngineConfig(max_num_seqs=16, num_pages=48, max_model_len=1024)
    arrivals = sharegpt_stream(
        llm.tokenizer, StreamConfig(num_requests=16, max_tokens=128, mean_arrival_iters=1.0))
    results = compare_configs(llm.model, variants * args.rounds, engine, arrivals,
                              make_head=lambda: llm.head)
    for i, result in enumerate(results):
        print(json.dumps({"round": i // len(variants), "policy": variants[i % len(variants)][0],
                          **{k: result[k] for k in METRICS}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
