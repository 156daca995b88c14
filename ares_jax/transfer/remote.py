"""``KvTransport`` across processes and hosts, over ``jax.experimental.transfer``.

Source: ``offer`` registers each distinct shard of K and V with the runtime's transfer server
under one uuid (``await_pull``) and returns a ``KvTicket``. Receiver: ``pull`` asks the source's
server for those buffers with their exact shapes and dtypes, each landing on one local device
(a pull with another layout than the offered one has been seen to return wrong data silently),
then rebuilds the block and reshards it onto the caller's target with ``device_put``.

What makes it fast (measured in ``docs/results_transfer.md``):

- a replicated block travels once, not once per replica (``shards.distinct_shards``);
- one cached connection per peer (a connect costs a round trip plus a bulk-transport set-up);
- ``use_raw_buffers``: the source sends straight from the device buffers instead of first
  copying every chunk into a staging buffer;
- two bulk (data) sockets instead of one, each with its own send and receive thread, so the
  kernel copies of the two streams overlap; and 4 MiB chunks instead of 256 MiB, so a chunk
  is on the wire while the next one is being copied;
- no thread per pull: the pull is asynchronous and we poll ``is_ready`` up to the deadline.

Timeouts and dropping, as ``jaxlib`` 0.10.2 behaves (see ``docs/KV_TRANSFER.md``): the
runtime has no cancel call, and its own timeouts are enforced lazily, only when the source's
pull table is next touched. So the receiver enforces its deadline itself, and the source drops
an offer by *replacing* the runtime's entry with a one-byte tombstone that has already expired
and then touching the table, which frees the block at once. A ``tick`` every
``sweep_interval_s`` touches the table so that pulls that timed out on their receiver (uuid
never offered) are answered with an error and their landing buffers freed.
"""

from __future__ import annotations

import dataclasses
import datetime
import random
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import transfer as jax_transfer
from jax.sharding import NamedSharding, SingleDeviceSharding

from ares_jax.transfer.errors import (
    TransferError,
    TransferShapeMismatch,
    TransferTimeout,
)
from ares_jax.transfer.kv_transport import (
    ExpiryCallback,
    KvTicket,
    check_block,
    check_expected,
)
from ares_jax.transfer.offers import BookedOffers, Offer, OfferBook
from ares_jax.transfer.shards import (
    as_source_sharding,
    assemble,
    block_ticket,
    direct_layout,
    distinct_shards,
    landing_devices,
)

KIND = "jax-transfer"
_SWEEP_UUID = 2**63 - 1  # never offered: a touch of the pull table that frees expired entries


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransferSettings:
    """Transfer-server options. Both ends must use a ``transfer_size`` at least as large as
    the other's chunks (the receiver's socket slab holds one chunk)."""

    bulk_connections: int = 2  # data sockets per peer connection (1 recv + 1 send thread each)
    transfer_size: int = 4 << 20  # bytes per chunk on the wire
    max_num_parallel_copies: int = 8
    use_raw_buffers: bool = True
    sweep_interval_s: float = 1.0
    poll_s: float = 2e-3  # longest sleep between readiness checks while pulling


