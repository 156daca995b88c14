"""Starting processes: ``serve`` (the scheduler here, the replicas as children), and the
bodies of ``ares-jax scheduler`` and ``ares-jax replica``.

``serve`` gives each replica process its devices (``CUDA_VISIBLE_DEVICES`` slices on GPU; on
CPU one host device each, so the CPU decode kernels apply), waits until every replica has
registered, prints where it listens, and on Ctrl-C or SIGTERM stops every child: a polite
``Shutdown`` RPC first, then SIGTERM, then SIGKILL, so no process is left behind.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("ares_jax.serve")


def enable_compilation_cache() -> None:
    """Share compiled steps between processes through JAX's persistent cache: the decode
    replicas of one host compile the same programs, so all but the first load them."""
    import jax

    from ares_jax.kernels.build import cache_dir

    if os.environ.get("ARES_JAX_NO_COMPILE_CACHE"):
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def run_replica(args: argparse.Namespace, roles: list[str], group=None) -> int:
    """``group``: this process's ``DistributedSpec`` when the replica is a multi-controller
    group (``serving/multihost.py``), joined here before anything touches JAX's devices."""
    from ares_jax.serving.cli import engine_config, install_stop_handlers
    from ares_jax.serving.models import EMBEDDED, load_serving_model, resolve_head
    from ares_jax.serving.replica_server import ReplicaProcess, serve_replica
    from ares_jax.serving.transport import make_transport

    if group is not None:
        from ares_jax.launch import distributed
        from ares_jax.serving.multihost import HEARTBEAT_TIMEOUT_S

        distributed.initialize(group, timeout_s=args.distributed_timeout,
                               heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    die_with_parent()
    enable_compilation_cache()
    ecfg = engine_config(args)
    import jax

    from ares_jax.model.sharding import make_mesh

    # A group's processes each load the weights onto a device of their own first.
    model = load_serving_model(args.model, dtype=args.dtype, mesh=None if group is None
                               else make_mesh(jax.local_devices()[:1]))
    predictor = None if str(args.predictor).lower() == "none" else args.predictor
    head = resolve_head(model, predictor, embedded=args.model in (None, "", EMBEDDED),
                        engine=ecfg)
    if group is not None:
        from ares_jax.serving.multihost import serve_group

        return serve_group(args, roles, group, model, head, ecfg)
    from ares_jax.serving.replica_server import advertised

    # The KV transfer server listens where others reach this process (e.g. its address in a
    # network namespace), not on loopback.
    transport = make_transport(args.transport, args.advertise_host or advertised(args.host))
    proc = ReplicaProcess(model, roles, args.devices_per_replica, ecfg, head=head,
                          transport=transport)
    install_stop_handlers(proc.stopped)
    serve_replica(proc, scheduler=args.scheduler, host=args.host, port=args.grpc_port,
                  advertise_host=args.advertise_host)
    return 0


def _start_scheduler(args: argparse.Namespace, expect_prefill: int, expect_decode: int,
                     total: int | None = None):
    from ares_jax.serving.cli import cluster_config
    from ares_jax.serving.models import load_tokenizer, model_name
    from ares_jax.serving.scheduler_server import Scheduler, start_scheduler_server

    scheduler = Scheduler(cluster_config(args), expect_prefill=expect_prefill,
                          expect_decode=expect_decode, expect_total=total,
                          model_name=model_name(args.model, None),
                          max_waiting=args.max_waiting,
                          replica_timeout_s=args.replica_timeout)

    def tokenizer() -> None:  # slow for GGUF files: load it while replicas start
        scheduler.tokenizer = load_tokenizer(args.model)

    loading = threading.Thread(target=tokenizer, daemon=True)
    loading.start()
    server, port, _ = start_scheduler_server(scheduler, args.host, args.grpc_port)
    return scheduler, server, port, loading


def _serve_http(args: argparse.Namespace, scheduler) -> object | None:
    """The OpenAI-compatible front door on ``--port``, if asked for and installed."""
    if args.port is None:
        return None
    from ares_jax.serving.http import start_http

    return start_http(scheduler, args.host, args.port)


def run_scheduler(args: argparse.Namespace) -> int:
    from ares_jax.serving.cli import install_stop_handlers

    scheduler, server, port, loading = _start_scheduler(args, args.expect_prefill,
                                                        args.expect_decode,
                                                        total=args.expect_replicas)
    stop = threading.Event()
    install_stop_handlers(stop)
    want = (f"{args.expect_replicas} replicas" if args.expect_replicas else
            f"{args.expect_prefill} prefill + {args.expect_decode} decode replicas")
    print(f"ares-jax scheduler listening on {args.host}:{port} (gRPC); waiting for {want}",
          flush=True)
    loading.join()
    http = _serve_http(args, scheduler)
    stop.wait()
    _stop_http(http)
    scheduler.close()
    server.stop(grace=2).wait()
    return 0


def _stop_http(http) -> None:
    if http is not None:
        http.stop()


def device_plan(args: argparse.Namespace) -> tuple[str, list[dict[str, str]]]:
    """(platform, environment per replica process), prefill processes first."""
    n = args.prefill_replicas + args.decode_replicas
    platform = args.platform
    if platform == "auto":
        platform = "gpu" if _gpu_count() > 0 else "cpu"
    envs = []
    k = args.devices_per_replica
    if platform == "gpu":
        have = _gpu_count()
        if n * k > have:
            raise ValueError(f"{n} replica processes x {k} GPUs need {n * k} GPUs; "
                             f"this host has {have}")
        for i in range(n):
            envs.append({"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in
                                                          range(i * k, (i + 1) * k))})
    else:
        for _ in range(n):
            envs.append({"JAX_PLATFORMS": "cpu",
                         "XLA_FLAGS": f"--xla_force_host_platform_device_count={k}"})
    return platform, envs


