"""Replica handles over gRPC: the scheduler's side of a replica process.

``ReplicaLink`` is one connection to a replica process: the channel, a reader thread on
its ``Events`` stream that files each event under the mesh it came from, and a sender thread
that drains the link's command queue. ``RemoteReplica`` is the ``ReplicaHandle`` of one mesh.

Commands that move KV or run the model or free something (prefill, insert, import_kv,
drop_kv, release) only append to the link's queue, so the scheduler core never waits on gRPC
(issuing an RPC from the core's thread cost ~9 ms under load). The sender takes everything
queued so far and sends it as one ``Commands`` RPC, which the replica process runs in order:
commands reach a process in the order the core issued them, and an iteration's drops and
releases share one RPC. Results come back as events; a command that fails (or a batch whose
RPC fails) becomes the matching failure event.

Quick bookkeeping calls (reserve, export, detach, reattach, adopt: migrations only, rare) are
unary calls with a deadline, made after the link's queue has been flushed so they too land in
order after the commands issued before them.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from ares_jax.engine.slots import DecodeLoad
from ares_jax.engine.types import Request
from ares_jax.replica.types import (
    Detached,
    Event,
    ImportDone,
    InsertDone,
    KvBlock,
    Prefilled,
    PrefillFailed,
    ReplicaFailed,
    ReplicaInfo,
)
from ares_jax.serving import ares_pb2 as pb
from ares_jax.serving import ares_pb2_grpc as pb_grpc
from ares_jax.serving import codec
from ares_jax.serving.replica_server import EPOCH_KEY, GRPC_OPTIONS

log = logging.getLogger("ares_jax.scheduler")
RPC_TIMEOUT_S = 10.0
# Commands that run the model or move KV report through events; their RPC deadline only
# guards against a replica that never answers (the first prefill of a shape compiles, which
# can take minutes on a loaded CPU). A replica that dies ends its event stream sooner.
WORK_TIMEOUT_S = 900.0


# A command's failure handler: the error text -> nothing (it files its own event).
OnError = Callable[[str], None]


class ReplicaLink:
    """One replica process: its channel, stub, event reader and command sender."""

    def __init__(self, address: str, on_event: Callable[[], None], epoch: int = 0) -> None:
        self.address = address
        # Sent with every call: a replica that reset itself refuses older epochs' calls.
        self.epoch = epoch
        self.metadata = ((EPOCH_KEY, str(epoch)),)
        self.channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self.stub = pb_grpc.ReplicaStub(self.channel)
        self.handles: dict[int, RemoteReplica] = {}
        self.on_event = on_event
        self.alive = True
        self.last_seen = 0.0
        self.batches_sent = 0
        self.commands_sent = 0
        self._stream = None
        self._reader = threading.Thread(target=self._read, name=f"events-{address}",
                                        daemon=True)
        self._outbox: collections.deque[tuple[pb.Command, OnError]] = collections.deque()
        self._cv = threading.Condition()
        self._in_flight = False
        self._closed = False
        self._sender = threading.Thread(target=self._send_loop, name=f"commands-{address}",
                                        daemon=True)

    def start(self) -> None:
        self._reader.start()
        self._sender.start()

    # events ---------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            self._stream = self.stub.Events(pb.EventsRequest(), metadata=self.metadata)
            for msg in self._stream:
                ev, load = codec.event_from_pb(msg)
                h = self.handles.get(ev.replica_id)
                if h is None:
                    continue
                if load is not None:
                    h.latest_load = load
                    h.load_at = time.monotonic()
                h.push(ev)
                self.on_event()
        except grpc.RpcError as err:
            self.fail(f"event stream from {self.address} ended: {err.code()}")

    def fail(self, reason: str) -> bool:
        """Declare the process dead (its stream broke, or it stopped heartbeating): every
        mesh reports ``ReplicaFailed`` once, and the link closes. False if it already was."""
        with self._cv:
            if not self.alive:
                return False
            self.alive = False
        for h in self.handles.values():
            h.push(ReplicaFailed(replica_id=h.info.replica_id, error=reason))
        self.on_event()
        self.close()
        return True

    # commands -------------------------------------------------------------------------

    def send(self, cmd: pb.Command, on_error: OnError) -> None:
        """Queue ``cmd`` for the sender thread; returns at once."""
        with self._cv:
            self._outbox.append((cmd, on_error))
            self._cv.notify()

    def flush(self, timeout: float = RPC_TIMEOUT_S) -> None:
        """Wait until every command queued so far has been answered (before a unary call
        that must follow them)."""
        with self._cv:
            self._cv.wait_for(lambda: self._closed or not (self._outbox or self._in_flight),
                              timeout)

    def _send_loop(self) -> None:
        """Send what is queued as one batch, wait for its answers, repeat: one RPC in flight
        per link keeps the order, and commands queued meanwhile form the next batch."""
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._outbox or self._closed)
                if self._closed:
                    batch = list(self._outbox)
                    self._outbox.clear()
                    self._fail(batch, f"the link to {self.address} is closed")
                    self._cv.notify_all()
                    return
                batch = list(self._outbox)
                self._outbox.clear()
                self._in_flight = True
            try:
                self._send(batch)
            finally:
                with self._cv:
                    self._in_flight = False
                    self._cv.notify_all()

    def _send(self, batch: list[tuple[pb.Command, OnError]]) -> None:
        try:
            reply = self.stub.Commands(pb.CommandBatch(commands=[c for c, _ in batch]),
                                       timeout=WORK_TIMEOUT_S, metadata=self.metadata)
        except grpc.RpcError as err:
            self._fail(batch, f"{err.code().name}: {err.details()}")
            return
        self.batches_sent += 1
        self.commands_sent += len(batch)
        acks = list(reply.acks)
        for i, (_, on_error) in enumerate(batch):
            if i >= len(acks):
                on_error("the replica process did not answer this command")
            elif not acks[i].ok:
                on_error(acks[i].error)

    @staticmethod
    def _fail(batch: list[tuple[pb.Command, OnError]], error: str) -> None:
        for _, on_error in batch:
            on_error(error)

    def close(self) -> None:
        with self._cv:
            self.alive = False
            self._closed = True
            self._cv.notify_all()
        if self._stream is not None:
            self._stream.cancel()
        self.channel.close()


class RemoteReplica:
    """``ReplicaHandle`` for one mesh of a replica process."""

    def __init__(self, info: ReplicaInfo, link: ReplicaLink, load: DecodeLoad) -> None:
        self.info = info
        self.link = link
        self.latest_load = load
        # When the latest step batch's load arrived (monotonic s); a heartbeat's load, sent
        # earlier than a step batch that overtook it, must not replace it.
        self.load_at = 0.0
        self._events: collections.deque[Event] = collections.deque()

    # events ---------------------------------------------------------------------------

    def push(self, ev: Event) -> None:
        self._events.append(ev)

    def poll(self) -> list[Event]:
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    def advance(self) -> None:
        """A replica process steps on its own."""

    def load(self) -> DecodeLoad:
        return self.latest_load

    def _ref(self, rid: str) -> pb.RequestRef:
        return pb.RequestRef(replica_id=self.info.replica_id, request_id=rid)

    def _send(self, cmd: pb.Command, on_error: Callable[[str], Event | None]) -> None:
        """Queue ``cmd`` on the link; a failed RPC (or a refused command) becomes the event
        ``on_error`` makes."""

        def failed(error: str) -> None:
            ev = on_error(error)
            if ev is not None:
                self.push(ev)
                self.link.on_event()

        self.link.send(cmd, failed)

    def _sync(self) -> pb_grpc.ReplicaStub:
        """The stub for a unary call, once the commands issued before it have landed."""
        self.link.flush()
        return self.link.stub

    # prefill ------------------------------------------------------------------------

    def prefill(self, requests: Sequence[Request]) -> None:
        ids = tuple(r.request_id for r in requests)
        self._send(pb.Command(prefill=pb.PrefillRequest(
                       replica_id=self.info.replica_id,
                       requests=[codec.request_to_pb(r) for r in requests])),
                   lambda e: PrefillFailed(replica_id=self.info.replica_id, request_ids=ids,
                                            error=e))

    def drop_kv(self, request_id: str) -> None:
        self._send(pb.Command(drop_kv=self._ref(request_id)), lambda e: None)

    # decode ---------------------------------------------------------------------------

    def insert(self, request: Request, prefilled: Prefilled) -> None:
        rid = request.request_id
        self._send(pb.Command(insert=pb.InsertRequest(
                       replica_id=self.info.replica_id, request=codec.request_to_pb(request),
                       prefilled=codec.prefilled_to_pb(prefilled))),
                   lambda e: InsertDone(replica_id=self.info.replica_id, request_id=rid,
                                         ok=False, error=e))

    def release(self, request_id: str) -> None:
        self._send(pb.Command(release=self._ref(request_id)), lambda e: None)

    def reserve(self, request_id: str, pages: int) -> bool:
        try:
            ack = self._sync().Reserve(pb.ReserveRequest(
                replica_id=self.info.replica_id, request_id=request_id, pages=pages),
                timeout=RPC_TIMEOUT_S, metadata=self.link.metadata)
        except grpc.RpcError:
            return False
        return ack.ok

    def export(self, request_id: str, start: int, end: int,
               to: ReplicaInfo | None = None) -> KvBlock:
        same = to is not None and to.process == self.info.process
        msg = self._sync().Export(pb.ExportRequest(
            replica_id=self.info.replica_id, request_id=request_id, start=start, end=end,
            same_process=same), timeout=RPC_TIMEOUT_S, metadata=self.link.metadata)
        return codec.block_from_pb(msg)

    def import_kv(self, request_id: str, start: int, block: KvBlock) -> None:
        self._send(pb.Command(import_kv=pb.ImportRequest(
                       replica_id=self.info.replica_id, request_id=request_id, start=start,
                       block=codec.block_to_pb(block))),
                   lambda e: ImportDone(replica_id=self.info.replica_id,
                                         request_id=request_id, start=start,
                                         pages=block.pages, nbytes=0, ok=False, error=e))

    def detach(self, request_id: str) -> Detached | None:
        reply = self._sync().Detach(self._ref(request_id), timeout=RPC_TIMEOUT_S,
                                    metadata=self.link.metadata)
        return codec.detached_from_pb(reply.state) if reply.found else None

    def reattach(self, request_id: str) -> None:
        ack = self._sync().Reattach(self._ref(request_id), timeout=RPC_TIMEOUT_S,
                                    metadata=self.link.metadata)
        if not ack.ok:
            log.warning("reattach of %s on replica %d failed: %s", request_id,
                        self.info.replica_id, ack.error)

    def adopt(self, request: Request, state: Detached) -> None:
        ack = self._sync().Adopt(pb.AdoptRequest(
            replica_id=self.info.replica_id, request=codec.request_to_pb(request),
            state=codec.detached_to_pb(state)), timeout=RPC_TIMEOUT_S, metadata=self.link.metadata)
        if not ack.ok:
            raise RuntimeError(ack.error)
