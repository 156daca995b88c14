"""``make demo``: the multi-process disaggregated cluster on the embedded SmolLM2-135M-Instruct.

It starts ``ares-jax serve`` (a scheduler process, one prefill and three decode replica
processes, KV moving between them with ``jax.experimental.transfer``), answers a few chat
prompts through ``ares_jax.client.Client``, replays a short real request stream (ShareGPT first
turns) under static round-robin dispatch and under ARES, prints the two side by side, and shuts
the cluster down with no process left behind.
"""

from __future__ import annotations

import argparse
import time

from ares_jax.cluster.stream import StreamConfig, sharegpt_stream
from ares_jax.engine.sampling import SamplingParams
from ares_jax.serving.local_cluster import LocalCluster
from ares_jax.serving.models import load_tokenizer
from ares_jax.serving.replay import replay

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for writing clean Python code.",
)
TABLE_ROWS = (
    ("TPOT p50 (ms)", "tpot_ms_p50"), ("TPOT p99 (ms)", "tpot_ms_p99"),
    ("TTFT p50 (ms)", "ttft_ms_p50"), ("TTFT p99 (ms)", "ttft_ms_p99"),
    ("throughput (tok/s)", "throughput_tok_s"), ("preemptions", "preemptions"),
    ("migrations", "migrations_committed"), ("KV bytes migrated", "migration_bytes"),
    ("failed requests", "failed"),
)


def print_table(results: list[tuple[str, dict]]) -> None:
    print("\n| metric | " + " | ".join(name for name, _ in results) + " | ratio |")
    print("|---|" + "---|" * (len(results) + 1))
    for label, key in TABLE_ROWS:
        vals = [r[key] for _, r in results]
        ratio = f"{vals[-1] / vals[0]:.2f}x" if vals[0] else "-"
        print(f"| {label} | " + " | ".join(str(v) for v in vals) + f" | {ratio} |")


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

    t0 = time.perf_counter()
    # Tight KV memory per decode replica (48 pages x 16 tokens) is the regime ARES targets.
    serve = ["--model", args.model, "--prefill-replicas", "1",
             "--decode-replicas", str(args.decode_replicas), "--policy", "static",
             "--max-model-len", "1024", "--max-num-seqs", "16", "--num-pages", "48",
             "--reschedule-every", "2", "--log-level", "WARNING"]
    print(f"starting the cluster: 1 prefill + {args.decode_replicas} decode replica processes "
          f"of {args.model} ...", flush=True)
    with LocalCluster(serve) as cluster:
        client = cluster.client
        print(f"{cluster.banner}\nready in {time.perf_counter() - t0:.1f} s; replica "
              f"processes {cluster.pids}")
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        outs = client.chat([[{"role": "user", "content": p}] for p in PROMPTS], params)
        for prompt, out in zip(PROMPTS, outs):
            m = out.metrics
            print(f"\n>>> {prompt}\n{out.text.strip()}\n[{len(out.token_ids)} tokens, "
                  f"{out.finish_reason}, TTFT {m.ttft * 1e3:.0f} ms, TPOT "
                  f"{(m.tpot or 0) * 1e3:.1f} ms, migrations {m.num_migrations}]")
        if args.skip_ab:
            return 0
        stream = StreamConfig(num_requests=args.stream_requests,
                              max_tokens=args.stream_max_tokens, mean_arrival_iters=1.0)
        arrivals = sharegpt_stream(load_tokenizer(args.model), stream)
        print(f"\nreplaying {len(arrivals)} ShareGPT requests (max {stream.max_tokens} tokens, "
              "temperature 0.7) under static, then ares ...", flush=True)
        replay(client, arrivals[:4], seconds_per_iter=0.0, desc="warm-up")
        results, tokens = [], []
        for policy in ("static", "ares"):
            client.configure(policy)
            summary, toks = replay(client, arrivals, seconds_per_iter=args.mean_arrival_s,
                                   desc=policy)
            results.append((policy, summary))
            tokens.append(toks)
        print_table(results)
        same = tokens[0] == tokens[1]
        print(f"\nTPOT and TTFT as clients saw them; every replica is its own process, and "
              f"all share this machine's cores. Same tokens under both policies: {same}.")
    print("cluster stopped; no replica process left.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
