"""A replica process that spans hosts: one ``jax.distributed`` group whose processes build the
same ``ReplicaProcess`` over the group's global devices and run every engine call together.

Every jitted computation over a mesh that spans processes must be entered by all of them, in
the same order (SPMD). So the group has one seam: the leader's mesh handles are
``MirroredPrefill``/``MirroredDecode``, which broadcast each call that runs a computation or
changes host state (a command, a decode step, the replica ids the scheduler assigns) with
``distributed.broadcast_bytes`` before running it; the followers' loop (``follow``) applies
the same call to their own handles. Host state (slot tables, page allocators, held blocks)
stays identical on every process because the programs are deterministic and their outputs
replicated; the followers' events are dropped, only the leader reports to the scheduler.

Process 0, the leader, serves gRPC and talks to the scheduler exactly as a lone replica process
does; the followers run no server. The leader sends a keepalive when idle (a follower waits for
the next call inside a collective) and a stop when it shuts down. A follower whose leader dies
sees its collective fail, or ``jax.distributed``'s heartbeat fail the group, and exits; a
leader whose follower dies sees its next broadcast fail and stops.

KV moves between the group's own meshes (``transfer.local.per_process_copy``: each process
copies its own shards). KV to or from another process is refused with the reason: the
``jax.experimental.transfer`` offer and pull work on arrays of one process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ares_jax.launch import distributed
from ares_jax.replica.local import LocalDecodeReplica, LocalPrefillReplica
from ares_jax.replica.types import KvBlock, Prefilled
from ares_jax.serving.replica_server import ReplicaProcess
from ares_jax.serving.step_lock import StepLock

log = logging.getLogger("ares_jax.multihost")

KEEPALIVE_S = 1.0  # the longest a follower waits inside a collective with nothing to run
HEARTBEAT_TIMEOUT_S = 10  # jax.distributed's; a dead process fails the group within this
PROCESS = -1  # Call.target of a call on the ReplicaProcess rather than one mesh
STOP, NOOP = "stop", "noop"

Send = Callable[[bytes | None], bytes]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Call:
    """One call the leader made, as the followers replay it."""

    target: int  # mesh index in ``ReplicaProcess.replicas``, or PROCESS
    method: str
    args: tuple[Any, ...] = ()


class GroupBroken(RuntimeError):
    """A broadcast failed: a process of the group is gone, so the group cannot go on."""


def portable(value: Any) -> Any:
    """``value`` without device arrays: a block read from a sibling mesh is read again by each
    follower (from its own sibling handle) inside the replayed call."""
    if isinstance(value, KvBlock) and value.arrays is not None:
        return dataclasses.replace(value, arrays=None)
    if isinstance(value, Prefilled) and value.kv is not None:
        return dataclasses.replace(value, kv=portable(value.kv))
    return value


class Mirror:
    """The leader's end of the group: each outermost call is broadcast, then run here.

    Calls happen under the process lock, so the followers see them in the leader's order;
    calls nested inside a mirrored one (a sibling's export inside an import) are not sent,
    since the follower's replay of the outer call makes them itself.
    """

    def __init__(self, lock: StepLock, send: Send = distributed.broadcast_bytes,
                 on_broken: Callable[[], None] = lambda: None) -> None:
        self.lock = lock
        self._send_bytes = send
        self._on_broken = on_broken
        self._depth = 0
        self.sent = 0
        self.last_sent = time.monotonic()
        self.closed = False
        self.broken: str | None = None

    def run(self, target: int, method: str, args: tuple, fn: Callable[..., Any]) -> Any:
        with self.lock:
            if self._depth == 0:
                self._send(Call(target=target, method=method,
                                args=tuple(portable(a) for a in args)))
            self._depth += 1
            try:
                return fn(*args)
            finally:
                self._depth -= 1

    def _send(self, call: Call) -> None:
        if self.broken is not None:
            raise GroupBroken(self.broken)
        if self.closed:
            raise GroupBroken(f"the group was stopped; {call.method} not sent")
        try:
            self._send_bytes(pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as err:  # noqa: BLE001 - any failure of the collective ends the group
            self.broken = f"broadcast to the group failed: {type(err).__name__}: {err}"
            log.error("%s; stopping", self.broken)
            self._on_broken()
            raise GroupBroken(self.broken) from err
        self.sent += 1
        self.last_sent = time.monotonic()

    def keepalive(self, stopped: threading.Event, interval_s: float = KEEPALIVE_S) -> None:
        """Send a no-op whenever nothing was sent for ``interval_s``, until ``stopped``."""
        while not stopped.wait(interval_s / 2):
            with self.lock:
                if self.closed or self.broken is not None:
                    return
                if time.monotonic() - self.last_sent >= interval_s:
                    try:
                        self._send(Call(target=PROCESS, method=NOOP))
                    except GroupBroken:
                        return

    def stop(self) -> None:
        """Tell the followers to leave; nothing is sent after this."""
        with self.lock:
            if not self.closed and self.broken is None:
                with contextlib.suppress(GroupBroken):
                    self._send(Call(target=PROCESS, method=STOP))
            self.closed = True


class _Mirrored:
    """Mixin for a leader's mesh handle: the calls below go through ``Mirror.run``."""

    mirror: Mirror | None = None
    index: int = 0

    def bind(self, mirror: Mirror, index: int) -> None:
        self.mirror, self.index = mirror, index


def _mirrored(name: str) -> Callable[..., Any]:
    def call(self: _Mirrored, *args: Any) -> Any:
        run = getattr(super(_Mirrored, self), name)
        if self.mirror is None:
            return run(*args)
        return self.mirror.run(self.index, name, args, run)

    call.__name__ = name
    call.__doc__ = f"``{name}``, broadcast to the group's followers first."
    return call


# Every handle method that runs a computation on the mesh or changes host state; reads
# (load, poll, block, held_block_ids) run on the leader alone.
MIRRORED = ("prefill", "insert", "drop_kv", "release", "advance", "reserve", "export",
            "import_kv", "detach", "reattach", "adopt")


class MirroredPrefill(_Mirrored, LocalPrefillReplica):
    """A leader's prefill mesh."""


class MirroredDecode(_Mirrored, LocalDecodeReplica):
    """A leader's decode mesh."""


for _cls in (MirroredPrefill, MirroredDecode):
    for _name in MIRRORED:
        setattr(_cls, _name, _mirrored(_name))


class GroupLeader(ReplicaProcess):
    """Process 0's ReplicaProcess: served over gRPC as usual, every engine call mirrored."""

    prefill_type = MirroredPrefill
    decode_type = MirroredDecode

    def __init__(self, *args: Any, group: distributed.DistributedSpec,
                 send: Send = distributed.broadcast_bytes, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        self.mirror = Mirror(self.lock, send, on_broken=self.stopped.set)
        for i, r in enumerate(self.replicas):
            r.bind(self.mirror, i)  # type: ignore[attr-defined]

    def assign_ids(self, ids: Sequence[int], process: str, address: str) -> None:
        # The followers need the scheduler's ids too: KV blocks name their source by them.
        self.mirror.run(PROCESS, "assign_ids", (list(ids), process, address),
                        lambda *a: ReplicaProcess.assign_ids(self, *a))


def follow(proc: ReplicaProcess, receive: Send = distributed.broadcast_bytes) -> int:
    """A follower's loop: apply every call the leader broadcasts until it says stop.
    Returns 0 after a stop, 1 when the group broke (a collective failed)."""
    applied = 0
    while True:
        try:
            call = pickle.loads(receive(None))
        except Exception as err:  # noqa: BLE001 - the leader is gone or the group failed
            log.error("the group broke after %d call(s): %s: %s", applied, type(err).__name__,
                      err)
            return 1
        if call.method == STOP:
            log.info("the leader stopped the group after %d call(s)", applied)
            return 0
        if call.method == NOOP:
            continue
        applied += 1
        target = proc if call.target == PROCESS else proc.replicas[call.target]
        try:
            getattr(target, call.method)(*call.args)
        except Exception as err:  # noqa: BLE001 - the leader's same call raised the same way
            log.debug("replayed %s raised %s: %s", call.method, type(err).__name__, err)
        if call.target != PROCESS:
            target.poll()  # only the leader reports events


# ----------------------------------------------------------------------------- launching


def group_devices(devices_per_mesh: int, meshes: int) -> list[jax.Device]:
    """The group's global devices ordered for ``ReplicaProcess``: mesh i takes the i-th slice
    of every process's local devices, so every mesh spans every process (the point of a
    group) and the meshes are laid out alike (KV between them never crosses hosts)."""
    procs = jax.process_count()
    if devices_per_mesh % procs:
        raise ValueError(f"--devices-per-replica {devices_per_mesh} must be a multiple of the "
                         f"group's {procs} processes (each mesh spans all of them)")
    per = devices_per_mesh // procs
    by_process: dict[int, list[jax.Device]] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    for p, devs in sorted(by_process.items()):
        if len(devs) < per * meshes:
            raise ValueError(f"{meshes} mesh(es) of {devices_per_mesh} devices need {per * meshes} "
                             f"devices in each of the {procs} processes; process {p} has "
                             f"{len(devs)}")
    order = [sorted(by_process[p], key=lambda d: d.id) for p in sorted(by_process)]
    return [devs[i * per + j] for i in range(meshes) for devs in order for j in range(per)]


def local_devices_needed(devices_per_mesh: int, meshes: int, processes: int) -> int:
    """Devices each process of a group contributes."""
    return meshes * max(1, devices_per_mesh // processes)


def on_host(tree: Any) -> Any:
    """Device arrays of one process as numpy: what ``device_put`` onto a mesh that spans
    processes accepts (a committed array of one process is refused)."""
    return jax.tree.map(np.asarray, tree)


def serve_group(args: argparse.Namespace, roles: list[str], spec: distributed.DistributedSpec,
                model, head, ecfg) -> int:
    """Run this process's part of a multi-controller replica (after ``distributed.initialize``
    and loading ``model`` onto a local device)."""
    from ares_jax.serving.cli import install_stop_handlers
    from ares_jax.serving.replica_server import serve_replica

    model = dataclasses.replace(model, weights=on_host(model.weights), derived={})
    head = None if head is None else (head[0], on_host(head[1]))
    devices = group_devices(args.devices_per_replica, len(roles))
    log.info("process %d of %d: %d mesh(es) over %s", spec.process_id, spec.num_processes,
             len(roles), [d.id for d in devices])
    if not spec.is_leader:
        proc = ReplicaProcess(model, roles, args.devices_per_replica, ecfg, head=head,
                              devices=devices)
        proc.group = spec
        code = follow(proc)
        return _leave(code)
    leader = GroupLeader(model, roles, args.devices_per_replica, ecfg, head=head,
                         devices=devices, group=spec)
    install_stop_handlers(leader.stopped)
    keepalive = threading.Thread(target=leader.mirror.keepalive, args=(leader.stopped,),
                                 name="group-keepalive", daemon=True)
    keepalive.start()
    try:
        serve_replica(leader, scheduler=args.scheduler, host=args.host, port=args.grpc_port,
                      advertise_host=args.advertise_host)
    finally:
        leader.stopped.set()
        keepalive.join(timeout=5)
        leader.mirror.stop()
    return _leave(1 if leader.mirror.broken else 0)


def _leave(code: int) -> int:
    """Leave the group. A broken group exits at once: the shutdown barrier (also run by JAX's
    exit hook) would wait for processes that are gone."""
    if code != 0:
        logging.shutdown()
        os._exit(code)
    log.info("leaving the group")
    distributed.shutdown()
    log.info("left the group")
    return code
