"""KV transfer throughput within a process and across processes, against the machine's memory
copy bandwidth measured in the same run (issue 6, section 4, second bullet).

The payload is one request's K and V page blocks, ``[L, n, S, KVH, K]`` float32 each, with the
embedded SmolLM2-135M's page geometry (L=30, S=16, KVH=3, K=64: 368,640 B per page per K or V,
46,080 B of K+V per token). ``n`` is chosen per target size (``--sizes-mb``, K+V together); the
reported MB are the actual block bytes. Blocks live in the KV pool's sharding on a 2-device mesh:
SmolLM2's 3 KV heads do not divide a 2-way ``model`` axis, so the block is *replicated* on both
devices, and each transfer writes 2 physical copies (reported as ``replicas``). Throughput is
logical payload (K+V bytes of the block) per second.

Measured, for every size:

- ``handoff``: ``ares_jax.transfer.local.handoff`` (``jax.device_put``) of the block from mesh
  A (devices 0-1) to mesh B (devices 2-3), until ready.
- ``copy_path``: what one migration stage does, ``read_pages`` (gather the request's pages out of
  a source pool) + ``handoff`` + ``write_pages`` (scatter into the destination pool, donated), the
  kernels of ``DecodeEngine.export_pages``/``import_pages`` for scattered page ids. Page ids
  are padded to a power of two exactly as ``export_pages`` does.
- ``copy_path_runs``: the same for a contiguous page run, as a fresh allocator hands them out
  and as a migration copy stage sends it (``ares_jax.replica.local``): power-of-two chunks, each a
  ``read_page_run`` slice + ``handoff`` + ``write_page_run`` slice update (donated).
- Across processes, a spawned source process (``benchmarks/kv_transfer_source.py``) offers the
  block over localhost and this process pulls it, the modes below round-robin in a rotating order
  (so load drift hits all alike), each mode's first call (connection set-up) reported apart:

  - ``legacy_pull``: the receiver as before the ``KvTransport`` seam: runtime defaults with one
    bulk socket (256 MiB chunks, staging copies), a connect and a waiter thread per pull, the
    source's full replicated sharding on the wire (2 copies of the block);
  - ``remote_pull``: ``JaxTransferTransport.pull`` (tuned settings, one copy on the wire)
    onto the receiver's KV-pool sharding on 2 devices, i.e. including the local copy that
    makes the second replica;
  - ``remote_pull_one_device``: the same onto one device (the transfer alone);
  - ``shm_pull`` / ``shm_pull_pool``: ``ShmTransport.pull`` (``/dev/shm``, same host only)
    onto one device / onto the pool layout. The source offers the block right before each such
    pull (its one copy, into a fresh segment) and the receiver acknowledges it right after, both
    outside the timed pull; the source times its offer, reported as ``offer_ms_median``, and
    ``fraction_of_memcpy_with_offer`` sets offer + pull against the memcpy;
  - ``memcpy``: a numpy copy of the same payload between warm buffers.

  Each pull's ``fraction_of_memcpy_median`` divides the memcpy's median time by the pull's;
  ``fraction_of_memcpy_cpu`` does the same with CPU time (this process plus the source's
  threads), which other jobs on a shared machine distort far less than wall time. The
  pulled data is checked against the source's checksums.
- The memory copy bandwidth: ``benchmarks.common.copy_bandwidth_gbs`` (a numpy copy, read + write
  bytes), at the start and at the end of the run. A payload copied at that rate moves
  ``bandwidth / 2`` bytes per second (``memcpy_payload_gbs``); each throughput is reported as a
  fraction of it.

Times are the best and the median of ``--repeats`` (the machine is shared; best is the least
disturbed).

Run (repository root; about 2-3 minutes on 2 shared cores)::

    .venv/bin/python benchmarks/transfer_throughput.py > /tmp/transfer_throughput.json
    .venv/bin/python benchmarks/transfer_throughput.py --quick          # ~40 s
    .venv/bin/python benchmarks/transfer_throughput.py --sizes-mb 1,64 --repeats 5
    .venv/bin/python benchmarks/transfer_throughput.py --remote-only --pages 64 --repeats 15
    .venv/bin/python benchmarks/transfer_throughput.py --remote-only --no-legacy --pages 1,16,64 \
        --repeats 15                                                   # jax vs shm, ~15 s

JSON goes to stdout, progress to stderr.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

try:
    from benchmarks.common import (  # noqa: E402
        copy_bandwidth_gbs,
        load_average,
        log,
        summarize_ms,
    )
    from benchmarks.kv_transfer_source import LEGACY  # noqa: E402
except ImportError:  # run as a script: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import (  # noqa: E402
        copy_bandwidth_gbs,
        load_average,
        log,
        summarize_ms,
    )
    from benchmarks.kv_transfer_source import LEGACY  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import transfer as jax_transfer  # noqa: E402

from ares_jax.engine.kv_pool import (  # noqa: E402
    SCRATCH_PAGE,
    bucket,
    read_page_run,
    read_pages,
    write_page_run,
    write_pages,
)
from ares_jax.model.sharding import kv_pool_sharding, make_mesh  # noqa: E402
from ares_jax.replica.local import pow2_chunks  # noqa: E402
from ares_jax.transfer.kv_transport import KvTicket  # noqa: E402
from ares_jax.transfer.local import handoff  # noqa: E402
from ares_jax.transfer.remote import JaxTransferTransport  # noqa: E402
from ares_jax.transfer.shm import ShmTransport  # noqa: E402

# SmolLM2-135M's page geometry: layers, page size, KV heads, head dim.
PAGE_GEOMETRY = (30, 16, 3, 64)
SOURCE_SCRIPT = Path(__file__).resolve().parent / "kv_transfer_source.py"


@dataclasses.dataclass
class Options:
    sizes_mb: tuple[float, ...] = (1, 8, 64, 256)  # K+V block sizes (MiB), rounded to pages
    repeats: int = 5
    large_repeats: int = 3  # for blocks of >= 64 MiB
    remote: bool = True
    in_process: bool = True
    copy_path: bool = True
    legacy: bool = True  # the pre-seam receiver (slow: ~0.5 s per 64-page pull)
    shm: bool = True  # the same-host shared-memory transport
    pull_timeout_s: float = 120.0


def page_bytes() -> int:
    layers, page_size, kv_heads, head_dim = PAGE_GEOMETRY
    return layers * page_size * kv_heads * head_dim * 4


def pages_for_mb(mb: float) -> int:
    return max(1, round(mb * 2**20 / (2 * page_bytes())))


def block_shape(pages: int) -> tuple[int, ...]:
    layers, page_size, kv_heads, head_dim = PAGE_GEOMETRY
    return (layers, pages, page_size, kv_heads, head_dim)


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds per call, ``repeats`` calls after one warm-up call (compiles, faults pages in)."""
    jax.block_until_ready(fn())
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - start)
    return out


