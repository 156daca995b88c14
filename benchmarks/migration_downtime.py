"""Live-migration downtime against sequence length: staged (Llumnix) against naive stop-and-copy
(issue 6, section 4, first bullet).

Setup: the embedded SmolLM2-135M-Instruct in float32, two ``DecodeEngine``s on disjoint 2-device
meshes (4 virtual CPU devices: source on devices 0-1, destination on 2-3). For every sequence
length, one request is placed on the source at that length *without a real prefill*: its pages
are reserved and filled with synthetic K/V (random normal, the pool dtype) through
``import_pages``, then ``adopt(num_cached=length)``. The decode cost of a step and the migration
cost depend only on the shapes, not on the values, so this is equivalent for timing and far
faster than prefilling 8k tokens on a CPU. ``--background`` short requests (256 tokens each, the
same synthetic way, placed afresh for every length) run on *each* engine, so both step a
realistic batch and the migrated request's batch has the same size before and after the move
(the destination's background requests only decode from the commit on).

One trial (the serving-loop order of ``ares_jax.cluster.live``: engine steps, then one
``MigrationManager.advance``):

1. ``--normal-steps`` iterations of ``src.step(); mgr.advance()`` with nothing migrating: the
   request's normal inter-token gap on the source (median).
2. ``mgr.start(rid, 0, 1)``, then ``src.step(); mgr.advance()`` until the migration ends. The
   source keeps decoding during the pre-copy stages.
3. ``dst.step()`` right after the commit (the first token on the destination), then
   ``--dst-steps`` more for the destination's normal gap.

Downtime = time of the request's first token on the destination - time of its last token on the
source (both taken when the step returns its tokens to the host). In a loop with no migration
this gap is exactly one decode step, so ``downtime_steps`` = downtime / normal source gap is 1.0
for a seamless hand-over; Llumnix's target is <= 2 at every length. ``downtime_dst_steps``
divides by the destination's normal gap instead; the target check takes the larger of the two
over every measured trial. Also reported: the stall
(``adopted_at - detached_at``: the stop-and-copy window), the stages, the pages and bytes moved,
the total migration time, and the worst source inter-token gap while the pre-copy ran (the
pre-copy shares the CPU with decoding).

Modes, side by side and interleaved per length (same machine load):
- ``staged``: ``MigrationConfig()`` (final_stage_pages=2, max_stages=3).
- ``naive``: ``MigrationConfig(max_stages=0)``: the first ``advance`` stops the request and
  copies every page in one stall.

Each length first runs one unmeasured trial per mode (compiles the decode steps at that page-table
width on both meshes and the copy shapes), then ``--repeats`` measured trials per mode,
alternating.

Run (repository root; about 4-5 minutes on 2 shared cores)::

    .venv/bin/python benchmarks/migration_downtime.py > /tmp/migration_downtime.json
    .venv/bin/python benchmarks/migration_downtime.py --quick     # ~1.5 minutes
    .venv/bin/python benchmarks/migration_downtime.py --lengths 256,8192 --background 0

JSON goes to stdout, progress to stderr.
"""

from __future__ import annotations

import os

# Two disjoint 2-device meshes: must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

try:
    from benchmarks.common import copy_bandwidth_gbs, load_average, log  # noqa: E402
except ImportError:  # run as a script: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import copy_bandwidth_gbs, load_average, log  # noqa: E402

import jax  # noqa: E402

from ares_jax.engine.decode import DecodeEngine  # noqa: E402
from ares_jax.engine.kv_pool import bucket, pages_for  # noqa: E402
from ares_jax.engine.sampling import SamplingParams  # noqa: E402
from ares_jax.engine.types import EngineConfig, Request  # noqa: E402
from ares_jax.model.loader import load_model, on_mesh  # noqa: E402
from ares_jax.model.sharding import make_mesh  # noqa: E402
from ares_jax.transfer import MigrationConfig, MigrationManager, MigrationOutcome  # noqa: E402
from ares_jax.transfer.migration import pow2_chunks  # noqa: E402

TARGET_DOWNTIME_STEPS = 2.0  # Llumnix: downtime within 2 decode steps at every length
MODES: dict[str, MigrationConfig] = {
    "staged": MigrationConfig(),
    "naive": MigrationConfig(max_stages=0),
}
BACKGROUND_TOKENS = 256
PARAMS = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)
RID = "migrant"


