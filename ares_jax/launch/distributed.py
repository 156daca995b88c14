"""Multi-controller replicas: one replica whose model spans hosts runs as a ``jax.distributed``
group of processes, one per host, that together see one global device mesh.

Every process of the group runs the same program (SPMD); only process 0, the *leader*, talks to
the scheduler, and it hands each command to the others with :func:`broadcast_bytes` so they run
the same jitted steps in the same order.

Where the group's shape comes from, first match wins per value:

1. flags: ``--coordinator HOST:PORT --num-processes N --process-id I`` (:func:`add_arguments`);
2. environment: ``ARES_COORDINATOR``, ``ARES_NUM_PROCESSES``, ``ARES_PROCESS_ID``,
   ``ARES_LOCAL_DEVICE_IDS``;
3. the batch system, only when asked with ``--distributed slurm|k8s`` (or ``ARES_DISTRIBUTED``):
   Slurm's ``SLURM_NTASKS``/``SLURM_PROCID``/node list, or a Kubernetes StatefulSet's pod ordinal
   or Indexed Job's ``JOB_COMPLETION_INDEX``.

The batch systems are opt-in on purpose: ``gpu_host.sh`` starts several independent replicas
inside one Slurm task, and each inherits ``SLURM_PROCID``; guessing from it would join them
into one group by mistake.

``initialize`` must run before anything else touches JAX (JAX's own rule): the group decides
which devices ``jax.devices()`` lists.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import socket
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

ENV_METHOD = "ARES_DISTRIBUTED"
ENV_COORDINATOR = "ARES_COORDINATOR"
ENV_COORDINATOR_PORT = "ARES_COORDINATOR_PORT"
ENV_COORDINATOR_SERVICE = "ARES_COORDINATOR_SERVICE"
ENV_NUM_PROCESSES = "ARES_NUM_PROCESSES"
ENV_PROCESS_ID = "ARES_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "ARES_LOCAL_DEVICE_IDS"

METHODS = ("off", "auto", "slurm", "k8s")
DEFAULT_COORDINATOR_PORT = 8476


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """One process's place in a multi-controller group."""

    coordinator: str  # HOST:PORT of process 0's coordination service
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None
    source: str = "flags"  # where the values came from, for logs

    def __post_init__(self) -> None:
        if not re.fullmatch(r".+:\d+", self.coordinator):
            raise ValueError(f"coordinator must be HOST:PORT, got {self.coordinator!r}")
        if self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id must be in [0, {self.num_processes}), got "
                             f"{self.process_id}")

    @property
    def is_leader(self) -> bool:
        """Process 0 registers with the scheduler and drives the others."""
        return self.process_id == 0


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-controller flags, for ``ares-jax replica`` (and any other entry point)."""
    group = parser.add_argument_group(
        "multi-controller replica (jax.distributed)",
        "Run one replica as a group of processes, one per host, over one global mesh.")
    group.add_argument("--distributed", choices=METHODS, default=None,
                       help="where the group's shape comes from: off, auto (flags and ARES_* "
                            "variables, the default), slurm or k8s (also from $ARES_DISTRIBUTED)")
    group.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                       help="process 0's address for the group's coordination service")
    group.add_argument("--num-processes", type=int, default=None, help="processes in the group")
    group.add_argument("--process-id", type=int, default=None, help="this process's rank")
    group.add_argument("--local-device-ids", default=None, metavar="0,1,...",
                       help="the local devices this process uses (default: all it sees)")
    group.add_argument("--distributed-timeout", type=int, default=300, metavar="S",
                       help="seconds to wait for the whole group to join (default 300)")


def resolve_from_args(args: argparse.Namespace,
                      env: Mapping[str, str] | None = None) -> DistributedSpec | None:
    """:func:`resolve` with the values of :func:`add_arguments`' flags."""
    return resolve(getattr(args, "distributed", None),
                   coordinator=getattr(args, "coordinator", None),
                   num_processes=getattr(args, "num_processes", None),
                   process_id=getattr(args, "process_id", None),
                   local_device_ids=getattr(args, "local_device_ids", None),
                   env=env)


