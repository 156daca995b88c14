"""A replica process: one or more meshes (each a prefill or decode replica) behind the
``Replica`` gRPC service.

Threads:
- gRPC handlers run commands on the local replica handles under one lock (the engines are not
  thread-safe); a KV pull from another process happens *outside* the lock, so decode steps go
  on while bytes move;
- the step loop advances every decode mesh with work, and streams everything the meshes
  produce (token batches with the replica's load, prefill results, completions) to the
  scheduler's ``Events`` subscription, in order;
- the heartbeat sends every mesh's load to the scheduler; a scheduler that does not know this
  process (it restarted, or declared this process dead after missed heartbeats) makes it drop
  everything it holds and register again (retrying with backoff); and a process that has not
  reached any scheduler for the lease the scheduler gave it drops everything too (its requests
  are recomputed elsewhere or were lost with the scheduler), so no page waits on a scheduler
  that will never ask for it.

KV leaves the process through the ``KvTransport`` as tickets, one per power-of-two chunk; a
block whose source is a mesh of this same process is read directly (``jax.device_put``).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures

import grpc
import jax
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.types import EngineConfig
from ares_jax.model.loader import LoadedModel
from ares_jax.model.sharding import make_mesh
from ares_jax.replica.local import LocalDecodeReplica, LocalPrefillReplica
from ares_jax.replica.types import KvBlock, Prefilled, Stepped
from ares_jax.serving import ares_pb2 as pb
from ares_jax.serving import ares_pb2_grpc as pb_grpc
from ares_jax.serving import codec
from ares_jax.serving.models import head_on, model_on
from ares_jax.serving.step_lock import StepLock
from ares_jax.serving.transport import Offers, make_transport
from ares_jax.transfer.kv_transport import KvTransport

log = logging.getLogger("ares_jax.replica")
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
                # Reconnect soon after a peer comes back (a restarted scheduler, a healed
                # partition): gRPC's default backoff grows to 120 s.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000)]
PULL_TIMEOUT_S = 30.0
# Heartbeats that fail are retried at doubling intervals up to this; so are registrations.
MAX_BACKOFF_S = 2.0
HEARTBEAT_RPC_TIMEOUT_S = 2.0
SERVICE_NAME = "ares.v1.Replica"
EPOCH_KEY = "ares-epoch"  # gRPC metadata: the registration a scheduler's call belongs to


class ReplicaProcess:
    """The meshes of this process and what they are doing."""

    # The handle types of the meshes: a multi-controller group's leader substitutes ones that
    # replay every call on the group's other processes (``serving/multihost.py``).
    prefill_type: type[LocalPrefillReplica] = LocalPrefillReplica
    decode_type: type[LocalDecodeReplica] = LocalDecodeReplica
    # Set on every process of a multi-controller group: its KV moves between its own meshes
    # only (see ``pull``, ``resolved`` and ``ReplicaService.Export``).
    group: object | None = None

    def __init__(self, model: LoadedModel, roles: Sequence[str], devices_per_mesh: int,
                 engine: EngineConfig, head=None, transport: KvTransport | None = None,
                 devices: Sequence[jax.Device] | None = None) -> None:
        devs = list(devices if devices is not None else jax.devices())
        need = len(roles) * devices_per_mesh
        if need > len(devs):
            raise ValueError(f"{len(roles)} meshes of {devices_per_mesh} devices need {need} "
                             f"devices; this process sees {len(devs)} (on CPU set XLA_FLAGS="
                             f"--xla_force_host_platform_device_count={need})")
        self.lock = StepLock()
        self.offers = Offers(transport) if transport is not None else None
        self.replicas: list[LocalPrefillReplica | LocalDecodeReplica] = []
        for i, role in enumerate(roles):
            mesh = make_mesh(devs[i * devices_per_mesh:(i + 1) * devices_per_mesh])
            m = model_on(model, mesh)
            if role == "prefill":
                self.replicas.append(self.prefill_type(
                    PrefillEngine(m, engine, head=head_on(head, mesh)), replica_id=i))
            elif role == "decode":
                self.replicas.append(self.decode_type(
                    DecodeEngine(m, engine, head=head_on(head, mesh)), replica_id=i,
                    pull=self.pull))
            else:
                raise ValueError(f"a mesh's role is 'prefill' or 'decode', not {role!r}")
        self.by_id = {r.info.replica_id: r for r in self.replicas}
        self.events: queue.Queue[pb.ReplicaEvent | None] = queue.Queue()
        # Events a replaced Events subscription took off the queue: the current one sends
        # them first.
        self.handed_back: collections.deque[pb.ReplicaEvent | None] = collections.deque()
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.vocab_size = model.cfg.vocab_size
        self.model_source = model.source
        # Calls of a registration epoch below this are refused: they were sent to this
        # process before it reset itself (see ``reset``).
        self.min_epoch = 0
        self.epoch = 0

    # ------------------------------------------------------------------ identity

    def assign_ids(self, ids: Sequence[int], process: str, address: str) -> None:
        """Adopt the scheduler's replica ids for the meshes, in order."""
        import dataclasses

        with self.lock:
            for r, rid in zip(self.replicas, ids):
                r.info = dataclasses.replace(r.info, replica_id=int(rid), process=process,
                                             process_id=os.getpid(), address=address)
            self.by_id = {r.info.replica_id: r for r in self.replicas}

    def mesh_infos(self) -> list[pb.MeshInfo]:
        return [pb.MeshInfo(role=r.info.role, page_size=r.info.page_size,
                            capacity_pages=r.info.capacity_pages,
                            max_num_seqs=r.info.max_num_seqs, max_model_len=r.info.max_model_len,
                            kv_bytes_per_token=r.info.kv_bytes_per_token,
                            devices=r.info.devices, vocab_size=self.vocab_size,
                            model=self.model_source) for r in self.replicas]

    def loads(self, wait_s: float | None = None) -> list[pb.Load]:
        """Every mesh's load; none when the lock is not free within ``wait_s`` (a command
        such as a first prefill that compiles can hold it for seconds, and a heartbeat must
        still go out, or the scheduler would declare this process dead)."""
        if not self.lock.acquire(timeout=-1 if wait_s is None else wait_s):
            return []
        try:
            return [codec.load_to_pb(r.info.replica_id, r.load()) for r in self.replicas]
        finally:
            self.lock.release()

    def holds_anything(self) -> bool:
        with self.lock:
            return any(self._held(r) for r in self.replicas) or not self.events.empty()

    @staticmethod
    def _held(r) -> list[str]:
        if isinstance(r, LocalPrefillReplica):
            return sorted(r.held_block_ids())
        return r.slots.page_owners()

    def reset(self, reason: str) -> int:
        """Drop every request, prefill block, offer and unsent event: this process starts
        clean (for a scheduler that does not know it). Returns the requests dropped."""
        dropped = 0
        with self.lock:
            for r in self.replicas:
                for rid in self._held(r):
                    if isinstance(r, LocalPrefillReplica):
                        r.drop_kv(rid)
                    else:
                        r.release(rid)
                    self.forget_offers(rid)
                    dropped += 1
                r.poll()  # events not yet forwarded describe requests now gone
            self.handed_back.clear()
            while True:
                try:
                    self.events.get_nowait()
                except queue.Empty:
                    break
            self.min_epoch = self.epoch + 1  # fence off every call sent before now
        if self.offers is not None:
            self.offers.drop_all()
        log.warning("dropped %d request(s) and every queued event: %s", dropped, reason)
        return dropped

    def replica(self, replica_id: int):
        r = self.by_id.get(replica_id)
        if r is None:
            raise KeyError(f"no replica {replica_id} in this process "
                           f"(it has {sorted(self.by_id)})")
        return r

    # ------------------------------------------------------------------ KV in and out

    def pull(self, block: KvBlock) -> list[tuple[jax.Array, jax.Array, int]]:
        """The block's chunks as arrays in this process: from a sibling mesh directly, or
        over the transport from another process."""
        if block.arrays is not None:
            return list(block.arrays)
        sibling = self.by_id.get(block.source)
        if sibling is not None and not block.tickets:
            # Under the lock: the step loop donates a decode mesh's pool to every step, and a
            # read dispatched meanwhile would find its buffers deleted. The read itself is only
            # dispatched here (asynchronous), so the lock is held briefly.
            with self.lock:
                if isinstance(sibling, LocalPrefillReplica):
                    held = sibling.block(block.request_id)
                    if held is None or held.arrays is None:
                        raise ValueError(f"request {block.request_id}: no prefill block held "
                                         f"on replica {block.source}")
                    return list(held.arrays)
                return list(sibling.export(block.request_id, block.start,
                                           block.start + block.pages).arrays or ())
        if self.group is not None:
            raise ValueError(f"request {block.request_id}: its KV is on replica {block.source} "
                             "in another process, and a multi-controller replica group takes "
                             "KV only from its own meshes (jax.experimental.transfer cannot "
                             "pull into a mesh that spans processes)")
        if not block.tickets and block.pages:
            raise ValueError(f"request {block.request_id}: replica {block.source} is in "
                             "another process and offered no transport ticket for its KV (a "
                             "process without a KV transport, or a multi-controller group, "
                             "cannot send KV to another process)")
        if self.offers is None:
            raise ValueError(f"request {block.request_id}: its KV is in another process and "
                             "this one has no KV transport")
        out = []
        for ticket, n in zip(block.tickets, block.chunk_pages):
            k, v = self.offers.pull(ticket, timeout_s=PULL_TIMEOUT_S)
            out.append((k, v, n))
        return out

    def offer(self, block: KvBlock) -> KvBlock:
        """A block with device arrays -> the same block as transport tickets."""
        if block.arrays is None or self.offers is None:
            return block
        import dataclasses

        tickets = tuple(self.offers.offer(block.request_id, k, v) for k, v, _ in block.arrays)
        return dataclasses.replace(block, arrays=None, tickets=tickets,
                                   chunk_pages=tuple(n for _, _, n in block.arrays))

    def forget_offers(self, request_id: str) -> None:
        if self.offers is not None:
            self.offers.drop(request_id)

    def resolved(self, block: KvBlock) -> KvBlock:
        """``block`` with its arrays pulled here (done outside the lock)."""
        import dataclasses

        sibling = self.by_id.get(block.source)
        if self.group is not None and sibling is not None and not block.tickets:
            # In a group the read of a sibling mesh runs inside the replayed insert or import,
            # so that every process runs it at the same point of the same order.
            return dataclasses.replace(block, nbytes=block.nbytes or block.pages * (
                sibling.info.page_size * sibling.info.kv_bytes_per_token))
        chunks = self.pull(block)
        nbytes = block.nbytes or int(sum(k.nbytes + v.nbytes for k, v, _ in chunks))
        return dataclasses.replace(block, arrays=tuple(chunks), nbytes=nbytes)

    # ------------------------------------------------------------------ the step loop

    def run_steps(self) -> None:
        """Advance the decode meshes and forward every event until ``stopped``."""
        while not self.stopped.is_set():
            busy = False
            with self.lock:
                for r in self.replicas:
                    if isinstance(r, LocalDecodeReplica) and r.engine.num_active:
                        r.advance()
                        busy = True
                batch = [(r, ev) for r in self.replicas for ev in r.poll()]
                # Queued under the lock, so a reset (which clears the queue) never has
                # events of the requests it dropped land after it.
                for r, ev in batch:
                    self.events.put(self._to_wire(r, ev))
            self.lock.yield_to_waiters()  # a command waiting goes before the next step
            if not busy:
                self.wake.wait(0.05)
                self.wake.clear()

    def _to_wire(self, r, ev) -> pb.ReplicaEvent:
        if isinstance(ev, Stepped):
            return codec.event_to_pb(ev, r.load())
        if isinstance(ev, Prefilled) and ev.kv is not None:
            import dataclasses

            ev = dataclasses.replace(ev, kv=self.offer(ev.kv))
        return codec.event_to_pb(ev)


