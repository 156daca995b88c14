"""``ares-jax bench serve`` against the local multi-process cluster, one policy after another.

Starts ``ares-jax serve`` (a scheduler with its HTTP front door, 1 prefill + N decode replica
processes), warms it up, then for each policy switches the idle cluster to it
(``Client.configure``) and replays the same ShareGPT stream at the same Poisson send times
through ``ares_jax.bench.run_benchmark``. Prints one JSON object per policy (the bench report
plus the cluster's migration and preemption counts over the run).

    .venv/bin/python benchmarks/cluster_bench_serve.py --policies static,least-load,llumnix,ares
"""

from __future__ import annotations

import argparse
import json

from ares_jax.bench import BenchConfig, run_benchmark
from ares_jax.demo import stream_requests
from ares_jax.serving.local_cluster import LocalCluster, free_port

KEYS = ("completed", "failed", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
        "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms", "output_throughput",
        "request_throughput")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--policies", default="static,least-load,llumnix,ares")
    ap.add_argument("--decode-replicas", type=int, default=3)
    ap.add_argument("--num-pages", type=int, default=48, help="KV pages per decode replica")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--mean-arrival-s", type=float, default=0.25)
    args = ap.parse_args()
    port = free_port()
    serve = ["--model", args.model, "--prefill-replicas", "1",
             "--decode-replicas", str(args.decode_replicas), "--max-model-len", "1024",
             "--max-num-seqs", "16", "--num-pages", str(args.num_pages),
             "--reschedule-every", "2", "--port", str(port), "--log-level", "WARNING"]
    requests, send_at = stream_requests(args.model, args.requests, args.max_tokens,
                                        args.mean_arrival_s)
    with LocalCluster(serve) as cluster:
        cfg = BenchConfig(base_url=f"http://127.0.0.1:{port}", temperature=0.0,
                          num_prompts=len(requests), disable_tqdm=True)
        run_benchmark(cfg, requests=requests[:4])  # compile what the stream needs
        for policy in args.policies.split(","):
            cluster.client.configure(policy)
            before = cluster.client.stats()["counters"]
            report = run_benchmark(cfg, requests=requests, arrival_s=send_at)
            after = cluster.client.stats()["counters"]
            delta = {k: int(after.get(k, 0)) - int(before.get(k, 0))
                     for k in ("migrations_committed", "migrations_aborted", "migration_bytes",
                               "preemptions", "fallback_dispatches")}
            print(json.dumps({"policy": policy, **{k: report.get(k) for k in KEYS}, **delta}),
                  flush=True)


if __name__ == "__main__":
    main()
