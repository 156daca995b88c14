"""Live-migration downtime against sequence length: staged (Llumnix) against naive stop-and-copy
(issue 6, section 4, first bullet), driven through the scheduler core.

Setup: the embedded SmolLM2-135M-Instruct in float32 (``--model`` picks another, e.g.
``random:small`` for a quick check), a ``ServingLoop`` over a prefill engine and two
``DecodeEngine``s on disjoint 2-device meshes (4 virtual CPU devices: source, and the unused
prefill engine, on devices 0-1, destination on 2-3). For every sequence length, one request is
placed on the source at that length *without a real prefill*: its pages are reserved and filled
with synthetic K/V (random normal, the pool dtype) through the engine's public ``reserve`` /
``import_pages`` / ``adopt``, and the loop is told it runs there (a request tracker and its
location; ``add_request`` would prefill it). The decode cost of a step and the migration cost
depend only on the shapes, not on the values, so this is equivalent for timing and far faster
than prefilling 8k tokens on a CPU. ``--background`` short requests (256 tokens each, placed the
same way) run on *each* engine, so both step a realistic batch and the migrated request's batch
has the same size before and after the move.

One trial, on fresh decode engines and a fresh loop (so every trial lays its pages out as the
warm-up did; then placement, then ``loop.step()`` only: each iteration runs the migration's
next stage, then one decode step of every engine with work, source first):

1. ``--normal-steps`` iterations with nothing migrating: the request's normal inter-token gap
   (median).
2. ``loop.start_migration(rid, 0, 1)``, then ``loop.step()`` until the record leaves
   ``loop.migrations``. The source keeps decoding the request during the pre-copy stages; the
   committing iteration detaches it, copies the last pages, adopts it on the destination, and
   the destination decodes its first token there in that same iteration.
3. ``--dst-steps`` more iterations for the request's normal gap on the destination.

Token times are taken when the loop receives each step's tokens (an ``on_stepped`` hook, after
every engine of the iteration stepped: when a client would see them). Downtime = the request's
first token on the destination - its last token on the source. With no migration this gap is
exactly one loop iteration, so ``downtime_steps`` = downtime / normal gap is 1.0 for a seamless
hand-over; Llumnix's target is <= 2 at every length. ``downtime_dst_steps`` divides by the gap
on the destination instead; the target check takes the larger of the two over every measured
trial. Also reported: the stall (the record's ``downtime_s`` = ``adopted_at - detached_at``: the
stop-and-copy window), the stages, the pages and bytes moved (``bytes_moved`` counts the arrays
that crossed, so any power-of-two padding shows against ``copied_pages * kv_bytes_per_page``),
the total migration time, and the worst inter-token gap while the pre-copy ran (the pre-copy
shares the CPU with decoding).

In this loop both engines step in every iteration, one after the other on the same cores, so a
"step" here is one loop iteration (source + destination step), not one engine's step as in the
pre-``ServingLoop`` version of this benchmark: the same stall is a smaller fraction of it.

Modes, side by side and interleaved per length (same machine load):
- ``staged``: ``MigrationConfig()`` (stage_pages=64, final_stage_pages=2, max_stages=3).
- ``naive``: ``MigrationConfig(max_stages=0)``: the first stage stops the request and copies
  every page in one stall.

Each length first runs one unmeasured trial per mode (compiles the decode steps at that page-table
width on both meshes and the copy shapes; it also checks that the destination's full pages equal
the source's bit for bit), then ``--repeats`` measured trials per mode, alternating. After every
trial all requests are aborted and every page must be free on both engines.

Run (repository root; about 5 minutes on 2 shared cores)::

    .venv/bin/python benchmarks/migration_downtime.py > /tmp/migration_downtime.json
    .venv/bin/python benchmarks/migration_downtime.py --quick     # ~1.5 minutes
    .venv/bin/python benchmarks/migration_downtime.py --lengths 256,8192 --background 0
    .venv/bin/python benchmarks/migration_downtime.py --model random:small --lengths 256,1024

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

from ares_jax.cluster import (  # noqa: E402
    ClusterConfig,
    MigrationConfig,
    MigrationOutcome,
    ServingLoop,
)
from ares_jax.engine.decode import DecodeEngine  # noqa: E402
from ares_jax.engine.outputs import RequestTracker  # noqa: E402
from ares_jax.engine.prefill import PrefillEngine  # noqa: E402
from ares_jax.engine.sampling import SamplingParams  # noqa: E402
from ares_jax.engine.types import EngineConfig, Request  # noqa: E402
from ares_jax.model.loader import LoadedModel, on_mesh  # noqa: E402
from ares_jax.model.sharding import make_mesh  # noqa: E402
from ares_jax.paging import pages_for  # noqa: E402
from ares_jax.replica.local import pow2_chunks  # noqa: E402
from ares_jax.replica.types import Stepped  # noqa: E402
from ares_jax.serving.models import load_serving_model  # noqa: E402

TARGET_DOWNTIME_STEPS = 2.0  # Llumnix: downtime within 2 decode steps at every length
MODES: dict[str, MigrationConfig] = {
    "staged": MigrationConfig(),
    "naive": MigrationConfig(max_stages=0),
}
BACKGROUND_TOKENS = 256
PARAMS = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)
SRC, DST = 0, 1  # replica ids: ServingLoop numbers its decode engines in order


@dataclasses.dataclass
class Options:
    lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    background: int = 3  # short requests sharing each engine's batch
    repeats: int = 2  # measured trials per (length, mode)
    normal_steps: int = 4  # iterations before migrating (normal gap = median of their gaps)
    dst_steps: int = 2  # iterations after the first token on the destination (its normal gap)
    page_size: int = 16
    max_model_len: int = 8192
    headroom_tokens: int = 64  # a length is capped at max_model_len - this (room to decode)
    model: str = "embedded"  # as ``ares-jax serve --model``; random:tiny|small for quick checks


@dataclasses.dataclass
class Trial:
    mode: str
    length: int  # tokens cached when the migration started
    normal_gap_ms: float  # median inter-token gap on the source before migrating
    downtime_ms: float  # first token on dst - last token on src
    stall_ms: float  # the record's downtime_s: adopted_at - detached_at
    stages: int
    copied_pages: int
    bytes_moved: int  # as the record counts them: the arrays that crossed (padding included)
    page_bytes: int  # copied_pages * kv_bytes_per_page: what the request's pages hold
    migration_ms: float  # finished_at - started_at
    precopy_worst_gap_ms: float  # worst inter-token gap on the source while pre-copy ran
    src_steps_during: int  # loop iterations between start and commit (the commit included)
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


def place_request(loop: ServingLoop, replica: int, rid: str, length: int,
                  kv: tuple[np.ndarray, ...]) -> None:
    """Put a request with ``length`` cached tokens on decode engine ``replica`` without a
    prefill: reserve its pages, import the synthetic K/V, adopt it, and tell the loop it runs
    there (``add_request`` would send it through the prefill engine)."""
    engine = loop.decoders[replica]
    pages = pages_for(length + 1, engine.page_size)
    k, v = kv
    assert k.shape[1] >= pages, (k.shape, pages)
    engine.reserve(rid, pages)
    # Power-of-two chunks, as a migration copies: few compiled write shapes across lengths.
    for start, n in pow2_chunks(0, pages):
        engine.import_pages(rid, start, k[:, start:start + n], v[:, start:start + n], n)
    request = Request(request_id=rid, prompt_ids=[1] * length, params=PARAMS)
    engine.adopt(request, num_cached=length, last_token=1, generated=1)
    loop.trackers[rid] = RequestTracker(request, None)
    loop.location[rid] = replica


def make_loop(prefill: PrefillEngine, src: DecodeEngine, dst: DecodeEngine, mode: str
              ) -> ServingLoop:
    """A fresh loop over the engines; least-load never migrates by itself, so every migration
    is the benchmark's."""
    return ServingLoop(prefill, [src, dst], None,
                       ClusterConfig(policy="least-load", migration=MODES[mode]))


