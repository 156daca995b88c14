"""The scheduler process: replicas register here, clients generate here.

Replica processes call ``Register`` with their meshes; the scheduler gives every mesh a
replica id, opens a ``ReplicaLink`` (its event stream) and wraps each mesh in a
``RemoteReplica``. Once the expected prefill and decode replicas are in, it builds the one
``ClusterCore`` over those handles and starts its ``CoreRunner``. From then on ``Generate``
submits to the runner and streams the request's chunks back; a client that goes away aborts
its request on every replica that holds it.

A watchdog declares a replica process dead when its heartbeats stop for ``replica_timeout_s``
(hung, stopped, partitioned: its connection may stay open, so the broken stream that a killed
process causes never comes); its requests are recomputed elsewhere as for a killed one. A
process declared dead that comes back finds the scheduler does not know it, drops what it holds
and registers again: it rejoins under its old replica ids, empty.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ares_jax.cluster.config import ClusterConfig
from ares_jax.cluster.core import ClusterCore
from ares_jax.cluster.deadlines import DEADLINE
from ares_jax.engine.outputs import StreamChunk
from ares_jax.engine.slots import DecodeLoad
from ares_jax.engine.types import Request
from ares_jax.model.tokenizer import Tokenizer
from ares_jax.replica.types import ReplicaInfo
from ares_jax.serving import ares_pb2 as pb
from ares_jax.serving import ares_pb2_grpc as pb_grpc
from ares_jax.serving import codec
from ares_jax.serving.remote import RemoteReplica, ReplicaLink
from ares_jax.serving.replica_server import GRPC_OPTIONS
from ares_jax.serving.runner import CoreRunner, Overloaded

log = logging.getLogger("ares_jax.scheduler")
SERVICE_NAME = "ares.v1.Scheduler"
HEARTBEAT_S = 0.5
# A replica process silent (no heartbeat) for this long is declared dead: its requests are
# recomputed elsewhere. Declared within REPLICA_TIMEOUT_S + WATCHDOG_TICK_S of its last one.
REPLICA_TIMEOUT_S = 5.0
WATCHDOG_TICK_S = 0.1
# A step batch's load newer than this wins over a heartbeat's.
LOAD_STALE_S = 2 * HEARTBEAT_S


class Scheduler:
    """Registration, the core once every replica is in, and the client-facing calls."""

    def __init__(self, cluster: ClusterConfig, *, expect_prefill: int, expect_decode: int,
                 expect_total: int | None = None,
                 tokenizer: Tokenizer | None = None, model_name: str = "model",
                 max_waiting: int = 1024,
                 replica_timeout_s: float = REPLICA_TIMEOUT_S) -> None:
        if replica_timeout_s <= 2 * HEARTBEAT_S:
            raise ValueError(f"replica_timeout_s must exceed two heartbeats "
                             f"({2 * HEARTBEAT_S} s), got {replica_timeout_s}")
        self.cluster = cluster
        self.replica_timeout_s = replica_timeout_s
        # A replica that reaches no scheduler for this long drops what it holds: longer than
        # the timeout, so the scheduler has declared it dead (and recomputed its requests)
        # before it lets go of them.
        self.lease_s = 2 * replica_timeout_s
        self.expect = {"prefill": expect_prefill, "decode": expect_decode}
        self.expect_total = expect_total  # instead of per role: any mix, one of each at least
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_waiting = max_waiting
        self.links: dict[str, ReplicaLink] = {}
        self.handles: list[RemoteReplica] = []
        self.runner: CoreRunner | None = None
        self.vocab_size = 0
        self.max_model_len = 0
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self.started_at = time.time()
        self._stop = threading.Event()
        self._epoch = 0
        self._watchdog = threading.Thread(target=self._watch, name="replica-watchdog",
                                          daemon=True)
        self._watchdog.start()

    # ------------------------------------------------------------------ registration

    def register(self, req: pb.RegisterRequest) -> list[int]:
        with self._lock:
            if self.runner is not None:
                return self._rejoin(req)
            old = self.links.pop(req.address, None)
            if old is not None:  # the same process registering again: forget its meshes
                old.close()
                self.handles = [h for h in self.handles if h.link is not old]
            link = ReplicaLink(req.address, self._on_event, self._next_epoch())
            ids = []
            for mesh in req.meshes:
                rid = max((h.info.replica_id for h in self.handles), default=-1) + 1
                info = ReplicaInfo(
                    replica_id=rid, role=mesh.role, page_size=mesh.page_size,
                    capacity_pages=mesh.capacity_pages, max_num_seqs=mesh.max_num_seqs,
                    max_model_len=mesh.max_model_len, kv_bytes_per_token=mesh.kv_bytes_per_token,
                    process=req.address, process_id=req.process_id, address=req.address,
                    devices=mesh.devices)
                h = RemoteReplica(info, link, DecodeLoad.idle(
                    capacity_pages=info.capacity_pages, free_pages=info.capacity_pages,
                    free_slots=info.max_num_seqs))
                link.handles[rid] = h
                self.handles.append(h)
                ids.append(rid)
                self.vocab_size = mesh.vocab_size
            self.links[req.address] = link
            link.last_seen = time.monotonic()
            link.start()
            log.info("registered %s: %s", req.address,
                     ", ".join(f"{m.role} replica {i}" for m, i in zip(req.meshes, ids)))
            self._maybe_start()
            return ids

    def _rejoin(self, req: pb.RegisterRequest) -> list[int]:
        """A process of the running cluster registering again (it was declared dead, or
        believes it was): its meshes get their old ids and fresh handles, and the core places
        on them again. New processes cannot join a formed cluster."""
        old = self.links.get(req.address)
        roles = [m.role for m in req.meshes]
        if old is None or [h.info.role for h in old.handles.values()] != roles:
            raise RuntimeError("the cluster is already formed; only a process of it (same "
                               "address and meshes) can register again")
        if old.alive:  # it reset itself: whatever the core thinks runs there is gone
            old.fail(f"replica process {req.address} registered again")
        runner = self.runner
        assert runner is not None
        link = ReplicaLink(req.address, self._on_event, self._next_epoch())
        fresh = []
        for h in old.handles.values():
            new = RemoteReplica(h.info, link, DecodeLoad.idle(
                capacity_pages=h.info.capacity_pages, free_pages=h.info.capacity_pages,
                free_slots=h.info.max_num_seqs))
            link.handles[h.info.replica_id] = new
            fresh.append(new)
        self.handles = [h for h in self.handles if h.link is not old] + fresh
        self.links[req.address] = link
        link.last_seen = time.monotonic()
        link.start()

        def rejoin(core: ClusterCore) -> None:
            for h in fresh:
                core.rejoin(h)

        runner.call(rejoin)
        ids = [h.info.replica_id for h in fresh]
        log.warning("replica process %s rejoined as replica(s) %s, empty", req.address, ids)
        return ids

    def _next_epoch(self) -> int:
        """Registration epochs: wall-clock nanoseconds, so a restarted scheduler's are newer
        than its predecessor's; strictly increasing within this one."""
        self._epoch = max(time.time_ns(), self._epoch + 1)
        return self._epoch

    def _watch(self) -> None:
        """Declare dead every replica process whose heartbeats stopped."""
        while not self._stop.wait(WATCHDOG_TICK_S):
            now = time.monotonic()
            for address, link in list(self.links.items()):
                silent = now - link.last_seen
                if not link.alive or silent <= self.replica_timeout_s:
                    continue
                reason = f"no heartbeat from {address} for {silent:.1f} s"
                with self._lock:
                    if self.runner is None:  # not formed yet: forget it, it may come back
                        self.links.pop(address, None)
                        self.handles = [h for h in self.handles if h.link is not link]
                        link.close()
                        log.error("%s; forgotten until it registers again", reason)
                        continue
                if link.fail(reason):
                    log.error("%s: declared dead", reason)

    def _roles(self, role: str) -> list[RemoteReplica]:
        return [h for h in self.handles if h.info.role == role]

    def registered(self) -> dict[str, int]:
        return {role: len(self._roles(role)) for role in self.expect}

    def _maybe_start(self) -> None:
        have = self.registered()
        if self.expect_total is not None:
            if sum(have.values()) < self.expect_total or min(have.values()) < 1:
                return
        elif any(have[r] < n for r, n in self.expect.items()):
            return
        core = ClusterCore(self._roles("prefill"), self._roles("decode"), self.tokenizer,
                           vocab_size=self.vocab_size, cluster=self.cluster)
        self.max_model_len = core.max_model_len
        self.runner = CoreRunner(core, max_waiting=self.max_waiting).start()
        self.ready.set()
        log.info("cluster formed: %d prefill + %d decode replicas, policy %s",
                 have["prefill"], have["decode"], self.cluster.policy)

    def _on_event(self) -> None:
        if self.runner is not None:
            self.runner.wake.set()

    def heartbeat(self, req: pb.HeartbeatRequest) -> bool:
        link = self.links.get(req.address)
        if link is None or not link.alive:  # unknown, or declared dead: it must reset
            return False
        now = link.last_seen = time.monotonic()
        for msg in req.loads:
            h = link.handles.get(msg.replica_id)
            # Fresher than the last step batch only when the replica is idle: while it steps,
            # a heartbeat (built before it was sent, handled on another thread) can be older
            # than a step batch's load already applied, and would make a running request
            # look shorter than it is (a migration then reserves too few pages).
            if h is not None and now - h.load_at > LOAD_STALE_S:
                h.latest_load = codec.load_from_pb(msg)
        return True

    def cluster_state(self) -> dict:
        if self.runner is None:
            return {"time": time.time(), "policy": self.cluster.policy, "ready": False,
                    "registered": self.registered(), "expected": self.expect,
                    "replicas": [], "migrations": [], "counters": {}, "waiting": 0,
                    "running": 0}
        state = self.runner.call(lambda core: core.cluster_state())
        state["ready"] = True  # type: ignore[index]
        return state  # type: ignore[return-value]

    def configure(self, policy: str, dispatch_policy: str | None = None) -> None:
        """Switch policies: a fresh core over the same replicas, when nothing is in flight
        (so the new policy starts from the state it would start from after a restart)."""
        from ares_jax.scheduler.registry import POLICY_NAMES

        for name in (policy, dispatch_policy):
            if name is not None and name not in POLICY_NAMES:
                raise ValueError(f"unknown policy {name!r}; one of {', '.join(POLICY_NAMES)}")
        runner = self.runner
        if runner is None:
            raise RuntimeError("the cluster is not ready")
        cluster = dataclasses.replace(self.cluster, policy=policy,
                                      dispatch_policy=dispatch_policy)

        def swap(core: ClusterCore) -> None:
            if core.has_work:
                raise RuntimeError(f"{len(core.trackers)} requests are in flight; configure "
                                   "an idle cluster")
            runner.core = ClusterCore(core.prefill, core.decode, core.tokenizer,
                                      vocab_size=core.vocab_size, cluster=cluster)

        runner.call(swap)
        self.cluster = cluster

    def close(self) -> None:
        self._stop.set()
        if self.runner is not None:
            self.runner.stop()
        for link in self.links.values():
            link.close()

    # ------------------------------------------------------------------ requests

    def make_request(self, req: pb.GenerateRequest) -> tuple[Request, str | None]:
        """A validated Request from the wire; raises ValueError naming the problem."""
        from ares_jax.serving.validation import check_generate

        check_generate(req)
        params = codec.params_from_pb(req.params)
        text = None
        if req.messages:
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer, so it has no chat template")
            text = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in req.messages])
            ids = self.tokenizer.encode(text)
        elif req.prompt_ids:
            ids = list(req.prompt_ids)
        elif req.prompt:
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; send prompt_ids")
            text = req.prompt
            ids = self.tokenizer.encode(text)
        else:
            raise ValueError("the request has no prompt (prompt, prompt_ids or messages)")
        rid = req.request_id or f"req-{uuid.uuid4().hex[:16]}"
        return Request(request_id=rid, prompt_ids=ids, params=params,
                       arrival_time=time.perf_counter(), index=req.index), text


