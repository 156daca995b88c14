"""Replica handles over gRPC: the scheduler's side of a replica process.

``ReplicaLink`` is one connection to a replica process: the channel, and a reader thread on
its ``Events`` stream that files each event under the mesh it came from. ``RemoteReplica``
is the ``ReplicaHandle`` of one mesh. Commands that move KV or run the model (prefill,
insert, import) are sent as futures, so the scheduler core never waits on them: their
results come back as events, and an RPC that fails becomes the matching failure event.
Quick bookkeeping calls (reserve, export, detach, adopt) are unary calls with a deadline.
"""

from __future__ import annotations

import collections
import logging
import threading
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
from ares_jax.serving.replica_server import GRPC_OPTIONS

log = logging.getLogger("ares_jax.scheduler")
RPC_TIMEOUT_S = 10.0
# Commands that run the model or move KV report through events; their RPC deadline only
# guards against a replica that never answers (the first prefill of a shape compiles, which
# can take minutes on a loaded CPU). A replica that dies ends its event stream sooner.
WORK_TIMEOUT_S = 900.0


class ReplicaLink:
    """One replica process: its channel, stub and event reader."""

    def __init__(self, address: str, on_event: Callable[[], None]) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self.stub = pb_grpc.ReplicaStub(self.channel)
        self.handles: dict[int, RemoteReplica] = {}
        self.on_event = on_event
        self.alive = True
        self.last_seen = 0.0
        self._stream = None
        self._reader = threading.Thread(target=self._read, name=f"events-{address}",
                                        daemon=True)

    def start(self) -> None:
        self._reader.start()

    def _read(self) -> None:
        try:
            self._stream = self.stub.Events(pb.EventsRequest())
            for msg in self._stream:
                ev, load = codec.event_from_pb(msg)
                h = self.handles.get(ev.replica_id)
                if h is None:
                    continue
                if load is not None:
                    h.latest_load = load
                h.push(ev)
                self.on_event()
        except grpc.RpcError as err:
            if self.alive:
                self.alive = False
                reason = f"event stream from {self.address} ended: {err.code()}"
                for h in self.handles.values():
                    h.push(ReplicaFailed(replica_id=h.info.replica_id, error=reason))
                self.on_event()

    def close(self) -> None:
        self.alive = False
        if self._stream is not None:
            self._stream.cancel()
        self.channel.close()


class RemoteReplica:
    """``ReplicaHandle`` for one mesh of a replica process."""

    def __init__(self, info: ReplicaInfo, link: ReplicaLink, load: DecodeLoad) -> None:
        self.info = info
        self.link = link
        self.latest_load = load
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

    def _async(self, call, msg, on_error: Callable[[str], Event | None]) -> None:
        """Send ``msg`` without waiting; a failed RPC (or a refused command) becomes the
        event ``on_error`` makes."""
        fut = call.future(msg, timeout=WORK_TIMEOUT_S)

        def done(f) -> None:
            try:
                ack = f.result()
                error = None if ack.ok else ack.error
            except grpc.RpcError as err:
                error = f"{err.code().name}: {err.details()}"
            if error is not None:
                ev = on_error(error)
                if ev is not None:
                    self.push(ev)
                    self.link.on_event()

        fut.add_done_callback(done)

    # prefill ------------------------------------------------------------------------

    def prefill(self, requests: Sequence[Request]) -> None:
        ids = tuple(r.request_id for r in requests)
        self._async(self.link.stub.Prefill,
                    pb.PrefillRequest(replica_id=self.info.replica_id,
                                      requests=[codec.request_to_pb(r) for r in requests]),
                    lambda e: PrefillFailed(replica_id=self.info.replica_id, request_ids=ids,
                                            error=e))

    def drop_kv(self, request_id: str) -> None:
        self._async(self.link.stub.DropKv, self._ref(request_id), lambda e: None)

    # decode ---------------------------------------------------------------------------

    def insert(self, request: Request, prefilled: Prefilled) -> None:
        rid = request.request_id
        self._async(self.link.stub.Insert,
                    pb.InsertRequest(replica_id=self.info.replica_id,
                                     request=codec.request_to_pb(request),
                                     prefilled=codec.prefilled_to_pb(prefilled)),
                    lambda e: InsertDone(replica_id=self.info.replica_id, request_id=rid,
                                         ok=False, error=e))

    def release(self, request_id: str) -> None:
        self._async(self.link.stub.Release, self._ref(request_id), lambda e: None)

    def reserve(self, request_id: str, pages: int) -> bool:
        try:
            ack = self.link.stub.Reserve(pb.ReserveRequest(
                replica_id=self.info.replica_id, request_id=request_id, pages=pages),
                timeout=RPC_TIMEOUT_S)
        except grpc.RpcError:
            return False
        return ack.ok

    def export(self, request_id: str, start: int, end: int,
               to: ReplicaInfo | None = None) -> KvBlock:
        same = to is not None and to.process == self.info.process
        msg = self.link.stub.Export(pb.ExportRequest(
            replica_id=self.info.replica_id, request_id=request_id, start=start, end=end,
            same_process=same), timeout=RPC_TIMEOUT_S)
        return codec.block_from_pb(msg)

    def import_kv(self, request_id: str, start: int, block: KvBlock) -> None:
        self._async(self.link.stub.ImportKv,
                    pb.ImportRequest(replica_id=self.info.replica_id, request_id=request_id,
                                     start=start, block=codec.block_to_pb(block)),
                    lambda e: ImportDone(replica_id=self.info.replica_id,
                                         request_id=request_id, start=start,
                                         pages=block.pages, nbytes=0, ok=False, error=e))

    def detach(self, request_id: str) -> Detached | None:
        reply = self.link.stub.Detach(self._ref(request_id), timeout=RPC_TIMEOUT_S)
        return codec.detached_from_pb(reply.state) if reply.found else None

    def reattach(self, request_id: str) -> None:
        ack = self.link.stub.Reattach(self._ref(request_id), timeout=RPC_TIMEOUT_S)
        if not ack.ok:
            log.warning("reattach of %s on replica %d failed: %s", request_id,
                        self.info.replica_id, ack.error)

    def adopt(self, request: Request, state: Detached) -> None:
        ack = self.link.stub.Adopt(pb.AdoptRequest(
            replica_id=self.info.replica_id, request=codec.request_to_pb(request),
            state=codec.detached_to_pb(state)), timeout=RPC_TIMEOUT_S)
        if not ack.ok:
            raise RuntimeError(ack.error)