class ReplicaService(pb_grpc.ReplicaServicer):
    def __init__(self, proc: ReplicaProcess) -> None:
        self.proc = proc
        self._subscriber = 0
        self._handoff_lock = threading.Lock()

    def _stale(self, context) -> str | None:
        """Why a call must be refused: it belongs to a registration older than this
        process's last reset. A call of a newer epoch (sent by a scheduler that registered
        this process before the reply got here) moves the epoch on."""
        for key, value in context.invocation_metadata() or ():
            if key == EPOCH_KEY:
                epoch = int(value)
                with self.proc.lock:
                    if epoch < self.proc.min_epoch:
                        return (f"a call of registration epoch {epoch}, older than this "
                                f"process's last reset (epoch {self.proc.min_epoch}): refused")
                    self.proc.epoch = max(self.proc.epoch, epoch)
        return None

    def _refuse_if_stale(self, context) -> None:
        """Abort a call that does not go through ``_run`` (a stream, a synchronous read)
        with FAILED_PRECONDITION if it belongs to a registration older than the last reset."""
        stale = self._stale(context)
        if stale is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, stale)

    def _fail_later(self, context, replica, event) -> pb.Ack:
        """A command that failed before reaching its replica (its KV could not be pulled):
        the replica reports ``event`` (a failed InsertDone / ImportDone) in order with its
        other events, unless the process reset since the call was sent."""
        with self.proc.lock:
            stale = self._stale(context)
            if stale is not None:
                return pb.Ack(ok=False, error=stale)
            replica._events.append(event)
        self.proc.wake.set()
        return pb.Ack(ok=True)

    def _run(self, context, fn) -> pb.Ack:
        """``fn`` under the lock, unless this process reset since the call was sent: a call
        that waited (a KV pull outside the lock, a command late in a batch, bytes held up
        by a partition) must not put a request back after the reset dropped everything, or
        it would run as a ghost and stream tokens under the new registration."""
        try:
            with self.proc.lock:
                stale = self._stale(context)
                if stale is not None:
                    return pb.Ack(ok=False, error=stale)
                fn()
        except Exception as err:  # noqa: BLE001 - answered to the scheduler, never fatal here
            return pb.Ack(ok=False, error=f"{type(err).__name__}: {err}")
        finally:
            self.proc.wake.set()
        return pb.Ack(ok=True)

    def Events(self, request, context) -> Iterator[pb.ReplicaEvent]:
        self._refuse_if_stale(context)
        with self._handoff_lock:
            self._subscriber += 1
            me = self._subscriber  # a newer subscription (a rejoin, a new scheduler) wins
        while context.is_active() and not self.proc.stopped.is_set():
            with self._handoff_lock:
                if me != self._subscriber:
                    return
                msg = self.proc.handed_back.popleft() if self.proc.handed_back else None
            if msg is None:
                try:
                    msg = self.proc.events.get(timeout=0.1)
                except queue.Empty:
                    continue
                with self._handoff_lock:
                    if me != self._subscriber:
                        # Replaced while waiting: the event belongs to the new subscription.
                        self.proc.handed_back.append(msg)
                        return
            if msg is not None:
                yield msg

    def Prefill(self, request, context) -> pb.Ack:
        reqs = [codec.request_from_pb(r) for r in request.requests]
        return self._run(context, lambda: self.proc.replica(request.replica_id).prefill(reqs))

    def DropKv(self, request, context) -> pb.Ack:
        self.proc.forget_offers(request.request_id)
        return self._run(context, lambda: self.proc.replica(request.replica_id).drop_kv(
            request.request_id))

    def Insert(self, request, context) -> pb.Ack:
        prefilled = codec.prefilled_from_pb(request.prefilled)
        req = codec.request_from_pb(request.request)
        target = self.proc.replica(request.replica_id)
        try:
            import dataclasses

            if prefilled.kv is None:
                raise ValueError(f"request {req.request_id}: the prefill result has no KV")
            prefilled = dataclasses.replace(prefilled, kv=self.proc.resolved(prefilled.kv))
        except Exception as err:  # noqa: BLE001 - the scheduler recomputes the request
            from ares_jax.replica.types import InsertDone

            return self._fail_later(context, target, InsertDone(
                replica_id=request.replica_id, request_id=req.request_id, ok=False,
                error=f"{type(err).__name__}: {err}"))
        return self._run(context, lambda: target.insert(req, prefilled))

    def Release(self, request, context) -> pb.Ack:
        self.proc.forget_offers(request.request_id)
        return self._run(context, lambda: self.proc.replica(request.replica_id).release(
            request.request_id))

    def Reserve(self, request, context) -> pb.Ack:
        ok = {}
        ack = self._run(context, lambda: ok.setdefault("v", self.proc.replica(
            request.replica_id).reserve(request.request_id, request.pages)))
        if ack.ok and not ok.get("v"):
            return pb.Ack(ok=False, error=f"{request.pages} pages not free")
        return ack

    def Export(self, request, context) -> pb.KvBlock:
        self._refuse_if_stale(context)
        src = self.proc.replica(request.replica_id)
        if request.same_process:  # the destination reads it itself, device to device
            return pb.KvBlock(source=request.replica_id, request_id=request.request_id,
                              pages=request.end - request.start, start=request.start)
        if self.proc.group is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "a multi-controller replica group cannot send KV to another process "
                          "(its pages span processes; jax.experimental.transfer offers arrays "
                          "of one process)")
        # Copy stages run one at a time: a new export means the last one has been imported.
        self.proc.forget_offers(request.request_id)
        try:
            with self.proc.lock:
                block = src.export(request.request_id, request.start, request.end)
            return codec.block_to_pb(self.proc.offer(block))
        except Exception as err:  # noqa: BLE001
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{type(err).__name__}: {err}")

    def ImportKv(self, request, context) -> pb.Ack:
        from ares_jax.replica.types import ImportDone

        block = codec.block_from_pb(request.block)
        dst = self.proc.replica(request.replica_id)
        try:
            block = self.proc.resolved(block)
        except Exception as err:  # noqa: BLE001 - the scheduler abandons the migration
            return self._fail_later(context, dst, ImportDone(
                replica_id=request.replica_id, request_id=request.request_id,
                start=request.start, pages=block.pages, nbytes=0, ok=False,
                error=f"{type(err).__name__}: {err}"))
        return self._run(context, lambda: dst.import_kv(request.request_id, request.start, block))

    def Detach(self, request, context) -> pb.DetachResponse:
        self._refuse_if_stale(context)
        with self.proc.lock:
            state = self.proc.replica(request.replica_id).detach(request.request_id)
        if state is None:
            return pb.DetachResponse(found=False)
        return pb.DetachResponse(found=True, state=codec.detached_to_pb(state))

    def Reattach(self, request, context) -> pb.Ack:
        return self._run(context, lambda: self.proc.replica(request.replica_id).reattach(
            request.request_id))

    def Adopt(self, request, context) -> pb.Ack:
        req = codec.request_from_pb(request.request)
        state = codec.detached_from_pb(request.state)
        return self._run(context, lambda: self.proc.replica(request.replica_id).adopt(req, state))

    def GetLoad(self, request, context) -> pb.Load:
        with self.proc.lock:
            r = self.proc.replica(request.replica_id)
            return codec.load_to_pb(r.info.replica_id, r.load())

    def Shutdown(self, request, context) -> pb.Ack:
        self.proc.stopped.set()
        return pb.Ack(ok=True)

    def Commands(self, request, context) -> pb.CommandAcks:
        """The scheduler's queued commands, run one after another in the order it issued
        them (each as its own RPC would run it); one Ack per command."""
        stale = self._stale(context)
        if stale is not None:
            return pb.CommandAcks(acks=[pb.Ack(ok=False, error=stale) for _ in request.commands])
        return pb.CommandAcks(acks=[self._command(c, context) for c in request.commands])

    def _command(self, cmd: pb.Command, context) -> pb.Ack:
        kind = cmd.WhichOneof("command")
        handler = {"prefill": self.Prefill, "insert": self.Insert, "drop_kv": self.DropKv,
                   "release": self.Release, "import_kv": self.ImportKv}.get(kind)
        if handler is None:
            return pb.Ack(ok=False, error=f"unknown command {kind!r}")
        try:
            return handler(getattr(cmd, kind), context)
        except Exception as err:  # noqa: BLE001 - e.g. no such replica: that command fails
            return pb.Ack(ok=False, error=f"{type(err).__name__}: {err}")