def chunk_to_pb(ch: StreamChunk, first: bool, prompt_ids: list[int]) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=ch.request_id, text_delta=ch.text_delta,
                              finished=ch.finished, finish_reason=ch.finish_reason or "")
    if ch.token_id >= 0:  # filled in place: no TokenInfo message built and copied
        t = msg.token
        t.SetInParent()
        t.token_id = ch.token_id
        if ch.top_logprobs:
            t.top_logprobs.update(ch.top_logprobs)
        if ch.logprob is not None:
            t.logprob = ch.logprob
    if ch.predicted_remaining is not None:
        msg.predicted_remaining = ch.predicted_remaining
    if first:
        msg.prompt_token_ids.extend(prompt_ids)
    if ch.output is not None:
        out = ch.output
        m = out.metrics
        msg.text = out.text
        msg.error = out.error or ""
        msg.stop_reason = "" if out.stop_reason is None else str(out.stop_reason)
        msg.metrics.CopyFrom(pb.RequestMetrics(
            arrival_time=m.arrival_time, first_token_time=m.first_token_time or 0.0,
            finish_time=m.finish_time or 0.0, token_times=m.token_times,
            num_preemptions=m.num_preemptions, num_migrations=m.num_migrations,
            scheduled_time=m.scheduled_time or 0.0,
            prediction_generated=[g for g, _ in m.predictions],
            prediction_remaining=[p for _, p in m.predictions]))
    return msg