def assert_all_free(*engines: DecodeEngine) -> None:
    for e in engines:
        assert e.num_free_pages == e.capacity_pages and not e.num_active, \
            f"pages leaked: {e.page_owners()}"


# ----------------------------------------------------------------------------- one trial


@dataclasses.dataclass
class Setup:
    """What every trial's engines are made from: the source's and destination's meshes (as
    the model placed on each), the engine settings, and the (unused) prefill engine."""

    prefill: PrefillEngine
    src_model: LoadedModel
    dst_model: LoadedModel
    ecfg: EngineConfig

    def decode_engines(self) -> tuple[DecodeEngine, DecodeEngine]:
        """Fresh engines (compiled steps are cached per shape, not per engine): every trial
        starts from the same page allocator state, so its pages are laid out as in the
        warm-up (contiguous runs or not) and no measured trial compiles a new copy path."""
        return DecodeEngine(self.src_model, self.ecfg), DecodeEngine(self.dst_model, self.ecfg)


def run_trial(setup: Setup, mode: str, length: int, kv: tuple[np.ndarray, ...],
              bg_kv: tuple[np.ndarray, ...], opts: Options, normal_steps: int, dst_steps: int,
              check_kv: bool = False) -> Trial:
    src, dst = setup.decode_engines()
    loop = make_loop(setup.prefill, src, dst, mode)
    clock = loop.clock
    rid = f"migrant-{mode}-{length}"
    for replica in (SRC, DST):
        for i in range(opts.background):
            place_request(loop, replica, f"background-{replica}-{i}", BACKGROUND_TOKENS, bg_kv)
    place_request(loop, SRC, rid, length, kv)
    src.block_until_ready()
    dst.block_until_ready()

    times: list[tuple[int, float]] = []  # (replica, when the loop got the token)

    def on_stepped(handle: Any, ev: Stepped) -> None:
        if rid in ev.request_ids:
            times.append((ev.replica_id, clock()))

    loop.on_stepped.append(on_stepped)
    for _ in range(normal_steps + 1):  # +1: the first gap needs a token before it
        loop.step()
    normal_gaps = np.diff([t for _, t in times])
    migrating_from = len(times)
    start_len = src.num_cached(rid)
    rec = loop.start_migration(rid, SRC, DST)
    if rec.outcome is not None:
        raise RuntimeError(f"{mode} migration at {length} tokens did not start: {rec.reason}")
    steps_during = 0
    while rid in loop.migrations:
        loop.step()
        steps_during += 1
    rec = loop.migration_history[-1]
    if rec.outcome is not MigrationOutcome.COMMITTED:
        raise RuntimeError(f"{mode} migration at {length} tokens: {rec.outcome} {rec.reason}")
    assert loop.location[rid] == DST and not src.pages_held(rid)
    for _ in range(dst_steps):
        loop.step()
    if check_kv:  # full pages no token rewrites: the destination's must equal the source's
        full = start_len // opts.page_size
        for ours, theirs in zip(dst.export_pages(rid, 0, full), kv):
            np.testing.assert_array_equal(np.asarray(ours)[:, :full], theirs[:, :full])
    src_times = [t for r, t in times if r == SRC]
    dst_times = [t for r, t in times if r == DST]
    assert len(dst_times) == 1 + dst_steps, (len(dst_times), dst_steps)
    during = np.diff(src_times[migrating_from - 1:])
    for r in list(loop.trackers):
        loop.abort(r)
    loop.check_no_leaks()
    assert_all_free(src, dst)
    return Trial(
        mode=mode, length=start_len,
        normal_gap_ms=1e3 * float(np.median(normal_gaps)),
        downtime_ms=1e3 * (dst_times[0] - src_times[-1]),
        stall_ms=1e3 * float(rec.downtime_s),
        stages=rec.stages, copied_pages=rec.copied_pages, bytes_moved=rec.bytes_moved,
        page_bytes=rec.copied_pages * src.kv_bytes_per_page,
        migration_ms=1e3 * (rec.finished_at - rec.started_at),
        precopy_worst_gap_ms=1e3 * float(during.max()) if len(during) else float("nan"),
        src_steps_during=steps_during,
        dst_gap_ms=1e3 * float(np.median(np.diff(dst_times))) if dst_steps else float("nan"),
    )


