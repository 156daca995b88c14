"""How many token events per second the scheduler process sustains, and the latency it adds.

The orchestration alone is measured: the real scheduler process (``Scheduler`` +
``SchedulerService`` + ``CoreRunner`` + ``ClusterCore``, policy ``least-load`` by default)
drives fake replica processes (``benchmarks/fake_replica.py``: the real ``Replica`` gRPC
service, no model; each process hosts many meshes) whose decode meshes stream one
``StepBatch`` of up to 32 rows per step period. Closed-loop gRPC clients (``grpc.aio``, in
``--client-procs`` processes) keep ``--concurrency`` ``Generate`` streams open.

Measured over a window after a warm-up:
- token events/s delivered to the clients (every streamed token, first tokens included);
- added latency per token: client receive time minus the fake's send stamp (carried in the
  token's ``logprob`` field as ``time.time() - epoch``, see ``fake_replica.py``), p50/p99;
- the scheduler process's CPU seconds per 1,000 tokens, split by thread (the core's runner
  thread, the replica event readers, the gRPC handler threads, gRPC's own C threads), which
  says what a core would sustain on a quiet machine;
- with ``--profile``: cProfile of the runner thread (a separate run, since profiling slows it).

Each scenario starts and stops its own processes. ``--workers`` sets the scheduler's gRPC
server: ``0`` is the stock server (``start_scheduler_server``: ``grpc.aio``, ``Generate`` an
async generator, no thread per stream); a positive number builds the synchronous
``SchedulerService`` on a thread pool of that size (one thread per open stream), the design
before the aio server, for a side-by-side comparison.

    python benchmarks/scheduler_scale.py --json > scale.json
    python benchmarks/scheduler_scale.py --scenario stock --scenario big --decode 64 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable


def note(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ====================================================================== the scheduler process


def _thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of every thread of this process, by native id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _thread_group(name: str) -> str:
    if name == "scheduler-core":
        return "runner (core)"
    if name.startswith("events-"):
        return "replica event readers"
    if name.startswith("ThreadPoolExecutor"):
        return "gRPC handlers (Generate streams)"
    if name == "MainThread":
        return "main"
    return "other python threads" if name != "?" else "native (gRPC core, no Python name)"


class ThreadCpu:
    """Per-thread CPU between ``start()`` and ``stop()``, grouped by what the thread does."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}  # by native (OS) thread id
        self.idents: dict[int, str] = {}  # by pthread id, as py-spy names threads
        self.t0: dict[int, float] = {}

    def _names(self) -> None:
        import threading as th

        for t in th.enumerate():
            if t.native_id is not None:
                self.names[t.native_id] = t.name
            if t.ident is not None:
                self.idents[t.ident] = t.name

    def start(self) -> None:
        self._names()
        self.t0 = _thread_cpu()

    def stop(self) -> dict[str, float]:
        self._names()
        t1 = _thread_cpu()
        groups: dict[str, float] = {}
        for tid, cpu in t1.items():
            g = _thread_group(self.names.get(tid, "?"))
            groups[g] = groups.get(g, 0.0) + cpu - self.t0.get(tid, 0.0)
        return {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}