def chunks_to_pb(chunks: list[StreamChunk], first: bool, prompt_ids: list[int]
                 ) -> pb.GenerateResponse:
    """One message for a stream's chunks of one core iteration: the single-token form for
    one chunk (the common case), else ``tokens``/``text_deltas``/``predicted_remainings``
    with the last chunk's finish, text and metrics."""
    if len(chunks) == 1:
        return chunk_to_pb(chunks[0], first, prompt_ids)
    msg = chunk_to_pb(chunks[-1], first, prompt_ids)
    msg.ClearField("token")
    msg.ClearField("text_delta")
    msg.ClearField("predicted_remaining")
    nan = float("nan")
    for ch in chunks:  # a chunk without a token (an error, an abort) rides as token_id -1
        t = msg.tokens.add(token_id=max(ch.token_id, -1), top_logprobs=ch.top_logprobs or {})
        if ch.logprob is not None:
            t.logprob = ch.logprob
        msg.text_deltas.append(ch.text_delta)
        msg.predicted_remainings.append(
            nan if ch.predicted_remaining is None else ch.predicted_remaining)
    if chunks[-1].predicted_remaining is not None:
        msg.predicted_remaining = chunks[-1].predicted_remaining
    return msg


def _deadline(context) -> float | None:
    """The call's gRPC deadline on the core's clock: the core ends the request there, freeing
    it on every replica, even while it waits in the queue."""
    left = context.time_remaining()
    return None if left is None else time.perf_counter() + left