@dataclasses.dataclass
class Options:
    lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    background: int = 3  # short requests sharing the source's batch
    repeats: int = 2  # measured trials per (length, mode)
    normal_steps: int = 4  # source steps before migrating (normal gap = median of their gaps)
    dst_steps: int = 2  # destination steps after the first one (its normal gap)
    page_size: int = 16
    max_model_len: int = 8192
    headroom_tokens: int = 64  # a length is capped at max_model_len - this (room to decode)


@dataclasses.dataclass
class Trial:
    mode: str
    length: int  # tokens cached when the migration started
    normal_gap_ms: float  # median source inter-token gap before migrating
    downtime_ms: float  # first token on dst - last token on src
    stall_ms: float  # adopted_at - detached_at
    stages: int
    copied_pages: int
    bytes_moved: int  # as the record counts them (the pages asked for)
    bytes_padded: int  # what export/import actually moved (blocks padded to a power of two)
    migration_ms: float  # finished_at - started_at
    precopy_worst_gap_ms: float  # worst source inter-token gap while pre-copy stages ran
    src_steps_during: int  # source steps between start and commit
    dst_gap_ms: float  # median destination inter-token gap after the first token

    @property
    def downtime_steps(self) -> float:
        return self.downtime_ms / self.normal_gap_ms

    @property
    def downtime_dst_steps(self) -> float:
        return self.downtime_ms / self.dst_gap_ms


# ----------------------------------------------------------------------------- setup


def synthetic_pages(cfg: Any, pages: int, page_size: int, seed: int) -> tuple[np.ndarray, ...]:
    """Random-normal K and V page blocks [L, pages, S, KVH, K] in the model's dtype."""
    rng = np.random.default_rng(seed)
    shape = (cfg.n_layers, pages, page_size, cfg.n_kv_heads, cfg.head_dim)
    dtype = np.dtype(cfg.jnp_dtype)
    return tuple(rng.standard_normal(shape, np.float32).astype(dtype) for _ in range(2))


def place_request(engine: DecodeEngine, rid: str, length: int, kv: tuple[np.ndarray, ...]
                  ) -> None:
    """Put a request with ``length`` cached tokens on ``engine`` without a prefill: reserve its
    pages, import the synthetic K/V, adopt it."""
    pages = pages_for(length + 1, engine.page_size)
    k, v = kv
    assert k.shape[1] >= pages, (k.shape, pages)
    engine.reserve(rid, pages)
    engine.import_pages(rid, 0, k[:, :pages], v[:, :pages], pages)
    request = Request(request_id=rid, prompt_ids=[1] * length, params=PARAMS)
    engine.adopt(request, num_cached=length, last_token=1, generated=1)


def padded_copy_bytes(engine: DecodeEngine, stage_pages: list[int]) -> int:
    """Bytes that ``export_pages``/``import_pages`` really move. ``copy_pages`` sends each stage
    in power-of-two chunks and each block is padded to ``bucket(chunk)``, so this equals the
    unpadded bytes (before that chunking, a 257-page stage moved 512 pages)."""
    page_bytes = engine.pool.k.nbytes // engine.pool.k.shape[1]
    return sum(2 * page_bytes * bucket(chunk)
               for n in stage_pages for _, chunk in pow2_chunks(0, n))


class CountingCopy:
    """Wraps the manager's copy function to record each stage's page count."""

    def __init__(self) -> None:
        from ares_jax.transfer.migration import copy_pages

        self.inner = copy_pages
        self.stage_pages: list[int] = []

    def __call__(self, src: DecodeEngine, dst: DecodeEngine, rid: str, start: int,
                 end: int) -> int:
        self.stage_pages.append(end - start)
        return self.inner(src, dst, rid, start, end)


# ----------------------------------------------------------------------------- one trial


