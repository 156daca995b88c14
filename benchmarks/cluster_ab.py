"""End-to-end A/B on the in-process disaggregated cluster: one ShareGPT-derived request stream
replayed under each policy, side by side in one run.

Run (repository root)::

    .venv/bin/python benchmarks/cluster_ab.py > /tmp/cluster_ab.json
    .venv/bin/python benchmarks/cluster_ab.py --requests 12 --max-tokens 96 --rounds 1   # quick

Policies run in interleaved rounds (static, ares, static, ares, ...) after one warm-up replay,
so that drifting background load on a shared machine hits both alike. Prints one JSON object:
every run, and per policy the median over rounds of each metric and its ratio to static.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

from ares_jax import LLM  # noqa: E402
from ares_jax.cluster import ClusterConfig  # noqa: E402
from ares_jax.cluster.stream import StreamConfig, compare  # noqa: E402
from ares_jax.engine.types import EngineConfig  # noqa: E402

METRICS = ("replica_tpot_ms_p50", "replica_tpot_ms_p99", "wall_tpot_ms_p50", "wall_tpot_ms_p99",
           "ttft_ms_p50", "ttft_ms_p99", "throughput_tok_s", "preemptions",
           "migrations_committed", "migration_bytes")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--pages", type=int, default=64, help="KV pages per decode replica")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--policies", default="static,least-load,llumnix,ares")
    ap.add_argument("--no-predictor", action="store_true")
    args = ap.parse_args(argv)

    llm = LLM(max_model_len=1024, predictor=None if args.no_predictor else "default")
    cluster = ClusterConfig(reschedule_every=2)
    engine = EngineConfig(max_num_seqs=16, num_pages=args.pages, max_model_len=1024)
    stream = StreamConfig(num_requests=args.requests, max_tokens=args.max_tokens,
                          mean_arrival_iters=1.0)
    names = args.policies.split(",")
    runs = compare(llm.model, cluster, engine, stream, [(p, None) for p in names] * args.rounds,
                   make_head=lambda: llm.head)
    summary = {}
    for name in names:
        mine = [r for r in runs if r["policy"] == name]
        summary[name] = {k: statistics.median(r[k] for r in mine) for k in METRICS}
    base = summary.get("static")
    if base:
        for s in summary.values():
            s["vs_static"] = {k: round(s[k] / base[k], 3) for k in METRICS if base[k]}
    json.dump({"predictor": llm.head is not None, "stream": vars(args), "summary": summary,
               "runs": runs}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
