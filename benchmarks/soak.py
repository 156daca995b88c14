"""Soak: mixed traffic with cancellations, deadlines and a decode replica SIGKILLed, then an
audit: every request finished or failed explicitly (none lost), every page free on every
surviving replica, no orphan process.

Starts ``ares-jax serve`` (1 prefill + ``--decode-replicas`` decode processes of a tiny
random model) and runs ``--clients`` gRPC clients for ``--seconds``. Each request is, by
turns: run to the end (various lengths); cancelled by its client after a few tokens; given a
short gRPC deadline. At ``--kill-at`` seconds one decode process is SIGKILLed. A request's
outcome must be one of: finished (``length``), cancelled by its client, DEADLINE_EXCEEDED,
or RESOURCE_EXHAUSTED (refused at the door); anything else, or a request still open when
its client gives up (``--hang-s``), is counted as lost.

    .venv/bin/python benchmarks/soak.py --seconds 600

Prints one JSON object. ``tests/test_soak.py`` runs ``soak`` below for a few seconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import threading
import time

import grpc

from ares_jax.engine.sampling import SamplingParams
from ares_jax.serving import ares_pb2 as pb
from ares_jax.serving import ares_pb2_grpc as pb_grpc
from ares_jax.serving import codec

EXPLICIT = {"length", "cancelled", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}


def serve_args(decode_replicas: int, port: int | None = None) -> list[str]:
    args = ["--model", "random:tiny", "--prefill-replicas", "1",
            "--decode-replicas", str(decode_replicas), "--predictor", "none",
            "--num-pages", "96", "--max-model-len", "256", "--page-size", "8",
            "--max-num-seqs", "8", "--max-waiting", "16", "--policy", "least-load",
            "--log-level", "ERROR"]
    return args + (["--port", str(port)] if port else [])


def _one(stub, rng: random.Random, i: int, hang_s: float) -> str:
    kind = rng.choice((0, 0, 2, 3))  # 0: to the end; 2: cancelled; 3: short deadline
    max_tokens = rng.choice((8, 24, 64))
    params = SamplingParams(temperature=rng.choice((0.0, 0.8)), max_tokens=max_tokens,
                            ignore_eos=True, seed=i)
    msg = pb.GenerateRequest(prompt_ids=[rng.randrange(4, 500) for _ in range(
        rng.randrange(4, 40))], params=codec.params_to_pb(params))
    timeout = rng.uniform(0.2, 1.0) if kind == 3 else hang_s
    call = stub.Generate(msg, timeout=timeout)
    cut = rng.randrange(1, 6) if kind == 2 else None
    tokens = 0
    try:
        for r in call:
            tokens += max(1, len(r.tokens))
            if cut is not None and tokens >= cut:
                call.cancel()
                return "cancelled"
            if r.finished:
                return r.finish_reason or "finished-without-reason"
        return "stream-ended-without-finish"
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.CANCELLED and cut is not None:
            return "cancelled"
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and kind != 3:
            return "hung"  # a request that should have finished did not within hang_s
        return err.code().name


def soak(address: str, *, seconds: float, clients: int, kill_at: float | None,
         victim_pid: int | None, hang_s: float = 60.0, seed: int = 0) -> dict:
    """Traffic for ``seconds`` from ``clients`` threads; SIGKILL ``victim_pid`` at
    ``kill_at``. Returns the outcome counts (and which are not explicit)."""
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.SchedulerStub(channel)
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    t0 = time.monotonic()

    def client(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        i = c
        while time.monotonic() - t0 < seconds:
            out = _one(stub, rng, i, hang_s)
            with lock:
                outcomes[out] += 1
            i += clients

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    killed_at = None
    if kill_at is not None and victim_pid is not None:
        time.sleep(max(0.0, t0 + kill_at - time.monotonic()))
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = round(time.monotonic() - t0, 2)
    for t in threads:
        t.join(seconds + hang_s + 30)
    channel.close()
    lost = {k: v for k, v in outcomes.items() if k not in EXPLICIT}
    return {"requests": sum(outcomes.values()), "outcomes": dict(outcomes), "lost": lost,
            "killed_at_s": killed_at, "clients_stuck": sum(t.is_alive() for t in threads)}


def pages_audit(client, timeout_s: float = 30.0) -> dict:
    """Once nothing runs: the pages still used on each surviving replica (loads arrive with
    heartbeats, so this waits up to ``timeout_s`` for them to settle)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.stats()
        alive = [r for r in stats["replicas"] if r["healthy"]]
        used = {r["replica_id"]: r["kv_pages_used"] for r in alive}
        quiet = stats["running"] == 0 and stats["waiting"] == 0 and not any(used.values())
        if quiet or time.monotonic() > deadline:
            return {"running_after": stats["running"], "waiting_after": stats["waiting"],
                    "pages_used_after": used,
                    "dead_replicas": [r["replica_id"] for r in stats["replicas"]
                                      if not r["healthy"]],
                    "replica_failures": stats["counters"].get("replica_failures", 0),
                    "recovered_requests": stats["counters"].get("recovered_requests", 0)}
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--decode-replicas", type=int, default=3)
    ap.add_argument("--kill-at", type=float, default=None,
                    help="seconds into the run (default: a third of the way)")
    args = ap.parse_args()
    from ares_jax.serving.local_cluster import LocalCluster, process_alive

    t_start = time.monotonic()
    cluster = LocalCluster(serve_args(args.decode_replicas))
    try:
        decode = [r for r in cluster.client.stats()["replicas"] if r["role"] == "decode"]
        result = soak(cluster.address, seconds=args.seconds, clients=args.clients,
                      kill_at=args.kill_at if args.kill_at is not None else args.seconds / 3,
                      victim_pid=decode[0]["process_id"])
        t_audit = time.monotonic()
        audit = pages_audit(cluster.client)
        result.update(audit, audit_settle_s=round(time.monotonic() - t_audit, 2))
    finally:
        cluster.close()
    result.update(benchmark="soak", seconds=args.seconds, clients=args.clients,
                  decode_replicas=args.decode_replicas,
                  orphans=[p for p in cluster.pids if process_alive(p)],
                  wall_s=round(time.monotonic() - t_start, 1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