def run_scheduler(args: argparse.Namespace) -> int:
    """The real scheduler process, optionally on a larger gRPC pool and under cProfile."""
    import cProfile
    import pstats
    from concurrent import futures

    import grpc

    from ares_jax.cluster.config import ClusterConfig
    from ares_jax.serving import ares_pb2_grpc as pb_grpc
    from ares_jax.serving.replica_server import GRPC_OPTIONS
    from ares_jax.serving.runner import CoreRunner
    from ares_jax.serving.scheduler_server import (
        Scheduler,
        SchedulerService,
        start_scheduler_server,
    )

    profile = cProfile.Profile() if args.profile else None
    if profile is not None:  # profile the runner thread only: wrap its loop
        original = CoreRunner._run

        def profiled(self) -> None:
            profile.enable()
            try:
                original(self)
            finally:
                profile.disable()

        CoreRunner._run = profiled  # type: ignore[method-assign]

    sched = Scheduler(ClusterConfig(policy=args.policy), expect_prefill=args.expect_prefill,
                      expect_decode=args.expect_decode, tokenizer=None, model_name="fake",
                      max_waiting=args.max_waiting)
    if args.workers <= 0:
        server, port, _ = start_scheduler_server(sched, "127.0.0.1", args.port)
    else:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers),
                             options=GRPC_OPTIONS)
        pb_grpc.add_SchedulerServicer_to_server(SchedulerService(sched), server)
        server.add_insecure_port(f"127.0.0.1:{args.port}")
        server.start()
    cpu = ThreadCpu()
    window, window_end, stop = threading.Event(), threading.Event(), threading.Event()
    # SIGUSR1 / SIGUSR2: the measured window starts / ends; SIGTERM: write the results, exit.
    signal.signal(signal.SIGUSR1, lambda *_: window.set())
    signal.signal(signal.SIGUSR2, lambda *_: window_end.set())
    # SIGTERM also ends the window, so a driver that stops early never leaves this behind.
    signal.signal(signal.SIGTERM, lambda *_: (window.set(), window_end.set(), stop.set()))
    while not window.wait(0.2):
        pass
    cpu.start()
    cpu0 = time.process_time()
    iters0 = sched.runner.iterations if sched.runner else 0
    while not window_end.wait(0.2):
        pass
    core = sched.runner.core if sched.runner else None
    out = {
        # requests on decode replicas / waiting at the window's end (read without the runner's
        # lock: two len() calls, good enough for a count)
        "running_at_end": len(core.location) if core else 0,
        "waiting_at_end": len(core.waiting) if core else 0,
        "in_flight_at_end": len(core.trackers) if core else 0,
        "threads_cpu_s": cpu.stop(),
        "thread_names": {str(k): v for k, v in {**cpu.names, **cpu.idents}.items()},
        "process_cpu_s": round(time.process_time() - cpu0, 3),
        "runner_iterations": (sched.runner.iterations if sched.runner else 0) - iters0,
    }
    while not stop.wait(0.2):
        pass
    if sched.runner is not None:
        out["counters"] = {k: int(v) for k, v in sched.runner.core.counters.items()}
    sched.close()
    if profile is not None:
        out["profile"] = _profile_rows(profile, pstats)
        profile.dump_stats(args.out + ".prof")
    Path(args.out).write_text(json.dumps(out))
    server.stop(grace=0.5).wait()
    return 0


def _profile_rows(profile, pstats, top: int = 25) -> dict[str, list]:
    """The profile's top functions by own time and by cumulative time."""
    st = pstats.Stats(profile)
    total = sum(v[2] for v in st.stats.values()) or 1.0  # type: ignore[attr-defined]
    rows = []
    for (file, line, fn), (_, calls, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(file).name}:{line}({fn})" if line else fn
        if "ares_jax" in file:
            where = f"{file.split('ares_jax/', 1)[1]}:{line}({fn})"
        rows.append((where, calls, tt, ct))
    by = lambda k: sorted(rows, key=lambda r: -r[k])[:top]  # noqa: E731
    fmt = lambda r: {"fn": r[0], "calls": r[1], "tottime_s": round(r[2], 4),  # noqa: E731
                     "cumtime_s": round(r[3], 4), "tottime_share": round(r[2] / total, 4)}
    return {"total_s": round(total, 3), "by_tottime": [fmt(r) for r in by(2)],
            "by_cumtime": [fmt(r) for r in by(3)]}


# ====================================================================== the clients