def rate(payload_bytes: int, seconds: list[float], memcpy_gbs: float) -> dict[str, float]:
    best, median = min(seconds), statistics.median(seconds)
    return {"best_ms": 1e3 * best, "median_ms": 1e3 * median,
            "gbs_best": payload_bytes / best / 1e9, "gbs_median": payload_bytes / median / 1e9,
            "fraction_of_memcpy_best": payload_bytes / best / 1e9 / memcpy_gbs,
            "repeats": len(seconds)}


# ----------------------------------------------------------------------------- in process


def in_process(pages: int, repeats: int, memcpy_gbs: float, with_copy_path: bool
               ) -> dict[str, Any]:
    devices = jax.devices()
    mesh_a, mesh_b = make_mesh(devices[0:2]), make_mesh(devices[2:4])
    shape = block_shape(pages)
    shard_a, shard_b = kv_pool_sharding(shape, mesh_a), kv_pool_sharding(shape, mesh_b)
    rng = np.random.default_rng(pages)
    k, v = jax.device_put((rng.standard_normal(shape, np.float32),
                           rng.standard_normal(shape, np.float32)), shard_a)
    payload = 2 * k.nbytes
    out: dict[str, Any] = {"handoff": rate(payload, timed(lambda: handoff(k, v, shard_b),
                                                          repeats), memcpy_gbs)}
    moved = handoff(k, v, shard_b)
    assert np.array_equal(np.asarray(moved[0]), np.asarray(k)), "handoff changed the data"
    del moved
    if with_copy_path:
        padded = bucket(pages)
        pool_shape = block_shape(1 + padded)  # page 0 is scratch
        pools = {}
        for name, mesh in (("src", mesh_a), ("dst", mesh_b)):
            sharding = kv_pool_sharding(pool_shape, mesh)
            zeros = jax.jit(lambda: jnp.zeros(pool_shape, jnp.float32), out_shardings=sharding)
            pools[name] = [zeros(), zeros()]
        ids = np.full(padded, SCRATCH_PAGE, np.int32)
        ids[:pages] = np.arange(1, pages + 1)  # a fresh allocator hands out pages 1, 2, ...
        src_ids = jnp.asarray(ids)
        dst_ids = jnp.asarray(ids)
        block = _pad(k, v, padded) if padded > pages else (k, v)
        pools["src"] = list(write_pages(*pools["src"], src_ids, *block))
        target = kv_pool_sharding(block_shape(padded), mesh_b)

        def copy_path() -> jax.Array:
            ek, ev = read_pages(*pools["src"], src_ids)
            hk, hv = handoff(ek, ev, target)
            pools["dst"] = list(write_pages(*pools["dst"], dst_ids, hk, hv))
            return pools["dst"][0]

        out["copy_path"] = rate(payload, timed(copy_path, repeats), memcpy_gbs)
        out["copy_path"]["padded_pages"] = padded
        got = np.asarray(pools["dst"][0][:, 1:pages + 1])
        assert np.array_equal(got, np.asarray(k)), "the copy path changed the data"
        chunks = pow2_chunks(1, pages + 1)  # (first page, pages): 11 pages = 8 + 2 + 1
        pools["dst"] = [jnp.zeros_like(x) for x in pools["dst"]]

        def copy_path_runs() -> jax.Array:
            for first, n in chunks:
                ek, ev = read_page_run(*pools["src"], jnp.int32(first), n)
                hk, hv = handoff(ek, ev, kv_pool_sharding(block_shape(n), mesh_b))
                pools["dst"] = list(write_page_run(*pools["dst"], jnp.int32(first), hk, hv))
            return pools["dst"][0]

        out["copy_path_runs"] = rate(payload, timed(copy_path_runs, repeats), memcpy_gbs)
        got = np.asarray(pools["dst"][0][:, 1:pages + 1])
        assert np.array_equal(got, np.asarray(k)), "the run copy path changed the data"
        del pools
    return out