class JaxTransferTransport(BookedOffers):
    """One per process: offers page blocks to, and pulls them from, peer processes."""

    def __init__(self, address: str = "127.0.0.1:0",
                 devices: Sequence[jax.Device] | None = None,
                 settings: TransferSettings = TransferSettings()) -> None:
        devs = list(jax.devices() if devices is None else devices)
        host = address.rsplit(":", 1)[0]
        self.settings = settings
        self.devices = devs
        # The transport addresses are where the bulk sockets listen; with none, the runtime
        # uses an in-process queue that a peer in another process cannot reach.
        self._server = jax_transfer.start_transfer_server(
            devs[0].client, address, [f"{host}:0"] * settings.bulk_connections,
            max_num_parallel_copies=settings.max_num_parallel_copies,
            transfer_size=settings.transfer_size, use_raw_buffers=settings.use_raw_buffers)
        self._address = self._server.address()
        self._tombstone = jax.device_put(np.zeros((1,), np.uint8), devs[0])
        self._server_lock = threading.Lock()
        self._connections: dict[str, object] = {}
        self._conn_lock = threading.Lock()
        # Random uuids: a stale ticket from a restarted peer must not name a fresh offer.
        self._uuid_base = random.getrandbits(40) << 20
        self._uuid_count = 0
        self._book = OfferBook(drop=self._drop, tick=self._sweep,
                               tick_interval_s=settings.sweep_interval_s,
                               name=f"kv-offers-{self._address}")

    @property
    def address(self) -> str:
        return self._address

    # ------------------------------------------------------------------------- source side

    def offer(self, k: jax.Array, v: jax.Array, *, ttl_s: float = 60.0,
              on_expire: ExpiryCallback | None = None, uuid: int | None = None) -> KvTicket:
        """Register the block with the transfer server; see ``KvTransport.offer``."""
        sharding = check_block(k, v)
        k_parts, indices = distinct_shards(k)
        v_parts, _ = distinct_shards(v)
        if uuid is None:
            with self._conn_lock:
                self._uuid_count += 1
                uuid = self._uuid_base + self._uuid_count
        elif self._book.get(uuid) is not None or uuid == _SWEEP_UUID:
            # Re-offering would silently replace (and so drop) the pending block.
            raise ValueError(f"uuid {uuid} is already offered or reserved")
        # The runtime's own timeout backs ours up, should this process stop ticking.
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ttl_s)
        with self._server_lock:
            self._server.await_pull(uuid, k_parts + v_parts, timeout=deadline)
        try:
            self._book.add(Offer(uuid=uuid, expires_at=time.monotonic() + ttl_s,
                                 on_expire=on_expire))
        except (RuntimeError, ValueError):
            self._drop(uuid)
            raise
        return block_ticket(uuid=uuid, address=self._address, kind=KIND, k=k,
                            sharding=sharding, shards=indices, ttl_s=ttl_s,
                            chunk_bytes=self.settings.transfer_size)

    def _drop(self, uuid: int) -> None:
        """Let the runtime forget ``uuid``'s buffers now.

        There is no cancel call. Re-offering the uuid replaces (and so frees) the entry; the
        replacement is a tombstone that expired a second ago, which the sweep right after
        removes. A block that was already pulled in full is gone from the table already; the
        tombstone is then swept the same way.
        """
        past = datetime.datetime.now() - datetime.timedelta(seconds=1)
        with self._server_lock:
            self._server.await_pull(uuid, [self._tombstone], timeout=past)
            self._server.await_pull(_SWEEP_UUID, [self._tombstone], timeout=past)

    def _sweep(self) -> None:
        past = datetime.datetime.now() - datetime.timedelta(seconds=1)
        with self._server_lock:
            self._server.await_pull(_SWEEP_UUID, [self._tombstone], timeout=past)

    # ------------------------------------------------------------------------- receiver side

    def _connection(self, address: str) -> object:
        with self._conn_lock:
            conn = self._connections.get(address)
            if conn is None:
                conn = self._server.connect(address)
                self._connections[address] = conn
            return conn

    def _forget_connection(self, address: str) -> None:
        with self._conn_lock:
            self._connections.pop(address, None)

    def pull(self, ticket: KvTicket, *, target: NamedSharding | None = None,
             timeout_s: float = 30.0, shape: tuple[int, ...] | None = None,
             dtype: str | None = None) -> tuple[jax.Array, jax.Array]:
        """Pull an offered block, then reshard it onto ``target`` (default: the source's layout
        on this process's first devices); see ``KvTransport.pull``."""
        check_expected(ticket, shape, dtype)
        if ticket.kind != KIND:
            raise TransferError(f"JaxTransferTransport cannot pull a {ticket.kind!r} ticket")
        if ticket.chunk_bytes > self.settings.transfer_size:
            raise TransferShapeMismatch(
                f"the source sends {ticket.chunk_bytes}-byte chunks; this transport receives at "
                f"most {self.settings.transfer_size} (set TransferSettings.transfer_size alike)")
        layout = direct_layout(ticket, target) or as_source_sharding(ticket, self.devices)
        dtype_np = np.dtype(ticket.dtype)
        specs = []
        for index, device in zip(ticket.shards, landing_devices(ticket, layout)):
            shard_shape = tuple(stop - start for start, stop in index)
            specs.append(jax.ShapeDtypeStruct(shard_shape, dtype_np,
                                              sharding=SingleDeviceSharding(device)))
        deadline = time.monotonic() + timeout_s
        # The source answers a pull still waiting past this with "Pull expired" (at its next
        # sweep), which frees our landing buffers; a little after our own deadline, so that we
        # normally time out first and the runtime only cleans up.
        runtime_deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s + 1)
        try:
            conn = self._connection(ticket.address)
            pulled = conn.pull(ticket.uuid, specs + specs,  # type: ignore[attr-defined]
                               timeout=runtime_deadline)
        except Exception as err:  # noqa: BLE001 - the runtime raises one generic type
            self._forget_connection(ticket.address)
            raise TransferError(f"pull of block {ticket.uuid} from {ticket.address} failed: "
                                f"{err}") from err
        if not _wait_ready(pulled, deadline, self.settings.poll_s):
            # The request stays queued at the source until its next sweep answers it with an
            # error (which frees our landing buffers), or until the connection closes.
            raise TransferTimeout(f"pull of block {ticket.uuid} from {ticket.address} timed out "
                                  f"after {timeout_s} s")
        try:
            jax.block_until_ready(pulled)
        except Exception as err:  # noqa: BLE001
            message = str(err)
            if "Pull expired" in message:
                raise TransferTimeout(f"pull of block {ticket.uuid} from {ticket.address} "
                                      f"expired at the source: {message}") from err
            if "closed" in message.lower():
                self._forget_connection(ticket.address)  # the next pull reconnects
            raise TransferError(f"pull of block {ticket.uuid} from {ticket.address} failed: "
                                f"{message}") from err
        n = len(ticket.shards)
        k = assemble(ticket, pulled[:n], layout, target)
        v = assemble(ticket, pulled[n:], layout, target)
        return k, v

    def close(self) -> None:
        """Drop every offer and the cached connections. The runtime server itself lives until
        the process exits (it has no stop call)."""
        self._book.close()
        with self._conn_lock:
            self._connections.clear()


def _wait_ready(arrays: Sequence[jax.Array], deadline: float, poll_s: float) -> bool:
    """True once every array is ready (or failed), False at the deadline. Polls with a
    growing sleep: a thread per pull would cost more than the few wake-ups."""
    sleep = 5e-5
    while not all(a.is_ready() for a in arrays):
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(sleep, deadline - now))
        sleep = min(2 * sleep, poll_s)
    return True


# Names from before the KvTransport seam, kept for code that imports them.
KVTransferServer = JaxTransferTransport
PageTicket = KvTicket