def maybe_initialize(args: argparse.Namespace) -> DistributedSpec | None:
    """Join the group the flags and environment describe, if any; None for a lone process."""
    spec = resolve_from_args(args)
    if spec is not None:
        initialize(spec, timeout_s=getattr(args, "distributed_timeout", 300))
    return spec


# ----------------------------------------------------------------------------- resolution


def resolve(method: str | None = None, *, coordinator: str | None = None,
            num_processes: int | None = None, process_id: int | None = None,
            local_device_ids: str | Sequence[int] | None = None,
            env: Mapping[str, str] | None = None) -> DistributedSpec | None:
    """The group this process belongs to, or None when it runs alone.

    A group of one process is returned as None too: it needs no coordination service.
    Raises ``ValueError`` naming what is missing when the description is partial.
    """
    env = os.environ if env is None else env
    method = method or env.get(ENV_METHOD) or "auto"
    if method not in METHODS:
        raise ValueError(f"--distributed must be one of {METHODS}, got {method!r}")
    if method == "off":
        return None

    values: dict[str, object | None] = {
        "coordinator": coordinator or env.get(ENV_COORDINATOR),
        "num_processes": _int(num_processes, env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES),
        "process_id": _int(process_id, env.get(ENV_PROCESS_ID), ENV_PROCESS_ID),
    }
    source = "flags/env"
    if method == "slurm":
        _fill(values, _from_slurm(env))
        source = "slurm"
    elif method == "k8s":
        _fill(values, _from_k8s(env))
        source = "k8s"

    if all(v is None for v in values.values()):
        if method in ("slurm", "k8s"):
            raise ValueError(f"--distributed {method}: no {method} environment found")
        return None
    missing = [k for k, v in values.items() if v is None]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise ValueError(f"a multi-controller replica needs {flags} as well (or the ARES_* "
                         f"variables; got {', '.join(k for k in values if k not in missing)})")
    ids = _device_ids(local_device_ids if local_device_ids is not None
                      else env.get(ENV_LOCAL_DEVICE_IDS))
    spec = DistributedSpec(coordinator=str(values["coordinator"]),
                           num_processes=int(values["num_processes"]),  # type: ignore[arg-type]
                           process_id=int(values["process_id"]),  # type: ignore[arg-type]
                           local_device_ids=ids, source=source)
    return None if spec.num_processes == 1 else spec


def _int(flag: int | None, text: str | None, name: str) -> int | None:
    if flag is not None:
        return int(flag)
    if text in (None, ""):
        return None
    try:
        return int(text)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {text!r}") from None


def _fill(values: dict[str, object | None], found: Mapping[str, object | None]) -> None:
    """Fill only what flags and ARES_* variables left unset: explicit values win."""
    for key, value in found.items():
        if values.get(key) is None:
            values[key] = value


def _device_ids(value: str | Sequence[int] | None) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    return tuple(int(v) for v in value)


def _from_slurm(env: Mapping[str, str]) -> dict[str, object | None]:
    """One Slurm task per process: ``srun --ntasks N ares-jax replica --distributed slurm``."""
    ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or \
        env.get("SLURM_NODELIST")
    coordinator = None
    if nodelist:
        port = env.get(ENV_COORDINATOR_PORT) or str(slurm_default_port(env))
        coordinator = f"{first_slurm_host(nodelist)}:{port}"
    return {"coordinator": coordinator,
            "num_processes": int(ntasks) if ntasks else None,
            "process_id": int(env["SLURM_PROCID"]) if env.get("SLURM_PROCID") else None}