# ----------------------------------------------------------------------------- the run


def summarize(trials: list[Trial]) -> dict[str, Any]:
    """Median over the measured trials of one (length, mode)."""
    def med(f: str) -> float:
        return statistics.median(getattr(t, f) for t in trials)

    fields = ("length", "normal_gap_ms", "downtime_ms", "downtime_steps", "downtime_dst_steps",
              "stall_ms", "stages", "copied_pages", "bytes_moved", "page_bytes",
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
    model = load_serving_model(opts.model, dtype="float32", mesh=make_mesh(devices[0:2]))
    max_len = min(opts.max_model_len, model.cfg.max_seq_len)
    lengths = [min(n, max_len - opts.headroom_tokens) for n in opts.lengths]
    longest_pages = pages_for(max(lengths) + opts.headroom_tokens, opts.page_size)
    num_pages = 1 + longest_pages + opts.background * pages_for(
        BACKGROUND_TOKENS + 4 * opts.headroom_tokens, opts.page_size) + 8
    ecfg = EngineConfig(page_size=opts.page_size, num_pages=num_pages,
                        max_num_seqs=max(8, opts.background + 2), max_model_len=max_len)
    # The prefill engine is never used (requests are placed without a prefill): it shares the
    # source's mesh and weights rather than taking devices of its own.
    setup = Setup(prefill=PrefillEngine(model, ecfg), src_model=model,
                  dst_model=on_mesh(model, make_mesh(devices[2:4])), ecfg=ecfg)
    page_kv_bytes = model.cfg.kv_bytes_per_token * opts.page_size
    log(f"model {model.source} loaded; {num_pages} pages per engine "
        f"({page_kv_bytes / 1e6:.3f} MB K+V each, {model.cfg.kv_bytes_per_token} "
        f"B/token); lengths {lengths}")
    bg_kv = synthetic_pages(model.cfg, pages_for(BACKGROUND_TOKENS + 1, opts.page_size),
                            opts.page_size, seed=7)
    per_length: list[dict[str, Any]] = []
    all_trials: list[dict[str, Any]] = []
    for length in lengths:
        t0 = time.perf_counter()
        kv = synthetic_pages(model.cfg, pages_for(length + 1, opts.page_size), opts.page_size,
                             seed=length)
        for mode in MODES:  # warm-up: compiles at this width on both meshes, copy shapes
            run_trial(setup, mode, length, kv, bg_kv, opts, normal_steps=1, dst_steps=0,
                      check_kv=True)
        warm_s = time.perf_counter() - t0
        trials: dict[str, list[Trial]] = {m: [] for m in MODES}
        for _ in range(opts.repeats):
            for mode in MODES:
                trial = run_trial(setup, mode, length, kv, bg_kv, opts, opts.normal_steps,
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
    staged_worst = max(r["staged"]["downtime_steps_max"] for r in per_length)
    return {
        "benchmark": "migration_downtime",
        "options": dataclasses.asdict(opts),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "jax": jax.__version__, "devices": len(devices),
                    "copy_bandwidth_gbs": bandwidth_gbs, "load_average_end": load_average()},
        "model": {"source": model.source, "dtype": model.cfg.dtype,
                  "kv_bytes_per_token": model.cfg.kv_bytes_per_token,
                  "page_kv_bytes": page_kv_bytes, "num_pages": num_pages},
        "setup": "ServingLoop over a prefill engine and two decode engines; synthetic K/V "
                 "imported + adopt (no prefill); background requests of "
                 f"{BACKGROUND_TOKENS} tokens on each engine: {opts.background}; a step is one "
                 "loop iteration (both engines step)",
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
    p.add_argument("--model", help="embedded (default), a checkpoint, or random:tiny|small")
    a = p.parse_args(argv)
    opts = Options()
    if a.quick:
        opts = dataclasses.replace(opts, lengths=(256, 1024, 4096), background=1, repeats=1,
                                   normal_steps=3, dst_steps=1)
    if a.lengths:
        opts = dataclasses.replace(opts, lengths=tuple(int(x) for x in a.lengths.split(",")))
    for name in ("background", "repeats", "normal_steps", "dst_steps", "model"):
        if getattr(a, name) is not None:
            opts = dataclasses.replace(opts, **{name: getattr(a, name)})
    if opts.dst_steps < 1 or opts.normal_steps < 1:
        p.error("--normal-steps and --dst-steps must be at least 1 (each measures a gap)")
    return opts


def main(argv: list[str] | None = None) -> None:
    result = run(parse_args(argv))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
