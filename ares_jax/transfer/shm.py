"""``KvTransport`` between processes of one host, through POSIX shared memory (``/dev/shm``).

Source: ``offer`` writes K then V once into a fresh file under ``/dev/shm`` (one segment per
offer) and returns a ``KvTicket`` whose ``address`` names the segment's directory, its host
(boot id and the tmpfs's device number) and the transport's name prefix. Receiver: ``pull``
maps the segment copy-on-write, views K and V with ``np.frombuffer`` (no copy) and
``jax.device_put``s them onto the target sharding. On XLA:CPU that ``device_put`` aliases the
mapped pages, so the block is written once (by the source) and read in place; on GPU it is
one host-to-device copy out of the mapping (NIXL or CUDA IPC would be the device-to-device
path). ``ack``/``release``/expiry/``close`` unlink the segment.

Why raw files and ``mmap``, not ``multiprocessing.shared_memory``: its resource tracker
unlinks (and warns about) any segment a process created and did not unlink itself, and
registers segments that a process merely attached to, so a receiver would unlink what it
pulled. A file under ``/dev/shm`` has no tracker; we own its life instead:

- one segment per offer, never rewritten, so a receiver's arrays may keep aliasing the mapping
  after the source unlinks it (the pages live until the last mapping goes). A pooled arena
  would skip the source's page allocation but could rewrite pages a receiver still aliases;
- names are ``ares-kv-<pid>-<start time>-<instance>-<uuid>``: a transport (``weakref.finalize``,
  also at interpreter exit) removes its own prefix, and every new transport sweeps the
  segments of processes that are gone (pid not running, or running with another start time,
  i.e. a recycled pid), so a SIGKILLed replica leaks ``/dev/shm`` only until the next start;
- the receiver maps ``MAP_PRIVATE`` with write permission: XLA never sees read-only memory,
  and a write (a donation) gets a private copy instead of changing the segment.

A missing segment is a ``TransferError`` at once (the ticket exists only after the segment is
complete, so missing means acknowledged, released, expired, or its process gone); a ticket of
another host (or another ``/dev/shm`` mount: another container) is refused by its address.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding

from ares_jax.transfer.errors import TransferError, TransferTimeout
from ares_jax.transfer.kv_transport import (
    ExpiryCallback,
    KvTicket,
    check_block,
    check_expected,
)
from ares_jax.transfer.offers import BookedOffers, Offer, OfferBook
from ares_jax.transfer.shards import (
    as_source_sharding,
    block_ticket,
    distinct_shards,
    shard_index,
)

log = logging.getLogger(__name__)

KIND = "shm"
PREFIX = "ares-kv-"
DEFAULT_DIR = "/dev/shm"
_ALIGN = 4096  # V starts on a page boundary (XLA:CPU aliases only aligned host buffers)
_MADV_POPULATE_READ = 22  # Linux 5.14: map every page now, in one call, without copying
_WRITE_MAX = 1 << 30  # bytes per pwrite (Linux caps one write at just under 2 GiB)
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-(\d+)-[0-9a-f]+-[0-9a-f]+$")


def process_start(pid: int) -> int | None:
    """``pid``'s start time (clock ticks since boot, /proc/PID/stat field 22), or None when no
    such process runs (a zombie counts as gone). With the pid it names one process run."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[19])