def slurm_default_port(env: Mapping[str, str]) -> int:
    """A port that differs between jobs and job steps, so two groups on one node do not clash
    (49152-65535, the dynamic range)."""
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    step = int(env.get("SLURM_STEP_ID", "0") or 0)
    return 49152 + (job * 16 + step) % 16384


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[03-05,09],cpu1`` -> ``gpu03``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level comma ends the first entry
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    # Every bracket group contributes the start of its first range.
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def _from_k8s(env: Mapping[str, str]) -> dict[str, object | None]:
    """A StatefulSet (ordinal from the ``apps.kubernetes.io/pod-index`` label passed in as
    ``ARES_PROCESS_ID``, or from the pod's host name ``<set>-<i>``) or an Indexed Job
    (``JOB_COMPLETION_INDEX``). The coordinator is ``ARES_COORDINATOR``, or pod 0 of the set
    through its headless Service ``ARES_COORDINATOR_SERVICE``."""
    hostname = env.get("HOSTNAME") or socket.gethostname()
    match = re.fullmatch(r"(.+)-(\d+)", hostname)
    process_id: int | None = None
    if env.get("JOB_COMPLETION_INDEX"):
        process_id = int(env["JOB_COMPLETION_INDEX"])
    elif match:
        process_id = int(match.group(2))
    coordinator = None
    service = env.get(ENV_COORDINATOR_SERVICE)
    if service and match:
        port = env.get(ENV_COORDINATOR_PORT) or str(DEFAULT_COORDINATOR_PORT)
        coordinator = f"{match.group(1)}-0.{service}:{port}"
    return {"coordinator": coordinator, "num_processes": None, "process_id": process_id}


# ----------------------------------------------------------------------------- runtime


def initialize(spec: DistributedSpec, *, timeout_s: int = 300,
               cpu_collectives: str = "gloo", heartbeat_timeout_s: int | None = None) -> None:
    """Join the group (blocks until every process has joined or ``timeout_s`` passes).

    On CPU, cross-process collectives need an implementation: gloo ships with jaxlib (and is
    its default in recent versions); setting it explicitly keeps older defaults from failing
    with "collectives not implemented". GPUs use NCCL regardless.

    ``heartbeat_timeout_s``: how long the group's coordination service waits for a silent
    process before failing the whole group (JAX's default, 100 s, when None); a replica group
    sets it lower so that a follower whose leader died exits soon rather than serving nobody.
    """
    import jax

    try:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    except (AttributeError, KeyError, ValueError) as err:  # an older or newer jax
        log.warning("could not select CPU collectives %r: %s", cpu_collectives, err)
    log.info("joining a %d-process group as process %d via %s (%s)", spec.num_processes,
             spec.process_id, spec.coordinator, spec.source)
    jax.distributed.initialize(
        coordinator_address=spec.coordinator, num_processes=spec.num_processes,
        process_id=spec.process_id,
        local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None,
        initialization_timeout=timeout_s,
        **({} if heartbeat_timeout_s is None
           else {"heartbeat_timeout_seconds": heartbeat_timeout_s}))


def shutdown() -> None:
    """Leave the group; every process should call it before exiting, so none waits for a
    heartbeat timeout."""
    import jax

    jax.distributed.shutdown()


# One collective carries a payload up to this size (with its length); longer ones take a second,
# padded to a power of two. Fixed shapes matter: every new shape compiles a new psum program.
FRAME_BYTES = 4096


def broadcast_bytes(payload: bytes | None) -> bytes:
    """The leader's ``payload`` on every process of the group (followers pass None).

    Collective: every process must call it, in the same order. The length travels in the
    first frame, so followers need not know the payload's size.
    """
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    leader = jax.process_index() == 0
    if leader and payload is None:
        raise ValueError("the leader must pass the payload to broadcast")
    room = FRAME_BYTES - 8
    frame = np.zeros(FRAME_BYTES, np.uint8)
    if leader:
        head = payload[:room]  # type: ignore[index]
        frame[:8] = np.frombuffer(np.int64(len(payload)).tobytes(), np.uint8)  # type: ignore[arg-type]
        frame[8:8 + len(head)] = np.frombuffer(head, np.uint8)
    frame = np.asarray(multihost_utils.broadcast_one_to_all(frame), np.uint8)
    size = int(frame[:8].view(np.int64)[0])
    data = frame[8:8 + min(size, room)].tobytes()
    if size > room:
        rest = size - room
        buf = np.zeros(1 << (rest - 1).bit_length(), np.uint8)
        if leader:
            buf[:rest] = np.frombuffer(payload[room:], np.uint8)  # type: ignore[index]
        data += np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)[:rest].tobytes()
    return data
