"""Faults of the multi-process cluster on real processes: a scheduler and two prefill and two
decode replica processes of a tiny random model, started one by one so each can be stopped,
killed or restarted. In order (each test leaves the cluster as the next expects it):

- a decode process that stops heartbeating (SIGSTOP) is declared dead by the watchdog within
  ``--replica-timeout`` + a tick, its requests are recomputed elsewhere with identical greedy
  tokens, and once resumed (SIGCONT) it drops its stale state and rejoins, empty;
- the scheduler is SIGKILLed: its clients get UNAVAILABLE at once, the replicas drop what they
  hold once the lease runs out, re-register with a new scheduler on the same port and serve;
- a prefill process SIGKILLed with requests stuck mid-prefill: they are prefilled on the other
  one, tokens identical; with no prefill process left, requests fail with a clear error.
"""

from __future__ import annotations

import re
import signal
import threading
import time

import grpc
import pytest
from serving_support import FAULT_ECFG as ECFG
from serving_support import FAULT_ENGINE as ENGINE
from serving_support import (
    all_free,
    close_processes,
    in_process_tokens,
    random_prompt,
    settled,
    wait_for,
)

from ares_jax.client import Client
from ares_jax.engine.sampling import SamplingParams
from ares_jax.serving import ares_pb2 as pb
from ares_jax.serving import ares_pb2_grpc as pb_grpc
from ares_jax.serving.local_cluster import Processes, free_port, process_alive

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
TIMEOUT_S = 2.0  # --replica-timeout; the lease is twice this


def prompt(i: int, n: int = 12) -> list[int]:
    return random_prompt(300 + i, n)


class Cluster:
    def __init__(self, log_dir) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs = Processes(log_dir)
        self.schedulers = 0
        self.start_scheduler(prefill=2, decode=2)
        for name in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
            self.procs.start(name, ["replica", "--role", name.split("-")[0], "--scheduler",
                                    self.address, "--host", "127.0.0.1", *ENGINE])
        self.client = Client(self.address, timeout_s=120)
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        self.client.wait_ready(timeout_s, check=self.procs.raise_if_exited)

    def start_scheduler(self, *, prefill: int, decode: int) -> None:
        self.schedulers += 1
        self.procs.start(f"scheduler-{self.schedulers}", [
            "scheduler", "--host", "127.0.0.1", "--grpc-port", str(self.port),
            "--expect-prefill", str(prefill), "--expect-decode", str(decode),
            "--policy", "least-load", "--replica-timeout", str(TIMEOUT_S), *ENGINE])

    def replica(self, name: str) -> dict:
        """The stats row of the replica process ``name``."""
        pid = self.procs.pid(name)
        (row,) = [r for r in self.client.stats()["replicas"] if r["process_id"] == pid]
        return row

    def name_of(self, pid: int) -> str:
        return next(n for n, p in self.procs.procs.items() if p.pid == pid)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("fault-logs"))
    try:
        yield c
    finally:
        close_processes(c)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return lambda prompts, params=GREEDY: in_process_tokens(tiny_model, ECFG, prompts, params)


def test_silent_decode_process_declared_dead_then_rejoins_clean(cluster, reference):
    params = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)
    prompts = [prompt(i) for i in range(4)]
    outs: list = []
    t = threading.Thread(target=lambda: outs.extend(cluster.client.generate(prompts, params)))
    t.start()
    victim = wait_for(lambda: [r for r in cluster.client.stats()["replicas"]
                               if r["role"] == "decode" and r["running"] > 0],
                      60, "a decode replica running requests")[0]
    name = cluster.name_of(victim["process_id"])
    cluster.procs.signal(name, signal.SIGSTOP)
    stopped = time.monotonic()
    wait_for(lambda: not cluster.replica(name)["healthy"], 10, "the watchdog")
    detected = time.monotonic() - stopped
    t.join(timeout=120)
    assert [o.token_ids for o in outs] == reference(prompts, params)
    # Its last heartbeat came at most one interval (0.5 s) before SIGSTOP.
    assert TIMEOUT_S - 0.6 <= detected <= TIMEOUT_S + 1.0, detected
    print(f"\ndeclared dead {detected:.2f} s after SIGSTOP (timeout {TIMEOUT_S} s)")
    cluster.procs.signal(name, signal.SIGCONT)
    wait_for(lambda: cluster.replica(name)["healthy"], 30, "the resumed process to rejoin")
    stats = settled(cluster.client)
    assert all_free(stats) and stats["counters"]["replica_rejoins"] == 1
    assert stats["counters"]["replica_failures"] == 1
    assert "dropped" in cluster.procs.log(name, 200)  # its stale requests, before registering
    more = [prompt(10 + i) for i in range(4)]
    assert [o.token_ids for o in cluster.client.generate(more, GREEDY)] == reference(more)
    assert all_free(settled(cluster.client))


