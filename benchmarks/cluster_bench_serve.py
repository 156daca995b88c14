"""``ares-jax bench serve`` against the local multi-process cluster, one policy after another.

Starts ``ares-jax serve`` (a scheduler with its HTTP front door, 1 prefill + N decode replica
processes), warms it up, then for each policy switches the idle cluster to it
(``Client.configure``) and replays the same ShareGPT stream at the same Poisson send times
through ``ares_jax.bench.run_benchmark``. Prints one JSON object per run (the bench report
plus the cluster's migration and preemption counts over the run). With ``--rounds N`` the
policies take turns N times (static, ares, static, ares, ...), so that drifting background
load hits every policy alike, and a last JSON object gives each policy's median over the
rounds and its ratio to the first policy's.

    .venv/bin/python benchmarks/cluster_bench_serve.py --policies static,least-load,llumnix,ares
    .venv/bin/python benchmarks/cluster_bench_serve.py --policies static,least-load,ares --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics

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
    ap.add_argument("--rounds", type=int, default=1, help="turns each policy takes")
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
        policies = args.policies.split(",")
        runs: dict[str, list[dict]] = {p: [] for p in policies}
        for round_ in range(args.rounds):
            for policy in policies:
                cluster.client.configure(policy)
                before = cluster.client.stats()["counters"]
                report = run_benchmark(cfg, requests=requests, arrival_s=send_at)
                after = cluster.client.stats()["counters"]
                delta = {k: int(after.get(k, 0)) - int(before.get(k, 0))
                         for k in ("migrations_committed", "migrations_aborted",
                                   "migration_bytes", "preemptions", "fallback_dispatches")}
                row = {"policy": policy, "round": round_, **{k: report.get(k) for k in KEYS},
                       **delta}
                runs[policy].append(row)
                print(json.dumps(row), flush=True)
    if args.rounds > 1:
        print(json.dumps(summary(runs, policies[0])), flush=True)


def summary(runs: dict[str, list[dict]], reference: str) -> dict:
    """Each policy's median over its rounds, and its ratio to ``reference``'s median."""
    medians = {p: {k: statistics.median(r[k] for r in rows)
                   for k in KEYS if all(r.get(k) is not None for r in rows)}
               for p, rows in runs.items()}
    ratios = {p: {k: v / medians[reference][k] for k, v in m.items()
                  if medians[reference].get(k)}
              for p, m in medians.items() if p != reference}
    return {"medians": medians, f"ratio_to_{reference}": ratios}


if __name__ == "__main__":
    main()