def run_trial(src: DecodeEngine, dst: DecodeEngine, mode: str, length: int,
              kv: tuple[np.ndarray, ...], opts: Options, normal_steps: int, dst_steps: int
              ) -> Trial:
    clock = time.perf_counter
    copier = CountingCopy()
    mgr = MigrationManager([src, dst], MODES[mode], copy_fn=copier, clock=clock)
    place_request(src, RID, length, kv)
    jax.block_until_ready((src.pool.k, src.pool.v))

    src_token_times: list[float] = []

    def src_iteration() -> list:
        out = src.step()
        now = clock()
        if RID in out.request_ids:
            src_token_times.append(now)
        return mgr.advance()

    for _ in range(normal_steps + 1):  # +1: the first gap needs a token before it
        src_iteration()
    normal_gaps = np.diff(src_token_times)
    migrating_from = len(src_token_times)
    start_len = src.slots[RID].num_cached
    rec = mgr.start(RID, 0, 1)
    if rec.outcome is not None:
        raise RuntimeError(f"{mode} migration at {length} tokens did not start: {rec.reason}")
    ended: list = []
    steps_during = 0
    while not ended:
        ended = src_iteration()
        steps_during += 1
    (rec,) = ended
    if rec.outcome is not MigrationOutcome.COMMITTED:
        raise RuntimeError(f"{mode} migration at {length} tokens: {rec.outcome} {rec.reason}")
    dst_token_times: list[float] = []
    for _ in range(1 + dst_steps):
        out = dst.step()
        now = clock()
        assert RID in out.request_ids
        dst_token_times.append(now)
    during = np.diff(src_token_times[migrating_from - 1:])
    dst.release(RID)
    assert RID not in src.slots and not src.allocator.pages(RID)
    return Trial(
        mode=mode, length=start_len,
        normal_gap_ms=1e3 * float(np.median(normal_gaps)),
        downtime_ms=1e3 * (dst_token_times[0] - src_token_times[-1]),
        stall_ms=1e3 * (rec.adopted_at - rec.detached_at),
        stages=rec.stages, copied_pages=rec.copied_pages, bytes_moved=rec.bytes_moved,
        bytes_padded=padded_copy_bytes(src, copier.stage_pages),
        migration_ms=1e3 * (rec.finished_at - rec.started_at),
        precopy_worst_gap_ms=1e3 * float(during.max()) if len(during) else float("nan"),
        src_steps_during=steps_during,
        dst_gap_ms=1e3 * float(np.median(np.diff(dst_token_times))) if dst_steps else float("nan"),
    )


# ----------------------------------------------------------------------------- the run


def summarize(trials: list[Trial]) -> dict[str, Any]:
    """Median over the measured trials of one (length, mode)."""
    def med(f: str) -> float:
        return statistics.median(getattr(t, f) for t in trials)

    fields = ("length", "normal_gap_ms", "downtime_ms", "downtime_steps", "downtime_dst_steps",
              "stall_ms", "stages", "copied_pages", "bytes_moved", "bytes_padded",
              "migration_ms", "precopy_worst_gap_ms", "src_steps_during", "dst_gap_ms")
    out: dict[str, Any] = {f: med(f) for f in fields}
    # Conservative: in units of the shorter of the two normal gaps (source, destination).
    out["downtime_steps_max"] = max(max(t.downtime_steps, t.downtime_dst_steps)
                                    for t in trials)
    out["trials"] = len(trials)
    return out