async def _client(args: argparse.Namespace) -> dict:
    import grpc
    from fake_replica import pb, pb_grpc  # a sibling: this directory is on sys.path

    channels = [grpc.aio.insecure_channel(args.address) for _ in range(args.channels)]
    stubs = [pb_grpc.SchedulerStub(c) for c in channels]
    t_start, t_end, t_stop = args.window_start, args.window_end, args.stop_at
    lat: list[float] = []
    first_lat: list[float] = []
    counts = {"tokens": 0, "requests": 0, "errors": 0, "tokens_all": 0,
              "multi_token_messages": 0}
    rng = np.random.default_rng(args.seed)

    async def loop(k: int) -> None:
        stub = stubs[k % len(stubs)]
        while time.time() < t_stop:
            msg = pb.GenerateRequest(
                prompt_ids=rng.integers(4, 500, size=args.prompt_len).tolist(),
                params=pb.SamplingParams(temperature=0.0, top_p=1.0, top_k=-1,
                                         max_tokens=args.max_tokens,
                                         ignore_eos=True))
            first = True
            try:
                async for r in stub.Generate(msg):
                    now = time.time()
                    # A message carries one token (``token``) or, when the scheduler had
                    # several for this stream in one iteration, ``tokens``.
                    toks = r.tokens or ((r.token,) if r.HasField("token") else ())
                    for t in toks:
                        counts["tokens_all"] += 1
                        if t_start <= now < t_end:
                            counts["tokens"] += 1
                            (first_lat if first else lat).append(
                                now - args.epoch - t.logprob)
                        first = False
                    if len(toks) > 1:
                        counts["multi_token_messages"] += 1
                    if now >= t_stop:
                        break
                counts["requests"] += 1
            except grpc.aio.AioRpcError as err:
                if time.time() >= t_end:
                    break  # the run is over (the clients are being stopped)
                counts["errors"] += 1
                if counts["errors"] <= 3:
                    print(f"client: {err.code().name}: {err.details()}", file=sys.stderr)
                await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(loop(k)) for k in range(args.concurrency)]
    await asyncio.sleep(max(0.0, t_stop - time.time()))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in channels:
        await c.close()
    np.save(args.out + ".lat.npy", np.asarray(lat, np.float64))
    np.save(args.out + ".first.npy", np.asarray(first_lat, np.float64))
    return counts


def run_client(args: argparse.Namespace) -> int:
    counts = asyncio.run(_client(args))
    counts["cpu_s"] = round(time.process_time(), 3)
    Path(args.out).write_text(json.dumps(counts))
    return 0


# ====================================================================== per-hop micro costs


def micro_costs(rows: int = 32, repeats: int = 7) -> dict[str, float]:
    """Microseconds per token of each Python hop a token takes through the scheduler, on one
    thread (no GIL contention, no thread handoffs): the floor the process cannot go below
    while it does this work per token. Best of ``repeats``."""
    import queue
    import timeit

    sys.path.insert(0, str(ROOT))
    from ares_jax.engine.outputs import RequestTracker
    from ares_jax.engine.sampling import SamplingParams
    from ares_jax.engine.types import Request
    from ares_jax.serving import ares_pb2 as pb
    from ares_jax.serving import codec
    from ares_jax.serving.scheduler_server import chunk_to_pb

    ids = [f"req-{i:016x}" for i in range(rows)]
    # Packed token columns, as replicas send a step without top logprobs.
    batch = pb.ReplicaEvent(stepped=pb.StepBatch(
        replica_id=3, request_ids=ids,
        token_ids=[7 + i for i in range(rows)], logprobs=[0.5] * rows,
        finish_reasons=[""] * rows, stop_reasons=[-1] * rows, elapsed_s=0.04, kv_tokens=4096,
        load=pb.Load(replica_id=3, free_pages=8000, used_pages=192, capacity_pages=8192,
                     free_slots=0, request_ids=ids, kv_tokens=[100] * rows,
                     generated=[50] * rows, max_tokens=[128] * rows)))
    wire = batch.SerializeToString()
    params = SamplingParams(temperature=0.0, max_tokens=10**6, ignore_eos=True)
    trackers = [RequestTracker(Request(request_id=r, prompt_ids=[5] * 16, params=params), None)
                for r in ids]
    ev, _ = codec.event_from_pb(batch)
    q: queue.Queue = queue.Queue()

    def per_token(fn, per: int = rows, number: int = 200) -> float:
        return round(min(timeit.repeat(fn, number=number, repeat=repeats)) / number / per
                     * 1e6, 2)

    def track() -> None:
        for t, info in zip(trackers, ev.tokens):
            t.add(info, 0.0, None, None)
            t.chunk(info)
        for t in trackers:  # keep the trackers small between repeats
            t.token_ids.clear()
            t.metrics.token_times.clear()

    chunk = trackers[0].chunk(ev.tokens[0])
    return {
        "replica_event_parse_us": per_token(lambda: pb.ReplicaEvent.FromString(wire)),
        "codec_event_from_pb_us": per_token(lambda: codec.event_from_pb(batch)),
        "tracker_add_and_chunk_us": per_token(track),
        "queue_put_get_us": per_token(lambda: (q.put(chunk), q.get()), per=1, number=20000),
        "chunk_to_pb_and_serialize_us": per_token(
            lambda: chunk_to_pb(chunk, False, []).SerializeToString(), per=1, number=20000),
    }


