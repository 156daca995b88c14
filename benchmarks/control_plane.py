"""What the multi-process control plane costs a request: the same requests through the
in-process serving loop (``ServingLoop``, what ``LLM`` runs) and through ``ares-jax serve``
(a scheduler process + 1 prefill + 1 decode replica process, over gRPC), side by side.

Both paths serve the same model (``random:tiny`` by default; ``--model embedded`` for
SmolLM2-135M) with the same engine settings, the same prompts and the same greedy sampling,
so their tokens are identical and only the control plane differs. Rounds alternate between the
two paths (A B A B ...), so the machine's load drifts over both alike.

Timing is taken where a user sees it:
- in process: ``add_request`` -> each chunk as ``step()`` returns it (``perf_counter``);
- the cluster: just before the ``Generate`` call -> each streamed message as the client reads
  it; the scheduler's own ``RequestMetrics`` (arrival -> first token, on the last message)
  split that into the client<->scheduler hop and the scheduler<->replica part.
TTFT is submit -> first token; TPOT is a request's mean gap between consecutive tokens.

Workloads: ``--concurrency`` levels (comma-separated): 1 (one request at a time: the pure
per-token overhead) and 8 (a batch arriving at once).

    python benchmarks/control_plane.py --json > control_plane.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def note(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, min(vocab, 500), size=int(rng.integers(lo, hi + 1))).tolist()
            for _ in range(n)]


def request_stats(submit: float, times: list[float]) -> dict[str, float | None]:
    """TTFT and mean TPOT (seconds) from a submit time and the token arrival times."""
    ttft = times[0] - submit if times else None
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return {"ttft": ttft, "tpot": tpot}


# ====================================================================== in process


class InProcess:
    """The plain serving loop behind ``LLM``: one prefill and one decode engine, here."""

    def __init__(self, model_spec: str, ecfg) -> None:
        from ares_jax.cluster import ServingLoop
        from ares_jax.engine.decode import DecodeEngine
        from ares_jax.engine.prefill import PrefillEngine
        from ares_jax.serving.models import load_serving_model

        model = load_serving_model(model_spec)
        self.loop = ServingLoop(PrefillEngine(model, ecfg), [DecodeEngine(model, ecfg)],
                                model.tokenizer)
        self.vocab = model.cfg.vocab_size
        self.n = 0

    def run(self, prompts: list[list[int]], params) -> list[dict]:
        """Serve ``prompts`` arriving together; per request its timing and tokens."""
        from ares_jax.engine.types import Request

        submit, times, tokens = {}, {}, {}
        for p in prompts:
            rid = f"ip-{self.n}"
            self.n += 1
            submit[rid] = time.perf_counter()
            self.loop.add_request(Request(request_id=rid, prompt_ids=p, params=params,
                                          arrival_time=submit[rid]))
            times[rid], tokens[rid] = [], []
        while self.loop.has_work:
            chunks = self.loop.step()
            now = time.perf_counter()
            for ch in chunks:
                if ch.token_id >= 0:
                    times[ch.request_id].append(now)
                    tokens[ch.request_id].append(ch.token_id)
        out = []
        for rid in submit:
            self.loop.finished.pop(rid, None)
            out.append({**request_stats(submit[rid], times[rid]), "tokens": tokens[rid]})
        return out


# ====================================================================== the cluster


class Cluster:
    """``ares-jax serve`` with 1 prefill + 1 decode replica process, and a gRPC stub."""

    def __init__(self, model_spec: str, args: argparse.Namespace, log_dir: Path) -> None:
        import grpc

        from ares_jax.serving import ares_pb2_grpc as pb_grpc

        self.port = free_port()
        cmd = [sys.executable, "-m", "ares_jax.cli", "serve", "--model", model_spec,
               "--prefill-replicas", "1", "--decode-replicas", "1",
               "--grpc-port", str(self.port), "--predictor", "none",
               "--num-pages", str(args.num_pages), "--max-model-len", str(args.max_model_len),
               "--page-size", str(args.page_size), "--max-num-seqs", str(args.max_num_seqs),
               "--policy", "least-load", "--log-dir", str(log_dir), "--log-level", "WARNING"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line)
            if line.startswith("ares-jax serving"):
                break
        if not lines or not lines[-1].startswith("ares-jax serving"):
            self.proc.kill()
            raise RuntimeError("ares-jax serve did not start:\n" + "".join(lines[-30:]))
        # Drain the rest of its output so a full pipe never blocks it.
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.SchedulerStub(self.channel)

    def _one(self, prompt: list[int], params, out: dict) -> None:
        from ares_jax.serving import ares_pb2 as pb
        from ares_jax.serving import codec

        msg = pb.GenerateRequest(prompt_ids=prompt, params=codec.params_to_pb(params))
        times, tokens, last = [], [], None
        submit = time.perf_counter()
        for r in self.stub.Generate(msg, timeout=600):
            if r.HasField("token"):
                times.append(time.perf_counter())
                tokens.append(r.token.token_id)
            last = r
        m = last.metrics
        out.update(request_stats(submit, times), tokens=tokens,
                   sched_ttft=m.first_token_time - m.arrival_time,
                   sched_tpot=(m.token_times[-1] - m.token_times[0]) /
                   (len(m.token_times) - 1) if len(m.token_times) > 1 else None)

    def run(self, prompts: list[list[int]], params) -> list[dict]:
        outs: list[dict] = [{} for _ in prompts]
        threads = [threading.Thread(target=self._one, args=(p, params, o))
                   for p, o in zip(prompts, outs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return outs

    def close(self) -> None:
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ====================================================================== the driver


def _dist(xs: list[float]) -> dict[str, float | None]:
    a = np.asarray([x for x in xs if x is not None], np.float64) * 1e3
    if not len(a):
        return {"n": 0}
    q = np.percentile(a, [50, 90, 99])
    return {"n": int(len(a)), "mean_ms": round(float(a.mean()), 3),
            "p50_ms": round(float(q[0]), 3), "p90_ms": round(float(q[1]), 3),
            "p99_ms": round(float(q[2]), 3)}


def _compare(inproc: dict, cluster: dict) -> dict[str, float | None]:
    out = {}
    for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms"):
        a, b = inproc.get(k), cluster.get(k)
        if a is None or b is None:
            continue
        out[f"{k[:-3]}_diff_ms"] = round(b - a, 3)
        out[f"{k[:-3]}_ratio"] = round(b / a, 3) if a > 0 else None
    return out


def summarize(level: int, runs: dict[str, list[dict]]) -> dict:
    ip, cl = runs["in_process"], runs["cluster"]
    res: dict = {"concurrency": level, "requests_per_path": len(ip)}
    for metric in ("ttft", "tpot"):
        a = _dist([r[metric] for r in ip])
        b = _dist([r[metric] for r in cl])
        res[metric] = {"in_process": a, "cluster": b, "cluster_vs_in_process": _compare(a, b)}
    res["cluster_scheduler_side"] = {
        "ttft": _dist([r["sched_ttft"] for r in cl]),
        "tpot": _dist([r["sched_tpot"] for r in cl])}
    res["tokens_identical"] = all(a["tokens"] == b["tokens"] for a, b in zip(ip, cl))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:tiny", help="random:tiny | embedded | a path")
    ap.add_argument("--requests", type=int, default=16, help="requests per round and level")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per path")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--prompt-len", default="16,64", help="min,max prompt tokens")
    ap.add_argument("--page-size", type=int, default=8)
    ap.add_argument("--num-pages", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from ares_jax.engine.sampling import SamplingParams
    from ares_jax.engine.types import EngineConfig

    ecfg = EngineConfig(page_size=args.page_size, num_pages=args.num_pages,
                        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    lo, hi = (int(x) for x in args.prompt_len.split(","))
    levels = [int(c) for c in args.concurrency.split(",")]
    load0 = os.getloadavg()
    note("starting the in-process loop and the cluster ...")
    inproc = InProcess(args.model, ecfg)
    with tempfile.TemporaryDirectory(prefix="cp-logs-") as logs:
        cluster = Cluster(args.model, args, Path(logs))
        try:
            sets = {c: make_prompts(args.requests, lo, hi, inproc.vocab, seed=c) for c in levels}
            for path in (inproc, cluster):  # compile every shape the rounds will meet, on both
                for c, prompts in sets.items():
                    for i in range(0, len(prompts), c):
                        path.run(prompts[i:i + c], params)
            results = []
            for level in levels:
                prompts = sets[level]
                runs: dict[str, list[dict]] = {"in_process": [], "cluster": []}
                for rnd in range(args.rounds):
                    for name, path in (("in_process", inproc), ("cluster", cluster)):
                        for i in range(0, len(prompts), level):
                            runs[name] += path.run(prompts[i:i + level], params)
                    note(f"concurrency {level}: round {rnd + 1}/{args.rounds} done")
                res = summarize(level, runs)
                results.append(res)
                note(f"concurrency {level}: TTFT p50 {res['ttft']['in_process']['p50_ms']} -> "
                     f"{res['ttft']['cluster']['p50_ms']} ms, TPOT p50 "
                     f"{res['tpot']['in_process']['p50_ms']} -> "
                     f"{res['tpot']['cluster']['p50_ms']} ms, tokens identical: "
                     f"{res['tokens_identical']}")
        finally:
            cluster.close()
    report = {
        "benchmark": "control_plane", "model": args.model,
        "engine": {"page_size": args.page_size, "num_pages": args.num_pages,
                   "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len},
        "max_tokens": args.max_tokens, "prompt_len": [lo, hi], "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load0],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