def _gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def replica_command(args: argparse.Namespace, role: str, scheduler: str) -> list[str]:
    cmd = [sys.executable, "-m", "ares_jax.cli", "replica", "--role", role,
           "--scheduler", scheduler, "--host", "127.0.0.1", "--grpc-port", "0",
           "--devices-per-replica", str(args.devices_per_replica),
           "--max-num-seqs", str(args.max_num_seqs), "--page-size", str(args.page_size),
           "--predictor", str(args.predictor), "--transport", args.transport,
           "--log-level", str(args.log_level)]
    for flag, value in (("--model", args.model), ("--dtype", args.dtype),
                        ("--max-model-len", args.max_model_len),
                        ("--num-pages", args.num_pages)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


PARENT_PID_ENV = "ARES_PARENT_PID"


def die_with_parent() -> None:
    """In a replica that ``serve`` started: have the kernel SIGTERM this process when
    ``serve`` dies, even by SIGKILL, which no handler of ``serve`` can see (Linux's
    parent-death signal). Set here, by the child, because a ``preexec_fn`` would make
    ``subprocess`` fork a process that runs gRPC threads, which gRPC does not survive."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(parent):  # it died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


class Children:
    """The replica processes of ``serve``, with their logs."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        out = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives with the child
        # The child arms the parent-death signal itself (``die_with_parent``).
        env = {**os.environ, **env, PARENT_PID_ENV: str(os.getpid())}
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        self.procs.append((name, proc))

    def dead(self) -> list[str]:
        return [name for name, p in self.procs if p.poll() is not None]

    def tail(self, name: str, lines: int = 20) -> str:
        text = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout_s: float = 15.0) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout_s
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def serve(args: argparse.Namespace) -> int:
    from ares_jax.serving.cli import install_stop_handlers

    platform, envs = device_plan(args)
    scheduler, server, port, loading = _start_scheduler(
        args, args.prefill_replicas, args.decode_replicas)
    address = f"127.0.0.1:{port}"
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="ares-jax-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    children = Children(log_dir)
    stop = threading.Event()
    install_stop_handlers(stop)
    roles = ["prefill"] * args.prefill_replicas + ["decode"] * args.decode_replicas
    http = None
    try:
        for i, (role, env) in enumerate(zip(roles, envs)):
            children.start(f"{role}-{i}", replica_command(args, role, address), env)
        deadline = time.monotonic() + args.ready_timeout
        while not scheduler.ready.wait(0.2):
            dead = children.dead()
            if dead:
                raise RuntimeError(f"replica process {dead[0]} exited before registering:\n"
                                   f"{children.tail(dead[0])}")
            if stop.is_set():
                return 130
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas did not register within {args.ready_timeout} s "
                                   f"(registered: {scheduler.registered()}); logs in {log_dir}")
        loading.join()
        http = _serve_http(args, scheduler)
        print(f"ares-jax serving {scheduler.model_name} on grpc://{args.host}:{port}"
              + (f" and http://{args.host}:{args.port}" if http is not None else "")
              + f" ({args.prefill_replicas} prefill + {args.decode_replicas} decode replica "
              f"processes on {platform}, policy {args.policy}; logs in {log_dir})", flush=True)
        reported: set[str] = set()
        while not stop.wait(0.5):
            # A replica process that dies is the scheduler's to recover from (its requests are
            # recomputed elsewhere); the cluster serves on with the rest.
            for name in set(children.dead()) - reported:
                reported.add(name)
                log.error("replica process %s exited:\n%s", name, children.tail(name))
        return 0
    finally:
        _stop_http(http)
        scheduler.close()
        children.stop()
        server.stop(grace=1).wait()
        print("ares-jax: stopped; every replica process has exited", flush=True)