# ====================================================================== the driver

SCENARIOS = {
    # name: (gRPC handler threads, 0 = the stock (aio) server; policy)
    "stock": (0, "least-load"),
    # the sync server on concurrency + 64 threads (every stream gets a thread)
    "big": (-1, "least-load"),
    "big-ares": (-1, "ares"),
}


def _percentiles(x: np.ndarray) -> dict[str, float | None]:
    if not len(x):
        return {"n": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    q = np.percentile(x, [50, 90, 99]) * 1e3
    return {"n": int(len(x)), "p50_ms": round(float(q[0]), 3), "p90_ms": round(float(q[1]), 3),
            "p99_ms": round(float(q[2]), 3), "max_ms": round(float(x.max() * 1e3), 3)}


def _wait_ready(address: str, timeout_s: float) -> None:
    import grpc
    from fake_replica import pb, pb_grpc  # a sibling: this directory is on sys.path

    stub = pb_grpc.SchedulerStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if json.loads(stub.Stats(pb.StatsRequest(), timeout=5).json).get("ready"):
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the scheduler at {address} did not become ready")


def run_scenario(name: str, args: argparse.Namespace, tmp: Path, tag: str) -> dict:
    """One scenario at one concurrency: start the processes, measure, stop them."""
    workers, policy = SCENARIOS[name]
    if workers < 0:
        workers = args.concurrency + 64
    port = free_port()
    address = f"127.0.0.1:{port}"
    epoch = time.time()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_PLATFORMS": "cpu"}
    sched_out = tmp / f"{tag}-scheduler.json"
    sched_cmd = [PY, __file__, "scheduler", "--port", str(port), "--workers", str(workers),
                 "--policy", policy, "--expect-prefill", str(args.prefill),
                 "--expect-decode", str(args.decode), "--out", str(sched_out)]
    if args.profile:
        sched_cmd.append("--profile")
    procs: list[subprocess.Popen] = []
    sched = subprocess.Popen(sched_cmd, env=env, cwd=ROOT)
    try:
        per = -(-args.decode // args.replica_procs)
        left = args.decode
        for i in range(args.replica_procs):
            n = min(per, left)
            left -= n
            cmd = [PY, str(HERE / "fake_replica.py"), "--scheduler", address,
                   "--decode", str(n), "--prefill", str(args.prefill if i == 0 else 0),
                   "--step-ms", str(args.step_ms), "--max-num-seqs", str(args.rows),
                   "--epoch", repr(epoch), "--stats", str(tmp / f"{tag}-fake{i}.json")]
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT))
        _wait_ready(address, 180)
        note(f"[{tag}] ready: {args.decode} decode meshes in {args.replica_procs} processes, "
             f"{workers or 'aio server, no'} handler threads, policy {policy}")
        now = time.time()
        w0 = now + args.warmup_s
        w1 = w0 + args.duration_s
        stop_at = w1 + 0.5
        clients = []
        for c in range(args.client_procs):
            share = args.concurrency // args.client_procs + (c < args.concurrency %
                                                             args.client_procs)
            cmd = [PY, __file__, "client", "--address", address, "--concurrency", str(share),
                   "--max-tokens", str(args.max_tokens), "--prompt-len", str(args.prompt_len),
                   "--epoch", repr(epoch), "--window-start", repr(w0), "--window-end", repr(w1),
                   "--stop-at", repr(stop_at), "--seed", str(c),
                   "--out", str(tmp / f"{tag}-client{c}.json")]
            clients.append(subprocess.Popen(cmd, env=env, cwd=ROOT))
        time.sleep(max(0.0, w0 - time.time()))
        load0 = os.getloadavg()
        sched.send_signal(signal.SIGUSR1)
        spy = _start_py_spy(args, sched.pid, tmp / f"{tag}-py-spy.txt")
        time.sleep(max(0.0, w1 - time.time()))
        if spy is not None:
            _finish_py_spy(spy, args.duration_s)
        sched.send_signal(signal.SIGUSR2)
        load1 = os.getloadavg()
        for c in clients:
            c.wait(timeout=120)
        sched.send_signal(signal.SIGTERM)
        sched.wait(timeout=120)
    finally:
        for p in [sched, *procs]:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    return _collect(name, tag, args, tmp, workers or 64, policy, (load0, load1))