def namespace(directory: str) -> str:
    """What two processes must share to meet in ``directory``: the kernel (boot id) and the
    tmpfs mount (its device number; containers of one host may mount their own)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{boot}.{os.stat(directory).st_dev}"


def sweep_stale(directory: str = DEFAULT_DIR) -> list[str]:
    """Unlink the segments of processes that no longer run; returns their names. Segments of
    running processes, and files that are not ours, are left alone."""
    removed: list[str] = []
    if not os.path.exists("/proc/self/stat"):
        return removed  # no way to tell a running process from a gone one: sweep nothing
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        m = _NAME.match(name)
        if m is None:
            continue
        pid, start = int(m.group(1)), int(m.group(2))
        if process_start(pid) == start:
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            continue  # another process swept it first
        except PermissionError:
            continue  # another user's (/dev/shm is sticky): theirs to sweep
        removed.append(name)
    if removed:
        log.info("removed %d shared-memory KV segment(s) of exited processes from %s",
                 len(removed), directory)
    return removed


def _unlink_prefix(directory: str, prefix: str) -> None:
    """Remove every segment named ``prefix*`` (this transport's own), at close or exit."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            if name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class ShmTransport(BookedOffers):
    """One per process: offers page blocks as ``/dev/shm`` segments, pulls peers' segments."""

    def __init__(self, directory: str = DEFAULT_DIR,
                 devices: Sequence[jax.Device] | None = None, *, sweep: bool = True,
                 poll_s: float = 2e-3) -> None:
        if not os.path.isdir(directory):
            raise TransferError(f"no shared-memory directory {directory} on this host (the shm "
                                "KV transport needs a tmpfs such as /dev/shm; use --transport "
                                "jax)")
        self.directory = directory
        self.devices = list(jax.devices() if devices is None else devices)
        self.poll_s = poll_s
        pid = os.getpid()
        start = process_start(pid)
        # The instance token keeps two transports of one process (tests) out of each other's
        # way; the pid and start time let any later process tell whether we still run.
        self._prefix = f"{PREFIX}{pid}-{start}-{secrets.token_hex(4)}-"
        self._namespace = namespace(directory)
        self._address = f"{KIND}:{self._namespace}:{os.path.join(directory, self._prefix)}"
        self._uuids = itertools.count(1)
        self._uuid_lock = threading.Lock()
        if sweep:
            sweep_stale(directory)
        self._book = OfferBook(drop=self._unlink, name=f"kv-offers-{self._prefix}")
        self._finalizer = weakref.finalize(self, _unlink_prefix, directory, self._prefix)

    @property
    def address(self) -> str:
        return self._address

    def _path(self, uuid: int) -> str:
        return os.path.join(self.directory, f"{self._prefix}{uuid:x}")

    # ------------------------------------------------------------------------- source side

    def offer(self, k: jax.Array, v: jax.Array, *, ttl_s: float = 60.0,
              on_expire: ExpiryCallback | None = None) -> KvTicket:
        """Copy the block into a new segment; see ``KvTransport.offer``."""
        sharding = check_block(k, v)
        with self._uuid_lock:
            uuid = next(self._uuids)
        path = self._path(uuid)
        k_bytes = k.nbytes
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise TransferError(f"cannot create shared-memory segment {path}: {err}") from err
        try:
            try:
                # Reserve every page now: a full tmpfs answers ENOSPC here, not SIGBUS later.
                os.posix_fallocate(fd, 0, _aligned(k_bytes) + k_bytes)
                _write(fd, k, 0)
                _write(fd, v, _aligned(k_bytes))
            finally:
                os.close(fd)
            self._book.add(Offer(uuid=uuid, expires_at=time.monotonic() + ttl_s,
                                 on_expire=on_expire))
        except OSError as err:
            self._unlink(uuid)
            raise TransferError(f"cannot write a {2 * k_bytes}-byte KV block to {path}: {err} "
                                f"(is {self.directory} full?)") from err
        except BaseException:
            self._unlink(uuid)
            raise
        whole = shard_index(tuple(slice(None) for _ in k.shape), k.shape)
        return block_ticket(uuid=uuid, address=self._address, kind=KIND, k=k,
                            sharding=sharding, shards=(whole,), ttl_s=ttl_s)

    def _unlink(self, uuid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(uuid))

    # ------------------------------------------------------------------------- receiver side

    def segment_path(self, ticket: KvTicket) -> str:
        """The ticket's segment on this host; ``TransferError`` if it lives on another."""
        if ticket.kind != KIND:
            raise TransferError(f"ShmTransport cannot pull a {ticket.kind!r} ticket (the "
                                "source runs another KV transport; use the same --transport "
                                "on every replica)")
        try:
            _, space, prefix = ticket.address.split(":", 2)
        except ValueError:
            raise TransferError(f"malformed shm ticket address {ticket.address!r}") from None
        if space != self._namespace:
            raise TransferError(f"block {ticket.uuid} is in shared memory of another host or "
                                f"/dev/shm mount ({space}; this process sees {self._namespace}):"
                                " the shm transport only connects processes of one host; use "
                                "--transport jax across hosts")
        return f"{prefix}{ticket.uuid:x}"

    def pull(self, ticket: KvTicket, *, target: NamedSharding | None = None,
             timeout_s: float = 30.0, shape: tuple[int, ...] | None = None,
             dtype: str | None = None) -> tuple[jax.Array, jax.Array]:
        """Map the segment and put K and V onto ``target`` (default: the source's layout on this
        process's first devices); see ``KvTransport.pull``."""
        check_expected(ticket, shape, dtype)
        path = self.segment_path(ticket)
        deadline = time.monotonic() + timeout_s
        layout = target if target is not None else as_source_sharding(ticket, self.devices)
        dtype_np = jax.numpy.dtype(ticket.dtype)
        count = int(np.prod(ticket.shape))
        k_bytes = count * dtype_np.itemsize
        size = _aligned(k_bytes) + k_bytes
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TransferError(f"block {ticket.uuid}: shared-memory segment {path} is gone "
                                "(acknowledged, released or expired at the source, or its "
                                "process exited)") from None
        except OSError as err:
            raise TransferError(f"block {ticket.uuid}: cannot open {path}: {err}") from err
        try:
            found = os.fstat(fd).st_size
            if found != size:
                raise TransferError(f"block {ticket.uuid}: segment {path} holds {found} bytes, "
                                    f"the ticket's {ticket.shape} {ticket.dtype} K+V need {size}")
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        # Fault every page in now, as one call, rather than one fault at a time on first use.
        with contextlib.suppress(OSError, ValueError):
            mapped.madvise(_MADV_POPULATE_READ)
        k_np = np.frombuffer(mapped, dtype_np, count, 0).reshape(ticket.shape)
        v_np = np.frombuffer(mapped, dtype_np, count, _aligned(k_bytes)).reshape(ticket.shape)
        try:
            k, v = jax.device_put((k_np, v_np), layout)
        except (ValueError, RuntimeError) as err:
            raise TransferError(f"device_put of block {ticket.uuid} ({ticket.shape}) onto "
                                f"{layout} failed: {err}") from err
        # The mapping lives as long as k_np/v_np, which XLA:CPU keeps while it aliases them.
        sleep = 5e-5
        while not (k.is_ready() and v.is_ready()):
            now = time.monotonic()
            if now >= deadline:
                raise TransferTimeout(f"pull of block {ticket.uuid} from {path} timed out after "
                                      f"{timeout_s} s")
            time.sleep(min(sleep, deadline - now))
            sleep = min(2 * sleep, self.poll_s)
        return k, v

    def close(self) -> None:
        """Drop every offer (without callbacks) and unlink whatever this transport created."""
        self._book.close()
        self._finalizer()


def _write(fd: int, x: jax.Array, offset: int) -> None:
    """``x`` as C-ordered bytes at ``offset``: one copy (``pwrite``) of each distinct shard
    from its host buffer (on GPU, ``np.asarray`` first copies it to the host)."""
    parts, indices = distinct_shards(x)
    if len(parts) == 1:
        _pwrite_all(fd, np.ascontiguousarray(np.asarray(parts[0])), offset)
        return
    # Several shards (heads split over devices): place each one into the mapped block.
    with mmap.mmap(fd, x.nbytes, offset=offset) as mapped:
        whole = np.frombuffer(mapped, x.dtype).reshape(x.shape)
        for part, index in zip(parts, indices):
            whole[tuple(slice(a, b) for a, b in index)] = np.asarray(part)
        del whole


def _pwrite_all(fd: int, arr: np.ndarray, offset: int) -> None:
    view = memoryview(arr.reshape(-1).view(np.uint8))  # bytes (bfloat16 has no buffer code)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + _WRITE_MAX], offset + done)