class SchedulerService(pb_grpc.SchedulerServicer):
    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler

    def Register(self, request, context):
        try:
            ids = self.s.register(request)
        except RuntimeError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        return pb.RegisterResponse(replica_ids=ids, heartbeat_s=HEARTBEAT_S,
                                   lease_s=self.s.lease_s,
                                   epoch=self.s.links[request.address].epoch)

    def Heartbeat(self, request, context):
        return pb.HeartbeatResponse(known=self.s.heartbeat(request))

    def Generate(self, request, context):
        runner = self.s.runner
        if runner is None:
            have, want = self.s.registered(), self.s.expect
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"the cluster is not ready: {have} of {want} replicas registered")
        try:
            req, text = self.s.make_request(request)
            req.deadline = _deadline(context)
            stream = runner.submit_batched(req, text)
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Overloaded as err:
            context.set_trailing_metadata((("retry-after", f"{err.retry_after_s:.0f}"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        done = threading.Event()
        context.add_callback(lambda: None if done.is_set() else runner.abort(req.request_id))
        first = True
        while True:  # one message per core iteration that had tokens for this request
            chunks = stream.get()
            if chunks is None:
                break
            if chunks[-1].finish_reason == DEADLINE:  # the core freed it everywhere
                done.set()
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, chunks[-1].output.error)
            yield chunks_to_pb(chunks, first, req.prompt_ids)
            first = False
            if chunks[-1].finished:
                done.set()
                break
        if not done.is_set() and context.is_active():
            done.set()
            context.abort(grpc.StatusCode.ABORTED, f"request {req.request_id} was aborted")

    def Abort(self, request, context):
        if self.s.runner is None:
            return pb.AbortResponse(found=False)
        found = self.s.runner.call(lambda core: request.request_id in core.trackers)
        self.s.runner.abort(request.request_id)
        return pb.AbortResponse(found=bool(found))

    def Stats(self, request, context):
        import json

        return pb.StatsResponse(json=json.dumps(self.s.cluster_state()))

    def Migrate(self, request, context):
        if self.s.runner is None:
            return pb.MigrateResponse(started=False, reason="the cluster is not ready")

        def start(core: ClusterCore):
            src = core.location.get(request.request_id)
            if src is None:
                return False, f"request {request.request_id} is not running"
            rec = core.start_migration(request.request_id, src, request.dst)
            return rec.outcome is None, rec.reason

        started, reason = self.s.runner.call(start)  # type: ignore[misc]
        return pb.MigrateResponse(started=started, reason=reason)

    def Configure(self, request, context):
        try:
            self.s.configure(request.policy, request.dispatch_policy or None)
        except (ValueError, RuntimeError) as err:
            return pb.ConfigureResponse(ok=False, error=str(err))
        return pb.ConfigureResponse(ok=True)


class _LoopFeeder:
    """Hands chunk lists from the core's thread to asyncio queues on one event loop, waking
    the loop once per burst (one core iteration) instead of once per stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: collections.deque[tuple[asyncio.Queue, object]] = collections.deque()
        self._scheduled = False
        self._lock = threading.Lock()

    def sink(self, q: asyncio.Queue) -> Callable[[list[StreamChunk] | None], None]:
        """A ``CoreRunner`` sink that feeds ``q``."""
        return lambda chunks: self._put(q, chunks)

    def _put(self, q: asyncio.Queue, item: object) -> None:
        with self._lock:
            self._pending.append((q, item))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            items = list(self._pending)
            self._pending.clear()
            self._scheduled = False
        for q, item in items:
            q.put_nowait(item)


class AsyncSchedulerService(SchedulerService):
    """``SchedulerService`` on a ``grpc.aio`` server: ``Generate`` is an async generator on the
    server's event loop (no thread per open stream; the core's chunks arrive through one
    ``_LoopFeeder``); the other calls are rare and stay synchronous (gRPC runs them on its
    migration thread pool)."""

    def __init__(self, scheduler: Scheduler, feeder: _LoopFeeder) -> None:
        super().__init__(scheduler)
        self.feeder = feeder

    async def Generate(self, request, context):  # noqa: N802 - the gRPC method's name
        runner = self.s.runner
        if runner is None:
            have, want = self.s.registered(), self.s.expect
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"the cluster is not ready: {have} of {want} replicas "
                                "registered")
        q: asyncio.Queue[list[StreamChunk] | None] = asyncio.Queue()
        try:
            req, text = self.s.make_request(request)  # may tokenize: rare and short
            req.deadline = _deadline(context)
            accepted = runner.enqueue(req, text, self.feeder.sink(q))
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Overloaded as err:
            context.set_trailing_metadata((("retry-after", f"{err.retry_after_s:.0f}"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        done = False
        try:  # from here on the core may hold the request: whatever ends this, free it
            try:
                await asyncio.wrap_future(accepted)
            except ValueError as err:  # the core refused it (e.g. too long): nothing held
                done = True
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            first = True
            while True:  # one message per core iteration that had tokens for this request
                chunks = await q.get()
                if chunks is None:
                    break
                if chunks[-1].finish_reason == DEADLINE:  # the core freed it everywhere
                    done = True
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        chunks[-1].output.error)
                yield chunks_to_pb(chunks, first, req.prompt_ids)
                first = False
                if chunks[-1].finished:
                    done = True
                    break
        finally:
            if not done:  # the client went away (or the core ended the stream): free it
                with contextlib.suppress(RuntimeError):  # the core itself has stopped
                    runner.abort(req.request_id)
        if not done:
            await context.abort(grpc.StatusCode.ABORTED,
                                f"request {req.request_id} was aborted")


class AioServer:
    """A ``grpc.aio`` server on an event loop thread of its own, with the sync server's
    ``stop(grace).wait()`` so callers need not know."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="scheduler-aio",
                                        daemon=True)
        self._thread.start()
        self.server: grpc.aio.Server | None = None

    def run(self, coro) -> object:
        """Run ``coro`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self, grace: float | None = None) -> threading.Event:
        stopped = threading.Event()

        async def stop() -> None:
            if self.server is not None:
                await self.server.stop(grace)
            stopped.set()

        fut = asyncio.run_coroutine_threadsafe(stop(), self.loop)
        fut.add_done_callback(lambda _: (stopped.set(),
                                         self.loop.call_soon_threadsafe(self.loop.stop)))
        return stopped


def start_scheduler_server(scheduler: Scheduler, host: str, port: int
                           ) -> tuple[AioServer, int, health.HealthServicer]:
    """Serve the ``Scheduler`` service (and health) on a ``grpc.aio`` server: open
    ``Generate`` streams cost no thread each, so every request that may be waiting or running
    can have one. Returns the server (``stop(grace).wait()`` as a sync server), the bound
    port and the health servicer."""
    aio = AioServer()
    health_servicer = health.HealthServicer()

    async def start() -> int:
        # Sync handlers (Register, Stats, health, ...) run on this pool; none holds a thread
        # for long.
        server = grpc.aio.server(migration_thread_pool=futures.ThreadPoolExecutor(
            max_workers=32, thread_name_prefix="scheduler-rpc"), options=GRPC_OPTIONS)
        pb_grpc.add_SchedulerServicer_to_server(
            AsyncSchedulerService(scheduler, _LoopFeeder(aio.loop)), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot listen on {host}:{port} (is it in use?)")
        await server.start()
        aio.server = server
        return bound

    try:
        bound = aio.run(start())
    except BaseException:
        aio.loop.call_soon_threadsafe(aio.loop.stop)
        raise
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    def mark_ready() -> None:
        scheduler.ready.wait()
        health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    threading.Thread(target=mark_ready, daemon=True).start()
    return aio, bound, health_servicer
