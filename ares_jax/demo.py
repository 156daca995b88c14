"""``make demo``: the multi-process disaggregated cluster on the embedded SmolLM2-135M-Instruct.

It starts ``ares-jax serve`` (a scheduler process with its OpenAI-compatible HTTP front door,
one prefill and three decode replica processes, KV moving between them with
``jax.experimental.transfer``), answers a few chat prompts through the ``openai`` client,
replays a short real request stream (ShareGPT first turns) through ``ares-jax bench serve``
under static round-robin dispatch and under ARES, prints the two side by side, says where the
live page and the metrics are, and shuts the cluster down with no process left behind.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ares_jax.bench import BenchConfig, SampleRequest, run_benchmark
from ares_jax.cluster.stream import StreamConfig, sharegpt_stream
from ares_jax.serving.local_cluster import LocalCluster, free_port
from ares_jax.serving.models import load_tokenizer

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for writing clean Python code.",
)
# (label, bench report key or cluster counter)
TABLE_ROWS = (
    ("TPOT p50 (ms)", "median_tpot_ms"), ("TPOT p99 (ms)", "p99_tpot_ms"),
    ("TTFT p50 (ms)", "median_ttft_ms"), ("TTFT p99 (ms)", "p99_ttft_ms"),
    ("output throughput (tok/s)", "output_throughput"), ("failed requests", "failed"),
    ("preemptions", "preemptions"), ("migrations", "migrations_committed"),
    ("KV bytes migrated", "migration_bytes"),
)


def print_table(results: list[tuple[str, dict]]) -> None:
    print("\n| metric | " + " | ".join(name for name, _ in results) + " | ratio |")
    print("|---|" + "---|" * (len(results) + 1))
    for label, key in TABLE_ROWS:
        vals = [r.get(key) for _, r in results]
        fmt = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in vals]
        ratio = f"{vals[-1] / vals[0]:.2f}x" if vals[0] else "-"
        print(f"| {label} | " + " | ".join(fmt) + f" | {ratio} |")


def stream_requests(model: str, n: int, max_tokens: int, mean_gap_s: float, seed: int = 0
                    ) -> tuple[list[SampleRequest], list[float]]:
    """ShareGPT first turns (chat template applied) and their Poisson send times."""
    tok = load_tokenizer(model)
    arrivals = sharegpt_stream(tok, StreamConfig(num_requests=n, max_tokens=max_tokens,
                                                 seed=seed))
    requests = [SampleRequest(prompt=tok.decode(a.request.prompt_ids),
                              prompt_len=len(a.request.prompt_ids), output_len=max_tokens)
                for a in arrivals]
    gaps = np.random.default_rng(seed).exponential(mean_gap_s, len(requests))
    return requests, np.concatenate([[0.0], np.cumsum(gaps)[:-1]]).tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--decode-replicas", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stream-requests", type=int, default=16)
    ap.add_argument("--stream-max-tokens", type=int, default=128)
    ap.add_argument("--mean-arrival-s", type=float, default=0.25,
                    help="mean gap between the stream's arrivals (Poisson)")
    ap.add_argument("--skip-ab", action="store_true", help="only answer the chat prompts")
    args = ap.parse_args(argv)
    from openai import OpenAI

    t0 = time.perf_counter()
    http_port = free_port()
    # Tight KV memory per decode replica (48 pages x 16 tokens) is the regime ARES targets.
    serve = ["--model", args.model, "--prefill-replicas", "1",
             "--decode-replicas", str(args.decode_replicas), "--policy", "static",
             "--max-model-len", "1024", "--max-num-seqs", "16", "--num-pages", "48",
             "--reschedule-every", "2", "--port", str(http_port), "--log-level", "WARNING"]
    print(f"starting the cluster: a scheduler, 1 prefill + {args.decode_replicas} decode "
          f"replica processes of {args.model} ...", flush=True)
    with LocalCluster(serve) as cluster:
        base = f"http://127.0.0.1:{http_port}"
        print(f"{cluster.banner}\nready in {time.perf_counter() - t0:.1f} s; replica "
              f"processes {cluster.pids}")
        api = OpenAI(base_url=f"{base}/v1", api_key="unused")
        model = api.models.list().data[0].id
        for prompt in PROMPTS:
            started = time.perf_counter()
            r = api.chat.completions.create(model=model, temperature=0.0,
                                            max_tokens=args.max_tokens,
                                            messages=[{"role": "user", "content": prompt}])
            print(f"\n>>> {prompt}\n{r.choices[0].message.content.strip()}\n"
                  f"[{r.usage.completion_tokens} tokens, {r.choices[0].finish_reason}, "
                  f"{time.perf_counter() - started:.1f} s]")
        if not args.skip_ab:
            requests, send_at = stream_requests(args.model, args.stream_requests,
                                                args.stream_max_tokens, args.mean_arrival_s)
            print(f"\nreplaying {len(requests)} ShareGPT requests (max {args.stream_max_tokens}"
                  " tokens, greedy) through ares-jax bench serve under static, then ares ...",
                  flush=True)
            cfg = BenchConfig(base_url=base, model=model, temperature=0.0,
                              num_prompts=len(requests))
            run_benchmark(cfg, requests=requests[:4])  # warm-up: compile what the stream needs
            results = []
            for policy in ("static", "ares"):
                cluster.client.configure(policy)
                before = cluster.client.stats()["counters"]
                report = run_benchmark(cfg, requests=requests, arrival_s=send_at)
                after = cluster.client.stats()["counters"]
                for key in ("preemptions", "migrations_committed", "migration_bytes"):
                    report[key] = int(after.get(key, 0)) - int(before.get(key, 0))
                results.append((policy, report))
            print_table(results)
            print("\nTPOT and TTFT as HTTP clients saw them; every replica is its own process, "
                  "and all of them share this machine's cores.")
        print(f"\nlive cluster page: {base}/   metrics: {base}/metrics   cluster JSON: "
              f"{base}/cluster (up while the demo runs)")
    print("cluster stopped; no replica process left.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