def _start_py_spy(args: argparse.Namespace, pid: int, out: Path) -> subprocess.Popen | None:
    """Sample every thread of the scheduler process over the window (py-spy, if present)."""
    exe = args.py_spy or shutil.which("py-spy")
    if not exe:
        return None
    # Blocking mode (the process is paused per sample): py-spy then tells a thread waiting in C
    # (a lock, gRPC's completion queue) from one running, so idle waits are left out.
    cmd = [exe, "record", "--format", "raw", "--rate", str(args.py_spy_rate), "--threads",
           "--duration", str(int(args.duration_s)), "--pid", str(pid), "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _finish_py_spy(spy: subprocess.Popen, duration_s: float) -> None:
    """Let py-spy write its samples; one that overruns is interrupted (it writes on SIGINT)."""
    try:
        spy.wait(timeout=duration_s + 30)
    except subprocess.TimeoutExpired:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=15)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def _py_spy_summary(path: Path, names: dict[str, str], top: int = 20) -> dict | None:
    """py-spy's raw stacks -> samples per thread group, and per group the functions with the
    most samples on top of the stack (self) and anywhere in it (inclusive)."""
    if not path.exists():
        return None
    groups: dict[str, dict] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        # "thread (<native id>): <python name>", the name only when py-spy could read it
        head, _, name = frames[0].partition("): ")
        tid = head.rpartition("(")[2]
        name = name or names.get(tid, "?")
        g = groups.setdefault(_thread_group(name), {"samples": 0, "self": {}, "inclusive": {}})
        g["samples"] += count
        total += count
        funcs = [_frame(f) for f in frames[1:]]
        if funcs:
            g["self"][funcs[-1]] = g["self"].get(funcs[-1], 0) + count
        for f in set(funcs):
            g["inclusive"][f] = g["inclusive"].get(f, 0) + count

    def ranked(d: dict[str, int]) -> list[list]:
        return [[f, n, round(n / total, 4)] for f, n in
                sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "groups": {
        k: {"samples": g["samples"], "share": round(g["samples"] / max(total, 1), 4),
            "self": ranked(g["self"]), "inclusive": ranked(g["inclusive"])}
        for k, g in sorted(groups.items(), key=lambda kv: -kv[1]["samples"])}}


def _frame(frame: str) -> str:
    """``fn (path/file.py:123)`` -> ``fn (file.py)``: one entry per function."""
    fn, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    file = file.split("ares_jax/", 1)[1] if "ares_jax/" in file else Path(file).name
    return f"{fn} ({file})"