def run(opts: Options) -> dict[str, Any]:
    started = time.perf_counter()
    bandwidth_gbs = copy_bandwidth_gbs()
    log(f"copy bandwidth {bandwidth_gbs:.1f} GB/s (read+write); load {load_average()}")
    devices = jax.devices()
    if len(devices) < 4:
        raise SystemExit(f"needs 4 devices, have {len(devices)} (XLA_FLAGS set too late?)")
    model = load_model(dtype="float32", mesh=make_mesh(devices[0:2]))
    max_len = min(opts.max_model_len, model.cfg.max_seq_len)
    lengths = [min(n, max_len - opts.headroom_tokens) for n in opts.lengths]
    longest_pages = pages_for(max(lengths) + opts.headroom_tokens, opts.page_size)
    num_pages = 1 + longest_pages + opts.background * pages_for(
        BACKGROUND_TOKENS + 4 * opts.headroom_tokens, opts.page_size) + 8
    ecfg = EngineConfig(page_size=opts.page_size, num_pages=num_pages,
                        max_num_seqs=max(8, opts.background + 2), max_model_len=max_len)
    src = DecodeEngine(model, ecfg)
    dst = DecodeEngine(on_mesh(model, make_mesh(devices[2:4])), ecfg)
    page_bytes = src.pool.k.nbytes // src.pool.k.shape[1]
    log(f"model loaded; {num_pages} pages per engine ({2 * page_bytes / 1e6:.3f} MB K+V each, "
        f"{model.cfg.kv_bytes_per_token} B/token); lengths {lengths}")
    bg_kv = synthetic_pages(model.cfg, pages_for(BACKGROUND_TOKENS + 1, opts.page_size),
                            opts.page_size, seed=7)
    per_length: list[dict[str, Any]] = []
    all_trials: list[dict[str, Any]] = []
    for length in lengths:
        t0 = time.perf_counter()
        kv = synthetic_pages(model.cfg, pages_for(length + 1, opts.page_size), opts.page_size,
                             seed=length)
        for engine in (src, dst):  # fresh background requests (they grew at the last length)
            for i in range(opts.background):
                engine.release(f"background-{i}")
                place_request(engine, f"background-{i}", BACKGROUND_TOKENS, bg_kv)
        for mode in MODES:  # warm-up: compiles at this width on both meshes, copy shapes
            run_trial(src, dst, mode, length, kv, opts, normal_steps=1, dst_steps=0)
        warm_s = time.perf_counter() - t0
        trials: dict[str, list[Trial]] = {m: [] for m in MODES}
        for _ in range(opts.repeats):
            for mode in MODES:
                trial = run_trial(src, dst, mode, length, kv, opts, opts.normal_steps,
                                  opts.dst_steps)
                trials[mode].append(trial)
                all_trials.append({**dataclasses.asdict(trial),
                                   "downtime_steps": trial.downtime_steps,
                                   "downtime_dst_steps": trial.downtime_dst_steps})
        row = {"length": length, "warmup_s": warm_s,
               **{mode: summarize(ts) for mode, ts in trials.items()}}
        per_length.append(row)
        s, n = row["staged"], row["naive"]
        log(f"{length:5d} tok: step {s['normal_gap_ms']:.0f} ms | staged downtime "
            f"{s['downtime_ms']:.0f} ms = {s['downtime_steps']:.2f} steps (stall "
            f"{s['stall_ms']:.1f} ms, {s['stages']} stages) | naive {n['downtime_ms']:.0f} ms "
            f"= {n['downtime_steps']:.2f} steps (stall {n['stall_ms']:.1f} ms) "
            f"[{time.perf_counter() - t0:.0f} s]")
    for engine in (src, dst):
        for i in range(opts.background):
            engine.release(f"background-{i}")
        assert engine.allocator.num_free == engine.allocator.capacity, "pages leaked"
    staged_worst = max(r["staged"]["downtime_steps_max"] for r in per_length)
    return {
        "benchmark": "migration_downtime",
        "options": dataclasses.asdict(opts),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "jax": jax.__version__, "devices": len(devices),
                    "copy_bandwidth_gbs": bandwidth_gbs, "load_average_end": load_average()},
        "model": {"source": model.source, "dtype": model.cfg.dtype,
                  "kv_bytes_per_token": model.cfg.kv_bytes_per_token,
                  "page_kv_bytes": 2 * page_bytes, "num_pages": num_pages},
        "setup": "synthetic K/V imported + adopt (no prefill); background requests of "
                 f"{BACKGROUND_TOKENS} tokens on each engine: {opts.background}",
        "modes": {m: dataclasses.asdict(c) for m, c in MODES.items()},
        "target": {"downtime_steps_max": TARGET_DOWNTIME_STEPS,
                   "staged_worst_downtime_steps": staged_worst,
                   "met": staged_worst <= TARGET_DOWNTIME_STEPS},
        "results": per_length,
        "trials": all_trials,
        "wall_s": time.perf_counter() - started,
    }


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="lengths 256,1024,4096, one background request, one repeat")
    p.add_argument("--lengths", help="comma-separated sequence lengths in tokens")
    p.add_argument("--background", type=int, help="short requests on each engine")
    p.add_argument("--repeats", type=int, help="measured trials per length and mode")
    p.add_argument("--normal-steps", type=int)
    p.add_argument("--dst-steps", type=int)
    a = p.parse_args(argv)
    opts = Options()
    if a.quick:
        opts = dataclasses.replace(opts, lengths=(256, 1024, 4096), background=1, repeats=1,
                                   normal_steps=3, dst_steps=1)
    if a.lengths:
        opts = dataclasses.replace(opts, lengths=tuple(int(x) for x in a.lengths.split(",")))
    for name in ("background", "repeats", "normal_steps", "dst_steps"):
        if getattr(a, name) is not None:
            opts = dataclasses.replace(opts, **{name: getattr(a, name)})
    return opts


def main(argv: list[str] | None = None) -> None:
    result = run(parse_args(argv))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
