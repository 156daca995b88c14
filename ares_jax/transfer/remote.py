"""KV transfer across processes and hosts with ``jax.experimental.transfer``.

The source offers a request's page block under a uuid (``await_pull``) and hands the receiver a
``PageTicket`` over the control channel (gRPC in the scheduler, a pipe in tests). The receiver
pulls with the source's *exact* shape, dtype and sharding, because a different spec has been
seen to return wrong data silently, and only then reshards onto its own mesh with
``device_put``.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import threading
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import transfer as jax_transfer
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ares_jax.transfer.errors import TransferError, TransferShapeMismatch, TransferTimeout


@dataclasses.dataclass(frozen=True, kw_only=True)
class PageTicket:
    """What a receiver needs to pull one offered page block (K and V)."""

    uuid: int
    address: str
    shape: tuple[int, ...]
    dtype: str
    mesh_shape: tuple[int, ...]
    mesh_axes: tuple[str, ...]
    spec: tuple[str | None, ...]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> PageTicket:
        d = json.loads(text)
        return PageTicket(uuid=int(d["uuid"]), address=d["address"], shape=tuple(d["shape"]),
                          dtype=d["dtype"], mesh_shape=tuple(d["mesh_shape"]),
                          mesh_axes=tuple(d["mesh_axes"]), spec=tuple(d["spec"]))


def _spec_entries(spec: PartitionSpec) -> tuple[str | None, ...]:
    out = []
    for entry in spec:
        if entry is not None and not isinstance(entry, str):
            raise TransferError(f"multi-axis partition entries are not supported: {spec}")
        out.append(entry)
    return tuple(out)


class KVTransferServer:
    """One per process: offers page blocks to, and pulls them from, peer processes."""

    _uuids = itertools.count(1)

    def __init__(self, address: str = "127.0.0.1:0",
                 devices: Sequence[jax.Device] | None = None) -> None:
        devs = list(jax.devices() if devices is None else devices)
        host = address.rsplit(":", 1)[0]
        self._server = jax_transfer.start_transfer_server(devs[0].client, address,
                                                          [f"{host}:0"])
        self.devices = devs

    @property
    def address(self) -> str:
        return self._server.address()

    def offer(self, k: jax.Array, v: jax.Array, uuid: int | None = None) -> PageTicket:
        """Make ``k``/``v`` pullable once; returns the ticket to send to the receiver."""
        sharding = k.sharding
        if not isinstance(sharding, NamedSharding) or v.sharding != sharding or \
                k.shape != v.shape:
            raise TransferError("offer needs K and V of one shape on one NamedSharding")
        uuid = next(self._uuids) if uuid is None else uuid
        self._server.await_pull(uuid, [k, v])
        mesh = sharding.mesh
        return PageTicket(uuid=uuid, address=self.address, shape=tuple(k.shape),
                          dtype=str(k.dtype), mesh_shape=tuple(mesh.devices.shape),
                          mesh_axes=tuple(mesh.axis_names), spec=_spec_entries(sharding.spec))

    def pull(self, ticket: PageTicket, *, shape: Sequence[int] | None = None,
             dtype: str | None = None, target: NamedSharding | None = None,
             timeout_s: float = 30.0) -> tuple[jax.Array, jax.Array]:
        """Pull an offered block, then reshard it onto ``target`` (default: as pulled).

        ``shape``/``dtype`` are what the caller expects; a mismatch with the ticket is refused
        before any byte moves, rather than risking a silently wrong pull.
        """
        if shape is not None and tuple(shape) != ticket.shape:
            raise TransferShapeMismatch(f"expected a page block of shape {tuple(shape)}, the "
                                        f"source offers {ticket.shape}")
        if dtype is not None and str(np.dtype(dtype)) != ticket.dtype:
            raise TransferShapeMismatch(f"expected dtype {dtype}, the source offers "
                                        f"{ticket.dtype}")
        n = int(np.prod(ticket.mesh_shape))
        if n > len(self.devices):
            raise TransferShapeMismatch(f"the source block is sharded over {n} devices; this "
                                        f"process has {len(self.devices)}")
        mesh = Mesh(np.array(self.devices[:n]).reshape(ticket.mesh_shape), ticket.mesh_axes)
        as_source = NamedSharding(mesh, PartitionSpec(*ticket.spec))
        spec = jax.ShapeDtypeStruct(ticket.shape, np.dtype(ticket.dtype), sharding=as_source)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        outcome: dict[str, object] = {}

        def run() -> None:
            try:
                conn = self._server.connect(ticket.address)
                pulled = conn.pull(ticket.uuid, [spec, spec], timeout=deadline)
                outcome["arrays"] = jax.block_until_ready(pulled)
            except Exception as err:  # noqa: BLE001 - the runtime raises one generic type
                outcome["error"] = err

        # The runtime's own deadline does not cover a uuid that is never offered, so the wait
        # happens on a daemon thread that we stop waiting for at the deadline.
        waiter = threading.Thread(target=run, daemon=True, name=f"kv-pull-{ticket.uuid}")
        waiter.start()
        waiter.join(timeout_s)
        if waiter.is_alive():
            raise TransferTimeout(f"pull of block {ticket.uuid} from {ticket.address} timed out "
                                  f"after {timeout_s} s")
        if "error" in outcome:
            raise TransferError(f"pull of block {ticket.uuid} from {ticket.address} failed: "
                                f"{outcome['error']}") from outcome["error"]  # type: ignore
        k, v = outcome["arrays"]  # type: ignore[misc]
        if target is not None and target != as_source:
            k, v = jax.device_put((k, v), target)
        return k, v