def serve_replica(proc: ReplicaProcess, *, scheduler: str, host: str = "127.0.0.1",
                  port: int = 0, advertise_host: str | None = None,
                  register_timeout_s: float = 120.0) -> None:
    """Serve until stopped (Shutdown RPC, or ``proc.stopped`` set by a signal handler)."""
    from ares_jax.serving.codec import KvLayout
    from ares_jax.serving.validation import ValidatingInterceptor

    first = proc.replicas[0]  # every mesh of a process serves the same model
    layout = KvLayout.of(first.engine.cfg, first.info.page_size)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=GRPC_OPTIONS,
                         interceptors=[ValidatingInterceptor(layout)])
    pb_grpc.add_ReplicaServicer_to_server(ReplicaService(proc), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    address = f"{advertise_host or advertised(host)}:{bound}"
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    stepper = threading.Thread(target=proc.run_steps, name="replica-steps", daemon=True)
    stepper.start()
    channel = grpc.insecure_channel(scheduler, options=GRPC_OPTIONS)
    stub = pb_grpc.SchedulerStub(channel)
    try:
        heartbeat_s, lease_s = _register(proc, stub, address, register_timeout_s)
        health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("replica process %s serving %d mesh(es) for scheduler %s", address,
                 len(proc.replicas), scheduler)
        _heartbeats(proc, stub, address, scheduler, heartbeat_s, lease_s)
    finally:
        proc.stopped.set()
        health_servicer.enter_graceful_shutdown()
        proc.events.put(None)
        server.stop(grace=1.0).wait()
        channel.close()
        stepper.join(timeout=5)
        if proc.offers is not None:
            proc.offers.close()


def _heartbeats(proc: ReplicaProcess, stub, address: str, scheduler: str,
                heartbeat_s: float, lease_s: float) -> None:
    """Heartbeat until stopped. A scheduler that does not know this process gets it clean
    and registered again; one out of reach is retried with backoff, and once the lease has
    run out with no heartbeat answered, everything held here is dropped."""
    delay = heartbeat_s
    last_ok = time.monotonic()
    lease_spent = False
    while not proc.stopped.wait(delay):
        try:
            reply = stub.Heartbeat(pb.HeartbeatRequest(address=address,
                                                       loads=proc.loads(wait_s=0.05)),
                                   timeout=HEARTBEAT_RPC_TIMEOUT_S)
        except grpc.RpcError as err:
            delay = min(2 * delay, MAX_BACKOFF_S)
            log.warning("heartbeat to %s failed: %s", scheduler, err.code())
            if lease_s > 0 and not lease_spent and time.monotonic() - last_ok > lease_s:
                lease_spent = True  # once per outage: nothing new arrives meanwhile
                proc.reset(f"no scheduler answered for {lease_s:.1f} s (the lease)")
            continue
        last_ok, delay, lease_spent = time.monotonic(), heartbeat_s, False
        if not reply.known:
            # A restarted scheduler, or one that declared this process dead and recomputed its
            # requests elsewhere: whatever is held here is nobody's now. Dropped before
            # registering, so no stale event reaches the scheduler under a new identity.
            proc.reset("the scheduler does not know this process")
            heartbeat_s, lease_s = _register(proc, stub, address, None)
            delay = heartbeat_s


def _register(proc: ReplicaProcess, stub, address: str, timeout_s: float | None
              ) -> tuple[float, float]:
    """Register until accepted, retrying with backoff (for ever when ``timeout_s`` is
    None); returns the scheduler's (heartbeat interval, lease) in seconds."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    req = pb.RegisterRequest(address=address, process_id=os.getpid(), host=socket.gethostname(),
                             meshes=proc.mesh_infos(),
                             transfer_address=proc.offers.address if proc.offers else "")
    backoff = 0.2
    while True:
        try:
            reply = stub.Register(req, timeout=10)
            proc.assign_ids(reply.replica_ids, process=address, address=address)
            with proc.lock:
                proc.epoch = max(proc.epoch, reply.epoch)
            log.info("registered as replica(s) %s", list(reply.replica_ids))
            return reply.heartbeat_s or 0.5, reply.lease_s
        except grpc.RpcError as err:
            if proc.stopped.is_set() or (deadline is not None and time.monotonic() > deadline):
                raise RuntimeError(f"could not register with the scheduler: {err.code()}: "
                                   f"{err.details()}") from err
            log.warning("registration refused (%s: %s); retrying in %.1f s", err.code(),
                        err.details(), backoff)
            if proc.stopped.wait(backoff):
                raise RuntimeError("stopped before registering") from err
            backoff = min(2 * backoff, MAX_BACKOFF_S)


def advertised(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


__all__ = ["ReplicaProcess", "ReplicaService", "make_transport", "serve_replica"]
