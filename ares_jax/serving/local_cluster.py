"""``LocalCluster``: start ``ares-jax serve`` as a child process, wait until it serves, and
stop it with nothing left behind. Used by the demo, tests and benchmarks.

    with LocalCluster(["--model", "random:tiny", "--decode-replicas", "2"]) as cluster:
        cluster.client.generate([[5, 6, 7]], SamplingParams(max_tokens=8))
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from ares_jax.client import Client


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


class LocalCluster:
    def __init__(self, serve_args: Sequence[str], *, start_timeout_s: float = 600.0,
                 echo: bool = False) -> None:
        self.grpc_port = free_port()
        self.http_port: int | None = None
        args = list(serve_args)
        if "--port" in args:
            self.http_port = int(args[args.index("--port") + 1])
        cmd = [sys.executable, "-m", "ares_jax.cli", "serve", "--grpc-port",
               str(self.grpc_port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if echo and not line.startswith("ares-jax serving"):
                print(line, end="", flush=True)
            if line.startswith("ares-jax serving"):
                break
        if not self.lines or not self.lines[-1].startswith("ares-jax serving"):
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("ares-jax serve did not start:\n" + "".join(self.lines[-40:]))
        self.banner = self.lines[-1].strip()
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.client = Client(self.address, timeout_s=600)
        self.pids = [r["process_id"] for r in self.client.stats()["replicas"]]

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, timeout_s: float = 60.0) -> str:
        """SIGTERM the cluster; returns its remaining output. Raises if a replica process
        outlives it."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        left = [pid for pid in self.pids if process_alive(pid)]
        if left:
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            raise RuntimeError(f"replica processes outlived the cluster: {left}")
        return out


class Processes:
    """A scheduler and replica processes started one by one (``ares-jax scheduler`` and
    ``ares-jax replica``), so a test can stop, kill or restart any of them; each writes its log
    to ``log_dir``. ``close`` stops what is left and says which outlived SIGTERM."""

    def __init__(self, log_dir) -> None:
        from pathlib import Path

        self.log_dir = Path(log_dir)
        self.procs: dict[str, subprocess.Popen] = {}
        self.killed: set[str] = set()  # by kill(): their exit is no surprise

    def start(self, name: str, argv: Sequence[str], prefix: Sequence[str] = ()
              ) -> subprocess.Popen:
        """``prefix`` runs the command through another (``ip netns exec NS``)."""
        out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the child
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "ares_jax.cli", *argv],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env)
        out.close()
        self.procs[name] = proc
        return proc

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.procs[name].pid, sig)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        self.killed.add(name)
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def raise_if_exited(self) -> None:
        """``RuntimeError`` with its log if a process exited that ``kill`` did not stop."""
        for name, proc in self.procs.items():
            if name not in self.killed and proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.log(name)}")

    def log(self, name: str, lines: int = 30) -> str:
        text = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def close(self, timeout_s: float = 20.0) -> list[str]:
        """SIGCONT then SIGTERM every process still running, SIGKILL after ``timeout_s``;
        returns the names of those that needed SIGKILL."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        stubborn = []
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                stubborn.append(name)
        return stubborn