def _collect(name: str, tag: str, args: argparse.Namespace, tmp: Path, workers: int,
             policy: str, loads: tuple) -> dict:
    counts = {"tokens": 0, "requests": 0, "errors": 0, "cpu_s": 0.0}
    lat, first = [], []
    for c in range(args.client_procs):
        base = tmp / f"{tag}-client{c}.json"
        for k, v in json.loads(base.read_text()).items():
            counts[k] = counts.get(k, 0) + v
        lat.append(np.load(str(base) + ".lat.npy"))
        first.append(np.load(str(base) + ".first.npy"))
    lat_a, first_a = np.concatenate(lat), np.concatenate(first)
    sched = json.loads((tmp / f"{tag}-scheduler.json").read_text())
    fakes = [json.loads(p.read_text()) for p in sorted(tmp.glob(f"{tag}-fake*.json"))]
    tokens = counts["tokens"]
    rate = tokens / args.duration_s
    # what the fakes would send with every open stream running (capped by the slots)
    offered = min(args.concurrency, args.decode * args.rows) / (args.step_ms / 1e3)
    cpu_per_1k = sched["process_cpu_s"] / tokens * 1e3 if tokens else None
    res = {
        "scenario": name, "policy": policy, "grpc_handler_threads": workers,
        "decode_replicas": args.decode, "replica_processes": args.replica_procs,
        "rows_per_batch": args.rows, "step_ms": args.step_ms,
        "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "offered_tokens_per_s": round(offered),
        "token_events_per_s": round(rate),
        "requests_finished": counts["requests"], "client_errors": counts["errors"],
        # messages that carried several tokens of one stream (a stream behind the core)
        "multi_token_messages": counts.get("multi_token_messages", 0),
        "added_latency_decode": _percentiles(lat_a),
        "added_latency_first_token": _percentiles(first_a),
        "added_latency_all": _percentiles(np.concatenate([lat_a, first_a])),
        "scheduler_cpu_s": sched["process_cpu_s"],
        "scheduler_cpu_s_per_1k_tokens": None if cpu_per_1k is None else round(cpu_per_1k, 4),
        "one_core_ceiling_tokens_per_s": None if not cpu_per_1k else round(1e3 / cpu_per_1k),
        "scheduler_threads_cpu_s": sched["threads_cpu_s"],
        "runner_iterations": sched["runner_iterations"],
        "running_at_end": sched.get("running_at_end"),
        "waiting_at_end": sched.get("waiting_at_end"),
        "in_flight_at_end": sched.get("in_flight_at_end"),
        "scheduler_counters": sched.get("counters", {}),
        "client_cpu_s": counts["cpu_s"],
        "fake_replica_cpu_s": round(sum(f["cpu_s"] for f in fakes), 3),
        "fake_steps": sum(f["steps"] for f in fakes),
        "loadavg_window": [round(loads[0][0], 2), round(loads[1][0], 2)],
    }
    if "profile" in sched:
        res["runner_profile"] = sched["profile"]
    raw = tmp / f"{tag}-py-spy.txt"
    spy = _py_spy_summary(raw, sched.get("thread_names", {}))
    if args.keep_dir and raw.exists():
        Path(args.keep_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(raw, Path(args.keep_dir) / raw.name)
    if spy is not None:
        res["py_spy"] = spy
    note(f"[{tag}] {rate:,.0f} token events/s (offered {offered:,.0f}); added latency "
         f"p50 {res['added_latency_all']['p50_ms']} ms p99 {res['added_latency_all']['p99_ms']} "
         f"ms; scheduler {res['scheduler_cpu_s_per_1k_tokens']} CPU s / 1k tokens; "
         f"running {res['running_at_end']}, waiting {res['waiting_at_end']}; "
         f"load {res['loadavg_window']}")
    return res


def run_driver(args: argparse.Namespace) -> int:
    scenarios = args.scenario if args.scenario is not None else ["stock", "big"]
    full = args.decode * args.rows + args.decode * args.rows // 8  # every slot kept busy
    levels = [int(c) for c in args.concurrency.split(",")] if args.concurrency else [full]
    micro = micro_costs(args.rows) if args.micro else None  # first: a quiet process
    if micro is not None:
        note(f"micro costs, us per token: {micro}")
    results = []
    with tempfile.TemporaryDirectory(prefix="sched-scale-") as tmp:
        for name in scenarios:
            for level in levels:
                run = argparse.Namespace(**{**vars(args), "concurrency": level})
                tag = f"{name}-c{level}"
                results.append(run_scenario(name, run, Path(tmp), tag))
    report = {
        "benchmark": "scheduler_scale",
        "micro_costs_us_per_token": micro,
        "machine": {"cpus": os.cpu_count(), "loadavg_end": [round(x, 2) for x in
                                                              os.getloadavg()],
                    "python": sys.version.split()[0]},
        "target": {"token_events_per_s": 50000, "p99_added_latency_ms": 5.0,
                   "decode_replicas": 64, "rows_per_batch": 32},
        "warmup_s": args.warmup_s, "window_s": args.duration_s,
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    s = sub.add_parser("scheduler")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--workers", type=int, default=0)
    s.add_argument("--policy", default="least-load")
    s.add_argument("--expect-prefill", type=int, default=1)
    s.add_argument("--expect-decode", type=int, default=64)
    s.add_argument("--max-waiting", type=int, default=1024)
    s.add_argument("--profile", action="store_true")
    s.add_argument("--out", required=True)
    c = sub.add_parser("client")
    c.add_argument("--address", required=True)
    c.add_argument("--concurrency", type=int, required=True)
    c.add_argument("--channels", type=int, default=4)
    c.add_argument("--max-tokens", type=int, default=128)
    c.add_argument("--prompt-len", type=int, default=16)
    c.add_argument("--epoch", type=float, required=True)
    c.add_argument("--window-start", type=float, required=True)
    c.add_argument("--window-end", type=float, required=True)
    c.add_argument("--stop-at", type=float, required=True)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True)
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                    help="repeatable; default: stock, big (none with --micro-only)")
    ap.add_argument("--micro-only", action="store_true", help="only the per-hop micro costs")
    ap.add_argument("--decode", type=int, default=64, help="fake decode replicas (meshes)")
    ap.add_argument("--prefill", type=int, default=1, help="fake prefill replicas")
    ap.add_argument("--replica-procs", type=int, default=8,
                    help="fake replica processes the meshes are spread over")
    ap.add_argument("--rows", type=int, default=32, help="rows per decode batch (slots)")
    ap.add_argument("--step-ms", type=float, default=40.0)
    ap.add_argument("--concurrency", default="",
                    help="open Generate streams, comma-separated levels to sweep (default: "
                         "decode x rows x 1.125, every slot busy)")
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--warmup-s", type=float, default=8.0)
    ap.add_argument("--duration-s", type=float, default=15.0)
    ap.add_argument("--profile", action="store_true",
                    help="cProfile the scheduler's runner thread (slows it: a separate run)")
    ap.add_argument("--py-spy", default=None,
                    help="py-spy executable to sample the scheduler process with over the "
                         "window (default: py-spy on PATH, if any)")
    ap.add_argument("--micro", action="store_true",
                    help="also time each per-token hop on one thread (micro_costs)")
    ap.add_argument("--keep-dir", default=None, help="keep py-spy's raw stacks here")
    ap.add_argument("--py-spy-rate", type=int, default=50, help="py-spy samples per second")
    ap.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    args = ap.parse_args(argv)
    if args.cmd == "scheduler":
        return run_scheduler(args)
    if args.cmd == "client":
        return run_client(args)
    if args.micro_only:
        args.scenario, args.micro = [], True
    return run_driver(args)


if __name__ == "__main__":
    raise SystemExit(main())