def _pad(k: jax.Array, v: jax.Array, pages: int) -> tuple[jax.Array, jax.Array]:
    widths = [(0, 0), (0, pages - k.shape[1]), (0, 0), (0, 0), (0, 0)]
    return jnp.pad(k, widths), jnp.pad(v, widths)


# ----------------------------------------------------------------------------- across processes


class SourceProcess:
    """The spawned offering process, driven over its stdin/stdout."""

    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        shape = ",".join(str(x) for x in PAGE_GEOMETRY)
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(extra_env or {})
        self.proc = subprocess.Popen([sys.executable, str(SOURCE_SCRIPT), "--shape", shape],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the source process died (exit {self.proc.poll()})")
        return json.loads(line)

    def cpu_s(self) -> float:
        """CPU seconds the source's live threads have used (``/proc``, nanosecond counters)."""
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            # A thread that exits just now is skipped.
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)


class LegacyPuller:
    """The receiver as it was before the seam, for the side-by-side: default transfer-server
    options with one bulk socket, a fresh connection and a waiter thread per pull, and the
    source's full (replicated) sharding on the wire."""

    def __init__(self) -> None:
        self.server = jax_transfer.start_transfer_server(
            jax.devices()[0].client, "127.0.0.1:0", ["127.0.0.1:0"] * LEGACY["bulk_connections"],
            transfer_size=LEGACY["transfer_size"], use_raw_buffers=LEGACY["use_raw_buffers"])

    def pull(self, address: str, uuid: int, spec: jax.ShapeDtypeStruct, timeout_s: float
             ) -> list[jax.Array]:
        out: dict[str, Any] = {}

        def run() -> None:
            conn = self.server.connect(address)
            out["arrays"] = jax.block_until_ready(conn.pull(uuid, [spec, spec]))

        waiter = threading.Thread(target=run, daemon=True)
        waiter.start()
        waiter.join(timeout_s)
        if "arrays" not in out:
            raise RuntimeError(f"legacy pull {uuid} failed or timed out")
        return out["arrays"]


