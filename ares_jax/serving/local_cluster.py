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
