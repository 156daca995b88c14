"""A fake replica process for scheduler benchmarks: the real ``Replica`` gRPC service with no
model behind it.

One process hosts many fake meshes (one ``Register`` with many ``MeshInfo``s: one replica id
per mesh), so 64 decode replicas do not need 64 Python processes on a small machine. It does
just enough for the real scheduler (``ares_jax.serving.scheduler_server``):

- ``Prefill`` answers each request at once with a ``Prefilled`` event (first token, and a
  ``KvBlock`` whose ticket is a dummy: nothing is ever pulled);
- ``Insert`` answers ``InsertDone`` (refused when the mesh's 32 slots are full, which the
  scheduler handles as a recompute, as with a real replica that raced out of room);
- every decode mesh streams one ``StepBatch`` per step period (``--step-ms``) with one row per
  running request, and finishes each request at its ``max_tokens`` (``finish_reason="length"``);
  meshes are phase-shifted so their steps spread over the period as independent replicas do;
- ``Release``/``DropKv`` forget a request; migration commands are refused (``Reserve`` says
  the pages are not free), so a migrating policy's attempts end at once.

Timing: every token's ``logprob`` field carries the fake's send time, stamped as the
``Events`` stream hands the message to gRPC: ``time.time() - epoch`` in seconds (``--epoch``,
shared with the clients; a float32 keeps ~8 us resolution for runs under ~2 minutes). A client
computes the orchestration's added latency per token as its receive time minus that stamp.
Both ends are processes of this host, on one clock.

It imports only the generated protobuf modules (not jax), so it starts in well under a second.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import sys
import threading
import time
import types
from concurrent import futures
from pathlib import Path

import grpc


def _load_protos():
    """``ares_jax.serving.ares_pb2(_grpc)`` without running ``ares_jax/__init__`` (which
    imports jax: seconds of CPU per process for nothing here)."""
    root = Path(__file__).resolve().parents[1] / "ares_jax"
    if "ares_jax" not in sys.modules:
        pkg = types.ModuleType("ares_jax")
        pkg.__path__ = [str(root)]  # type: ignore[attr-defined]
        sys.modules["ares_jax"] = pkg
    from ares_jax.serving import ares_pb2, ares_pb2_grpc

    return ares_pb2, ares_pb2_grpc


pb, pb_grpc = _load_protos()

GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20)]
PAGE_SIZE = 16
CAPACITY_PAGES = 8192
MAX_MODEL_LEN = 4096
VOCAB = 512


class FakeRequest:
    """What a fake decode mesh keeps per running request."""

    __slots__ = ("rid", "generated", "max_tokens", "kv_tokens", "next_token")

    def __init__(self, rid: str, generated: int, max_tokens: int, kv_tokens: int) -> None:
        self.rid = rid
        self.generated = generated
        self.max_tokens = max_tokens
        self.kv_tokens = kv_tokens
        self.next_token = 7


class FakeMesh:
    """One fake replica: a role, and (decode) its running requests."""

    def __init__(self, role: str, max_num_seqs: int) -> None:
        self.role = role
        self.replica_id = -1
        self.max_num_seqs = max_num_seqs
        self.running: dict[str, FakeRequest] = {}

    def load(self) -> pb.Load:
        rows = list(self.running.values())
        used = sum(-(-r.kv_tokens // PAGE_SIZE) for r in rows)
        return pb.Load(replica_id=self.replica_id, free_pages=CAPACITY_PAGES - used,
                       used_pages=used, capacity_pages=CAPACITY_PAGES, reserved_pages=0,
                       free_slots=self.max_num_seqs - len(rows),
                       request_ids=[r.rid for r in rows],
                       kv_tokens=[r.kv_tokens for r in rows],
                       generated=[r.generated for r in rows],
                       max_tokens=[r.max_tokens for r in rows])


class FakeProcess:
    """The meshes of this process, its event queue and its step loop."""

    def __init__(self, roles: list[str], step_s: float, epoch: float,
                 max_num_seqs: int) -> None:
        self.meshes = [FakeMesh(r, max_num_seqs) for r in roles]
        self.by_id: dict[int, FakeMesh] = {}
        self.step_s = step_s
        self.epoch = epoch
        self.lock = threading.Lock()
        self.events: queue.Queue[pb.ReplicaEvent] = queue.Queue()
        self.stopped = threading.Event()
        self.steps = 0
        self.rows = 0

    def stamp(self) -> float:
        return time.time() - self.epoch

    def assign(self, ids: list[int]) -> None:
        with self.lock:
            for m, rid in zip(self.meshes, ids):
                m.replica_id = int(rid)
            self.by_id = {m.replica_id: m for m in self.meshes}

    def mesh_infos(self) -> list[pb.MeshInfo]:
        return [pb.MeshInfo(role=m.role, page_size=PAGE_SIZE, capacity_pages=CAPACITY_PAGES,
                            max_num_seqs=m.max_num_seqs, max_model_len=MAX_MODEL_LEN,
                            kv_bytes_per_token=1024, devices=1, vocab_size=VOCAB,
                            model="fake") for m in self.meshes]

    # ------------------------------------------------------------------ the step loop

    def run_steps(self) -> None:
        """Step each decode mesh once per period, meshes spread evenly over the period."""
        decode = [m for m in self.meshes if m.role == "decode"]
        if not decode:
            return
        start = time.monotonic()
        due = [start + self.step_s * i / len(decode) for i in range(len(decode))]
        while not self.stopped.is_set():
            i = min(range(len(decode)), key=due.__getitem__)
            delay = due[i] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            due[i] += self.step_s
            if due[i] < time.monotonic() - self.step_s:  # fell behind: do not burst to catch up
                due[i] = time.monotonic()
            msg = self._step(decode[i])
            if msg is not None:
                self.events.put(msg)

    def _step(self, m: FakeMesh) -> pb.ReplicaEvent | None:
        with self.lock:
            if not m.running:
                return None
            ids, tokens, finish = [], [], []
            for r in list(m.running.values()):
                r.generated += 1
                r.kv_tokens += 1
                ids.append(r.rid)
                tokens.append(r.next_token)
                r.next_token = (r.next_token * 31 + 1) % VOCAB
                if r.generated >= r.max_tokens:
                    finish.append("length")
                    del m.running[r.rid]  # a real replica releases finished rows itself
                else:
                    finish.append("")
            self.steps += 1
            self.rows += len(ids)
            # Packed token columns, as the real replica sends them; the logprobs are stamped
            # as the message leaves (``Events``).
            batch = pb.StepBatch(replica_id=m.replica_id, request_ids=ids, token_ids=tokens,
                                 finish_reasons=finish, stop_reasons=[-1] * len(ids),
                                 elapsed_s=self.step_s, kv_tokens=sum(
                                     r.kv_tokens for r in m.running.values()),
                                 load=m.load())
        return pb.ReplicaEvent(stepped=batch)


class FakeReplicaService(pb_grpc.ReplicaServicer):
    """The ``Replica`` service over ``FakeProcess``."""

    def __init__(self, proc: FakeProcess) -> None:
        self.p = proc

    def Events(self, request, context):
        while context.is_active() and not self.p.stopped.is_set():
            try:
                msg = self.p.events.get(timeout=0.1)
            except queue.Empty:
                continue
            # Stamp at the last moment this process touches the message, so time spent in
            # this (CPU-starved) fake's own queue is not charged to the scheduler.
            now = self.p.stamp()
            kind = msg.WhichOneof("event")
            if kind == "stepped":
                msg.stepped.logprobs[:] = [now] * len(msg.stepped.token_ids)
            elif kind == "prefilled":
                msg.prefilled.first.logprob = now
            yield msg

    def Prefill(self, request, context):
        for r in request.requests:
            first = pb.TokenInfo(token_id=5, logprob=self.p.stamp())
            n = len(r.prompt_ids) + len(r.resumed_ids)
            kv = pb.KvBlock(source=request.replica_id, request_id=r.request_id,
                            pages=-(-n // PAGE_SIZE), nbytes=n * 1024, tickets=[b"fake"],
                            chunk_pages=[-(-n // PAGE_SIZE)])
            finish = "length" if r.params.max_tokens <= 1 + len(r.resumed_ids) else ""
            self.p.events.put(pb.ReplicaEvent(prefilled=pb.Prefilled(
                replica_id=request.replica_id, request_id=r.request_id, first=first,
                num_tokens=n, finish_reason=finish, kv=None if finish else kv)))
        return pb.Ack(ok=True)

    def DropKv(self, request, context):
        return pb.Ack(ok=True)

    def Insert(self, request, context):
        mesh = self.p.by_id.get(request.replica_id)
        req = request.request
        with self.p.lock:
            ok = mesh is not None and len(mesh.running) < mesh.max_num_seqs
            if ok:
                mesh.running[req.request_id] = FakeRequest(
                    req.request_id, generated=1 + len(req.resumed_ids),
                    max_tokens=req.params.max_tokens, kv_tokens=request.prefilled.num_tokens)
        self.p.events.put(pb.ReplicaEvent(insert_done=pb.InsertDone(
            replica_id=request.replica_id, request_id=req.request_id, ok=ok,
            error="" if ok else "no free slot")))
        return pb.Ack(ok=True)

    def Release(self, request, context):
        mesh = self.p.by_id.get(request.replica_id)
        if mesh is not None:
            with self.p.lock:
                mesh.running.pop(request.request_id, None)
        return pb.Ack(ok=True)

    def Reserve(self, request, context):
        return pb.Ack(ok=False, error="the fake replica does not take migrations")

    def GetLoad(self, request, context):
        mesh = self.p.by_id.get(request.replica_id)
        with self.p.lock:
            return mesh.load() if mesh is not None else pb.Load()

    def Shutdown(self, request, context):
        self.p.stopped.set()
        return pb.Ack(ok=True)

    def Commands(self, request, context):
        """The scheduler's queued commands, in order, as the real replica runs them."""
        handlers = {"prefill": self.Prefill, "insert": self.Insert, "drop_kv": self.DropKv,
                    "release": self.Release}
        acks = []
        for cmd in request.commands:
            kind = cmd.WhichOneof("command")
            handler = handlers.get(kind)
            acks.append(handler(getattr(cmd, kind), context) if handler is not None
                        else pb.Ack(ok=False, error=f"the fake does not take {kind}"))
        return pb.CommandAcks(acks=acks)