def replica_pages(rows: list[dict]) -> list[int]:
    """Used pages per replica, asked of each replica process directly (no scheduler)."""
    used = []
    for r in rows:
        with grpc.insecure_channel(r["address"]) as ch:
            load = pb_grpc.ReplicaStub(ch).GetLoad(pb.RequestRef(replica_id=r["replica_id"]),
                                                   timeout=10)
        used.append(load.used_pages)
    return used


def test_scheduler_restarted_replicas_release_after_lease_and_rejoin(cluster, reference):
    rows = cluster.client.stats()["replicas"]
    params = SamplingParams(temperature=0.0, max_tokens=490, ignore_eos=True)
    errors: list[BaseException] = []
    ended = threading.Event()

    def stream(i: int) -> None:
        try:
            for _ in cluster.client.stream(prompt(20 + i), params):
                pass
        except BaseException as err:  # noqa: BLE001 - what the test is about
            errors.append(err)
        ended.set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    wait_for(lambda: cluster.client.stats()["running"] == 3, 60, "3 running requests")
    # A migration's reservation on a destination, as the scheduler makes it: state no
    # request of the replica's own will ever free; only the lease does.
    (dst,) = [r for r in rows if r["role"] == "decode"][:1]
    with grpc.insecure_channel(dst["address"]) as ch:
        ack = pb_grpc.ReplicaStub(ch).Reserve(pb.ReserveRequest(
            replica_id=dst["replica_id"], request_id="stale-migration", pages=5), timeout=10)
    assert ack.ok
    sched = f"scheduler-{cluster.schedulers}"
    cluster.procs.kill(sched)
    killed = time.monotonic()
    for th in threads:
        th.join(timeout=10)
    assert time.monotonic() - killed < 10 and len(errors) == 3
    assert all(isinstance(e, ConnectionError) and "UNAVAILABLE" in str(e) for e in errors)
    assert sum(replica_pages(rows)) >= 5  # the replicas keep what they hold for now
    wait_for(lambda: sum(replica_pages(rows)) == 0, 4 * TIMEOUT_S + 5, "the lease to free pages")
    freed = time.monotonic() - killed
    print(f"\npages free {freed:.2f} s after the scheduler died (lease {2 * TIMEOUT_S} s)")
    assert freed >= 2 * TIMEOUT_S - 0.5, freed  # not before the lease
    log = cluster.procs.log(cluster.name_of(dst["process_id"]), 300).splitlines()
    # At least the stale reservation; the 3 streams too if the replica was still running
    # them when the lease ran out (they run on after their scheduler died; load decides).
    dropped = re.search(r"dropped (\d+) request", [ln for ln in log if "(the lease)" in ln][-1])
    assert dropped and 1 <= int(dropped.group(1)) <= 4, log[-5:]
    cluster.start_scheduler(prefill=2, decode=2)
    client = Client(cluster.address, timeout_s=120)
    cluster.client.close()
    cluster.client = client
    cluster.wait_ready(timeout_s=60)
    stats = client.stats()
    assert len(stats["replicas"]) == 4 and all(r["healthy"] for r in stats["replicas"])
    assert all_free(settled(client))
    more = [prompt(30 + i) for i in range(3)]
    assert [o.token_ids for o in client.generate(more, GREEDY)] == reference(more)
    assert all_free(settled(client))


def test_killed_prefill_process_requests_prefilled_on_the_other(cluster, reference):
    prefill = sorted((r for r in cluster.client.stats()["replicas"] if r["role"] == "prefill"),
                     key=lambda r: r["replica_id"])
    # The core gives a batch to the prefill replica with the fewest in flight, the first on a
    # tie: stop the first, and the first batch sticks there mid-prefill.
    name = cluster.name_of(prefill[0]["process_id"])
    cluster.procs.signal(name, signal.SIGSTOP)
    prompts = [prompt(40 + i) for i in range(3)]
    outs: list = []
    t = threading.Thread(target=lambda: outs.extend(cluster.client.generate(prompts, GREEDY)))
    t.start()
    time.sleep(1.0)
    assert t.is_alive()  # stuck on the stopped prefill replica
    cluster.procs.kill(name)
    t.join(timeout=60)
    assert [o.token_ids for o in outs] == reference(prompts)
    stats = settled(cluster.client)
    assert stats["counters"]["recovered_requests"] >= 1 and all_free(stats)
    assert not process_alive(cluster.procs.pid(name))


def test_no_prefill_process_left_fails_requests_explicitly(cluster):
    (last,) = [r for r in cluster.client.stats()["replicas"]
               if r["role"] == "prefill" and r["healthy"]]
    cluster.procs.kill(cluster.name_of(last["process_id"]))
    time.sleep(0.5)  # its stream breaks: declared dead
    (out,) = cluster.client.generate([prompt(50)], GREEDY)
    assert out.finish_reason == "error" and "no prefill replica is alive" in (out.error or "")
    assert all_free(settled(cluster.client))