def remote_pulls(source: SourceProcess, transport: JaxTransferTransport,
                 legacy: LegacyPuller | None, shm: ShmTransport | None, pages: int,
                 repeats: int, memcpy_gbs: float, timeout_s: float) -> dict[str, Any]:
    """Legacy pull, tuned pull onto the pool's 2-device layout, tuned pull onto one device,
    the shm transport's pull onto one device and onto the pool layout, and a memcpy of the
    same payload, round-robin in a rotating order (so drifting load hits all alike); each
    mode's first call (connection set-up, first allocation) is reported apart.

    An shm pull's block is offered by the source right before it (untimed here; the source
    times its offer, the copy into ``/dev/shm``) and acknowledged right after (untimed), so
    at most one segment exists at a time."""
    shape = block_shape(pages)
    offer = source.ask(f"offer {pages} {2 * (repeats + 1)} {pages}")
    tickets = [KvTicket.from_json(t) for t in offer["tickets"]]
    legacy_uuids = list(offer["legacy"]["uuids"])
    devices = jax.devices()
    pool = kv_pool_sharding(shape, make_mesh(devices[0:2]))
    one = kv_pool_sharding(shape, make_mesh(devices[0:1]))
    legacy_spec = jax.ShapeDtypeStruct(shape, np.float32, sharding=pool)
    payload = 2 * int(np.prod(shape)) * 4
    host_src = np.ones(payload // 4, np.float32)
    host_dst = np.empty_like(host_src)
    np.copyto(host_dst, host_src)
    last: dict[str, Any] = {}
    offers: dict[str, list[tuple[float, float]]] = {"shm_pull": [], "shm_pull_pool": []}
    shm_ticket: dict[str, KvTicket] = {}

    def legacy_pull() -> object:
        assert legacy is not None
        last["legacy"] = legacy.pull(offer["legacy"]["address"], legacy_uuids.pop(0),
                                     legacy_spec, timeout_s)
        return last["legacy"]

    def tuned(target: Any, name: str) -> Callable[[], object]:
        def run() -> object:
            last[name] = transport.pull(tickets.pop(0), target=target, shape=shape,
                                        dtype="float32", timeout_s=timeout_s)
            return last[name]
        return run

    def shm_offer(name: str) -> Callable[[], None]:
        def prepare() -> None:
            got = source.ask("shm_offer")
            shm_ticket[name] = KvTicket.from_json(got["ticket"])
            offers[name].append((got["offer_s"], got["offer_cpu_s"]))
        return prepare

    def shm_pull(target: Any, mode: str, name: str) -> Callable[[], object]:
        def run() -> object:
            assert shm is not None
            last[name] = shm.pull(shm_ticket[mode], target=target, shape=shape,
                                  dtype="float32", timeout_s=timeout_s)
            return last[name]
        return run

    def shm_ack(name: str) -> Callable[[], None]:
        def finish() -> None:
            if not source.ask(f"shm_ack {shm_ticket.pop(name).uuid}")["ok"]:
                raise RuntimeError(f"{name}: the source had dropped the shm offer before its ack")
        return finish

    # name -> (untimed set-up, the timed call, untimed clean-up)
    modes: dict[str, tuple[Callable[[], None] | None, Callable[[], object],
                           Callable[[], None] | None]] = {}
    if legacy is not None:
        modes["legacy_pull"] = (None, legacy_pull, None)
    modes["remote_pull"] = (None, tuned(pool, "pool"), None)
    modes["remote_pull_one_device"] = (None, tuned(one, "one"), None)
    if shm is not None:
        modes["shm_pull"] = (shm_offer("shm_pull"), shm_pull(one, "shm_pull", "shm_one"),
                             shm_ack("shm_pull"))
        modes["shm_pull_pool"] = (shm_offer("shm_pull_pool"),
                                  shm_pull(pool, "shm_pull_pool", "shm_pool"),
                                  shm_ack("shm_pull_pool"))
    modes["memcpy"] = (None, lambda: np.copyto(host_dst, host_src), None)
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    cpu: dict[str, list[float]] = {name: [] for name in modes}
    first: dict[str, float] = {}
    names = list(modes)
    for r in range(repeats + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            prepare, call, finish = modes[name]
            if prepare is not None:
                prepare()
            cpu_start = time.process_time() + source.cpu_s()
            start = time.perf_counter()
            jax.block_until_ready(call())
            elapsed = time.perf_counter() - start
            cpu_used = time.process_time() + source.cpu_s() - cpu_start
            if finish is not None:
                finish()
            if r == 0:
                first[name] = elapsed
                if name in offers:
                    offers[name].pop(0)
            else:
                seconds[name].append(elapsed)
                cpu[name].append(cpu_used)
    checked = [("pool", "remote_pull"), ("one", "remote_pull_one_device")]
    if legacy is not None:
        checked.append(("legacy", "legacy_pull"))
    if shm is not None:
        checked += [("shm_one", "shm_pull"), ("shm_pool", "shm_pull_pool")]
    for key, name in checked:
        k, v = (np.asarray(x) for x in last[key])
        sums = (float(k.sum(dtype=np.float64)), float(v.sum(dtype=np.float64)))
        if sums != (offer["k_sum"], offer["v_sum"]):
            raise RuntimeError(f"{name}: pulled block differs from the source's: {sums} vs "
                               f"{(offer['k_sum'], offer['v_sum'])}")
    last.clear()
    dropped = source.ask("drop")
    memcpy = seconds["memcpy"]
    memcpy_cpu = statistics.median(cpu["memcpy"])
    out: dict[str, Any] = {"memcpy_payload": {**summarize_ms(memcpy),
                                              "gbs_median": payload / statistics.median(memcpy)
                                              / 1e9,
                                              "cpu_ms_median": 1e3 * memcpy_cpu}}
    for name in names[:-1]:
        row = rate(payload, seconds[name], memcpy_gbs)
        # The ratios that matter: against the same payload copied in the same rounds.
        row["fraction_of_memcpy_median"] = statistics.median(memcpy) / statistics.median(
            seconds[name])
        row["fraction_of_memcpy_best_same_round"] = min(memcpy) / min(seconds[name])
        # CPU time of both processes per pull against the memcpy's: how many copies' worth of
        # work a pull is, which CPU contention from other jobs distorts far less than the
        # wall clock (a pull needs several threads scheduled in turn, a memcpy one).
        row["cpu_ms_median"] = 1e3 * statistics.median(cpu[name])
        row["fraction_of_memcpy_cpu"] = memcpy_cpu / statistics.median(cpu[name])
        row["first_pull_ms"] = 1e3 * first[name]
        row["checksum_ok"] = True
        if name in offers:
            # The jax transport's offer copies nothing; the shm one is the block's one copy,
            # so the whole handoff (offer + pull) is set against memcpy too.
            offer_s = [o[0] for o in offers[name]]
            offer_cpu = [o[1] for o in offers[name]]
            handoff = [a + b for a, b in zip(offer_s, seconds[name])]
            handoff_cpu = [a + b for a, b in zip(offer_cpu, cpu[name])]
            row["offer_ms_median"] = 1e3 * statistics.median(offer_s)
            row["offer_cpu_ms_median"] = 1e3 * statistics.median(offer_cpu)
            row["offer_plus_pull_ms_median"] = 1e3 * statistics.median(handoff)
            row["fraction_of_memcpy_with_offer"] = statistics.median(memcpy) / \
                statistics.median(handoff)
            row["fraction_of_memcpy_cpu_with_offer"] = memcpy_cpu / statistics.median(
                handoff_cpu)
        out[name] = row
    out["source_pending_after_ack"] = dropped["pending"]
    return out


# ----------------------------------------------------------------------------- the run


def run(opts: Options) -> dict[str, Any]:
    started = time.perf_counter()
    devices = jax.devices()
    if len(devices) < 4:
        raise SystemExit(f"needs 4 devices, have {len(devices)} (XLA_FLAGS set too late?)")
    bandwidth_start = copy_bandwidth_gbs()
    memcpy_gbs = bandwidth_start / 2
    log(f"copy bandwidth {bandwidth_start:.1f} GB/s read+write = {memcpy_gbs:.1f} GB/s payload; "
        f"load {load_average()}")
    source = SourceProcess() if opts.remote else None
    transport = JaxTransferTransport() if opts.remote else None
    legacy = LegacyPuller() if opts.remote and opts.legacy else None
    shm = ShmTransport() if opts.remote and opts.shm else None
    rows = []
    try:
        for mb in opts.sizes_mb:
            pages = pages_for_mb(mb)
            payload = 2 * pages * page_bytes()
            repeats = opts.large_repeats if payload >= 64 * 2**20 else opts.repeats
            t0 = time.perf_counter()
            row: dict[str, Any] = {"target_mib": mb, "pages": pages, "tokens": 16 * pages,
                                   "payload_mb": payload / 1e6, "replicas": 2}
            if opts.in_process:
                row.update(in_process(pages, repeats, memcpy_gbs, opts.copy_path))
            if source is not None and transport is not None:
                row.update(remote_pulls(source, transport, legacy, shm, pages, repeats,
                                        memcpy_gbs, opts.pull_timeout_s))
            rows.append(row)
            parts = [f"{k} {row[k]['gbs_median']:.2f} GB/s"
                     + (f" ({row[k]['fraction_of_memcpy_median']:.0%} of memcpy, "
                        f"{row[k]['fraction_of_memcpy_cpu']:.0%} by CPU time)"
                        if "fraction_of_memcpy_median" in row[k] else "")
                     for k in ("handoff", "copy_path", "copy_path_runs", "legacy_pull",
                               "remote_pull", "remote_pull_one_device", "shm_pull",
                               "shm_pull_pool") if k in row]
            if "shm_pull" in row:
                shm_row = row["shm_pull"]
                parts.append(f"shm offer+pull {shm_row['fraction_of_memcpy_with_offer']:.0%} "
                             f"of memcpy ({shm_row['fraction_of_memcpy_cpu_with_offer']:.0%} "
                             "by CPU time)")
            log(f"{payload / 1e6:7.1f} MB ({pages} pages): " + " | ".join(parts) +
                f" [{time.perf_counter() - t0:.0f} s]")
    finally:
        if source is not None:
            source.close()
        if shm is not None:
            shm.close()
    bandwidth_end = copy_bandwidth_gbs()
    return {
        "benchmark": "transfer_throughput",
        "options": dataclasses.asdict(opts),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "jax": jax.__version__, "devices": len(devices),
                    "copy_bandwidth_gbs_start": bandwidth_start,
                    "copy_bandwidth_gbs_end": bandwidth_end,
                    "memcpy_payload_gbs": memcpy_gbs,
                    "load_average_end": load_average()},
        "page_geometry": dict(zip(("layers", "page_size", "kv_heads", "head_dim"),
                                  PAGE_GEOMETRY)),
        "page_kv_bytes": 2 * page_bytes(),
        "transfer_settings": dataclasses.asdict(transport.settings) if transport else None,
        "legacy_settings": LEGACY,
        "results": rows,
        "wall_s": time.perf_counter() - started,
    }


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="sizes 1,64 MiB, 3 repeats")
    p.add_argument("--sizes-mb", help="comma-separated K+V block sizes in MiB")
    p.add_argument("--repeats", type=int)
    p.add_argument("--no-remote", action="store_true", help="skip the cross-process pulls")
    p.add_argument("--no-copy-path", action="store_true", help="skip gather+handoff+scatter")
    p.add_argument("--remote-only", action="store_true",
                   help="only the cross-process pulls (and their memcpy)")
    p.add_argument("--no-legacy", action="store_true",
                   help="skip the pre-seam receiver (the slowest mode)")
    p.add_argument("--no-shm", action="store_true", help="skip the shared-memory transport")
    p.add_argument("--pages", help="comma-separated block sizes in pages (64 = 1k tokens), "
                   "instead of --sizes-mb")
    a = p.parse_args(argv)
    opts = Options()
    if a.quick:
        opts = dataclasses.replace(opts, sizes_mb=(1, 64), repeats=3, large_repeats=2)
    if a.sizes_mb:
        opts = dataclasses.replace(opts, sizes_mb=tuple(float(x) for x in a.sizes_mb.split(",")))
    if a.pages:
        opts = dataclasses.replace(opts, sizes_mb=tuple(
            int(x) * 2 * page_bytes() / 2**20 for x in a.pages.split(",")))
    if a.repeats:
        opts = dataclasses.replace(opts, repeats=a.repeats, large_repeats=a.repeats)
    return dataclasses.replace(opts, remote=not a.no_remote, copy_path=not a.no_copy_path,
                               in_process=not a.remote_only, legacy=not a.no_legacy,
                               shm=not a.no_shm)


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(parse_args(argv)), indent=2))


if __name__ == "__main__":
    main()