def serve(proc: FakeProcess, scheduler: str, stats_path: str | None) -> None:
    """Register with ``scheduler``, step and heartbeat until stopped (Shutdown, SIGTERM)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=GRPC_OPTIONS)
    pb_grpc.add_ReplicaServicer_to_server(FakeReplicaService(proc), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(scheduler, options=GRPC_OPTIONS)
    stub = pb_grpc.SchedulerStub(channel)
    req = pb.RegisterRequest(address=address, process_id=os.getpid(), host="localhost",
                             meshes=proc.mesh_infos())
    deadline = time.monotonic() + 120
    while True:
        try:
            reply = stub.Register(req, timeout=10)
            break
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    proc.assign(list(reply.replica_ids))
    threading.Thread(target=proc.run_steps, name="fake-steps", daemon=True).start()
    cpu0 = time.process_time()
    while not proc.stopped.wait(reply.heartbeat_s or 0.5):
        with proc.lock:
            loads = [m.load() for m in proc.meshes]
        with contextlib.suppress(grpc.RpcError):
            stub.Heartbeat(pb.HeartbeatRequest(address=address, loads=loads), timeout=5)
    if stats_path:
        import json

        Path(stats_path).write_text(json.dumps({
            "steps": proc.steps, "rows": proc.rows, "cpu_s": time.process_time() - cpu0}))
    server.stop(grace=0.5).wait()
    channel.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scheduler", required=True, help="HOST:PORT of the scheduler")
    ap.add_argument("--prefill", type=int, default=0, help="fake prefill meshes here")
    ap.add_argument("--decode", type=int, default=8, help="fake decode meshes here")
    ap.add_argument("--step-ms", type=float, default=40.0)
    ap.add_argument("--max-num-seqs", type=int, default=32, help="rows per decode mesh")
    ap.add_argument("--epoch", type=float, required=True,
                    help="time.time() origin of the send stamps (shared with the clients)")
    ap.add_argument("--stats", default=None, help="write step counts and CPU time here at exit")
    args = ap.parse_args(argv)
    import signal

    proc = FakeProcess(["prefill"] * args.prefill + ["decode"] * args.decode,
                       args.step_ms / 1e3, args.epoch, args.max_num_seqs)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: proc.stopped.set())
    serve(proc, args.scheduler, args.stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
