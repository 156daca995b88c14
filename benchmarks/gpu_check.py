"""GPU check: the real decode engine on a Llama-3.1-8B-shaped model, set against the GPU cost
grid the simulator uses, and a cross-process KV pull against a device copy.

Run on a GPU host through ``scripts/gpu_check.sh`` (it uses the JAX already installed there and
the repository as it is, with nothing installed); ``--tiny`` runs a tiny model on CPU in
seconds. Sections, each guarded so that one failure is reported and the rest still run:

- ``env``: JAX and jaxlib versions, backend, devices, device memory, ``nvidia-smi``.
- ``engine``: a bf16 Llama-3.1-8B-shaped model (32 layers, d_model 4096, 32 heads, 8 KV heads,
  head_dim 128, FFN 14336, vocab 128256) with random weights, drawn on the device (drawing 8B
  values with numpy takes minutes). ``DecodeEngine.step`` at each batch size x KV length:
  requests are placed with ``reserve`` + ``adopt`` (their KV pages hold whatever the pool
  holds, which costs a step the same as real KV), two warm-up steps (the first compiles), then
  ``--steps`` timed steps, each to the sampled tokens on the host, as serving runs them; then
  the same jitted step replayed back to back, for the device's share of it (``device_ms``).
- ``grid``: each point against ``aic_grid.csv`` (NVIDIA aiconfigurator, vLLM kernel times with
  CUDA graphs) for the same GPU, the exact grid row where there is one, and a least-squares
  ``ms = a + b*batch + c*kv_tokens`` over the measured points beside the grid's own fit.
- ``transfer``: a second process offers a K/V page block (8B geometry: 1 MiB per page each for
  K and V in bf16) with ``KVTransferServer.offer``; this process pulls it several times with
  ``KVTransferServer.pull``, checks it against the source's checksum, and reports GB/s against
  a device-to-device copy of the same bytes in this process.

One JSON object goes to stdout at the end (progress to stderr); with ``$OUT`` set (or
``--out``) it is also written to ``$OUT/gpu_check.json`` after every section, so a run cut
short still leaves what it measured.

    scripts/gpu_check.sh                       # GPU, about 4-7 minutes
    scripts/gpu_check.sh --batches 1,32 --kv-lens 2048
    python benchmarks/gpu_check.py --tiny      # CPU, seconds
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO))

# Where the grid is looked for, in order, when --grid is not given: the shared data folder
# beside the repository, then a copy inside it (only the repository travels to some machines).
GRID_CANDIDATES = (REPO.parent / "shared" / "data" / "costmodel" / "aic_grid.csv",
                   REPO / "benchmarks" / "data" / "aic_grid.csv")
# The grid's fit for llama3_8b (ms = a + b*batch + c*kv_tokens), from shared/data/README.md.
README_FITS = {"h100_sxm": (6.31, 0.0129, 4.12e-5), "a100_sxm": (11.72, 0.036, 8.45e-5),
               "h200_sxm": (4.74, 0.016, 2.91e-5)}


def log(*parts: object) -> None:
    print("[gpu_check]", *parts, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="a tiny model on CPU, small points: checks the script itself")
    p.add_argument("--batches", default=None, help="decode batch sizes (default 1,8,32,64)")
    p.add_argument("--kv-lens", default=None,
                   help="KV tokens per request (default 512,2048,8192)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per point (default 10)")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="start no new engine point after this many seconds of the engine "
                        "section (default 270), so the whole check ends in time")
    p.add_argument("--decode-backend", default=None, help="EngineConfig.decode_backend "
                   "(default: auto on GPU, xla with --tiny)")
    p.add_argument("--grid", type=Path, default=None, help="aic_grid.csv (default: "
                   "../shared/data/costmodel/aic_grid.csv, then benchmarks/data/aic_grid.csv)")
    p.add_argument("--system", default="auto",
                   help="grid system to compare with (default: from the device kind)")
    p.add_argument("--transfer-mib", type=float, default=None,
                   help="K+V block size for the pull (default 512 MiB; 1 MiB with --tiny)")
    p.add_argument("--pulls", type=int, default=None, help="timed pulls (default 4; 2 with "
                   "--tiny)")
    p.add_argument("--skip", default="", help="sections to skip: engine,transfer")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output file (default: $OUT/gpu_check.json when $OUT is set)")
    # The transfer's source process runs this same file in this mode.
    p.add_argument("--transfer-source", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tiny = args.tiny
    args.batches = _ints(args.batches or ("1,4" if tiny else "1,8,32,64"))
    # Tiny: two KV lengths in one page-table bucket, so only two steps compile.
    args.kv_lens = _ints(args.kv_lens or ("8,16" if tiny else "512,2048,8192"))
    args.steps = args.steps or (3 if tiny else 10)
    args.decode_backend = args.decode_backend or ("xla" if tiny else "auto")
    args.transfer_mib = args.transfer_mib or (1.0 if tiny else 512.0)
    args.pulls = args.pulls or (2 if tiny else 4)
    if args.out is None and os.environ.get("OUT"):
        args.out = Path(os.environ["OUT"]) / "gpu_check.json"
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


# ----------------------------------------------------------------------------- the report


class Report:
    """The JSON being built; every section runs guarded and the file is rewritten after each."""

    def __init__(self, out: Path | None) -> None:
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                              time.gmtime())}
        self.out = out

    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        log(f"--- {name}")
        start = time.perf_counter()
        try:
            result = fn()
            entry = {"ok": True, **result}
        except Exception as err:  # noqa: BLE001 - report it, run the next section
            log(f"{name} failed: {err!r}")
            entry = {"ok": False, "error": f"{type(err).__name__}: {err}",
                     "traceback": traceback.format_exc()[-4000:]}
        entry["seconds"] = round(time.perf_counter() - start, 2)
        self.data[name] = entry
        self.save()
        return entry if entry["ok"] else None

    def skip(self, name: str, reason: str) -> None:
        log(f"--- {name}: skipped ({reason})")
        self.data[name] = {"ok": None, "skipped": reason}
        self.save()

    def save(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.out)


# ----------------------------------------------------------------------------- env


def env_section() -> dict[str, Any]:
    import jax
    import jaxlib

    devs = jax.devices()
    out: dict[str, Any] = {
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version(),
        "backend": jax.default_backend(), "device_count": len(devs),
        "devices": [str(d) for d in devs], "device_kind": devs[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
    }
    try:
        stats = devs[0].memory_stats() or {}
        out["device_memory_gib"] = round(stats.get("bytes_limit", 0) / 2**30, 1)
    except Exception as err:  # noqa: BLE001 - CPU devices may have none
        out["device_memory_gib"] = f"unknown ({err})"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                              "clocks.max.sm", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        out["nvidia_smi"] = f"unavailable ({err.__class__.__name__})"
    return out


# ----------------------------------------------------------------------------- the model


def model_config(tiny: bool):
    from ares_jax.model.model import Config, RopeScaling

    if tiny:
        return Config(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=16, ffn_dim=128, max_seq_len=512, dtype="float32",
                      eos_token_ids=(3,))
    # Llama-3.1-8B: the dimensions of its config.json, bf16.
    return Config(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                  head_dim=128, ffn_dim=14336, rope_theta=500000.0,
                  rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position=8192),
                  max_seq_len=131072, dtype="bfloat16", bos_token_id=128000,
                  eos_token_ids=(128001, 128008, 128009))


def device_random_weights(cfg, mesh, seed: int = 0, scale: float = 0.02):
    """Random weights drawn on the device, straight into their shardings: the same tree and
    the same rule as ``init_random_weights`` (norm scales 1, the rest ``scale`` * normal), but
    an 8B model takes seconds instead of the minutes numpy needs on the host.

    One jitted draw per weight, so at most one weight's f32 draw is alive at a time; "rbg" keys
    (XLA's RngBitGenerator) compile much faster than the default threefry.
    """
    import jax
    import jax.numpy as jnp

    from ares_jax.model.model import is_shape_leaf, weight_shapes
    from ares_jax.model.sharding import weight_shardings

    shapes = weight_shapes(cfg)
    treedef = jax.tree_util.tree_structure(shapes, is_leaf=is_shape_leaf)
    paths = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape_leaf)[0]
    shardings = jax.tree_util.tree_leaves(weight_shardings(cfg, mesh))
    dtype = cfg.jnp_dtype
    leaves = []
    for i, ((path, shape), sharding) in enumerate(zip(paths, shardings, strict=True)):
        if "norm" in jax.tree_util.keystr(path):
            draw = jax.jit(lambda s=shape: jnp.ones(s, dtype), out_shardings=sharding)
            leaves.append(draw())
        else:
            draw = jax.jit(lambda k, s=shape: (scale * jax.random.normal(k, s, jnp.float32)
                                                ).astype(dtype), out_shardings=sharding)
            leaves.append(draw(jax.random.key(seed * 1000 + i, impl="rbg")))
        jax.block_until_ready(leaves[-1])
    return jax.tree_util.tree_unflatten(treedef, leaves)


def build_model(tiny: bool):
    import jax

    from ares_jax.model.loader import LoadedModel
    from ares_jax.model.model import init_random_weights
    from ares_jax.model.sharding import DEFAULT_RULES, make_mesh, weight_shardings

    cfg = model_config(tiny)
    mesh = make_mesh(jax.devices()[:1])
    t0 = time.perf_counter()
    if tiny:  # host draws: a tiny model's cost is compiling the device draws, not drawing
        weights = jax.device_put(init_random_weights(cfg, 0), weight_shardings(cfg, mesh))
    else:
        weights = device_random_weights(cfg, mesh)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(weights))
    info = {"config": {k: getattr(cfg, k) for k in ("n_layers", "d_model", "n_heads",
                                                    "n_kv_heads", "head_dim", "ffn_dim",
                                                    "vocab_size", "dtype")},
            "params": int(n_params), "params_billion": round(n_params / 1e9, 3),
            "weights_gib": round(n_params * cfg.jnp_dtype.itemsize / 2**30, 2),
            "kv_bytes_per_token": cfg.kv_bytes_per_token,
            "init_seconds": round(time.perf_counter() - t0, 2)}
    return LoadedModel(cfg, weights, None, mesh, DEFAULT_RULES, "random"), info


# ----------------------------------------------------------------------------- the engine


def engine_section(args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    import jax

    from ares_jax.engine.decode import DecodeEngine
    from ares_jax.engine.kv_pool import pages_for
    from ares_jax.engine.sampling import SamplingParams
    from ares_jax.engine.types import EngineConfig, Request

    model, info = build_model(args.tiny)
    page_size = 16
    # Tokens each request grows by: 2 warm-up + the timed steps + 1 captured for the device
    # replay + the next token's slot, and 2 spare.
    extra = 2 + args.steps + 1 + 1 + 2
    max_len = max(args.kv_lens) + extra
    max_batch = max(args.batches)
    num_pages = 2 + max(b * pages_for(n + extra, page_size)
                        for b in args.batches for n in args.kv_lens)
    ecfg = EngineConfig(page_size=page_size, num_pages=num_pages, max_num_seqs=max_batch,
                        max_model_len=max_len, decode_backend=args.decode_backend)
    engine = DecodeEngine(model, ecfg)
    info.update({"decode_backend": engine.backend, "num_pages": num_pages,
                 "kv_pool_gib": round(num_pages * page_size * model.cfg.kv_bytes_per_token
                                      / 2**30, 2)})
    log(f"model ready ({info['params_billion']} B params, {info['weights_gib']} GiB) in "
        f"{info['init_seconds']} s; KV pool {info['kv_pool_gib']} GiB")
    params = SamplingParams(temperature=0.0, max_tokens=max_len, ignore_eos=True)
    points: list[dict[str, Any]] = []
    start = time.perf_counter()
    # Every batch size at the middle KV length first, then the other lengths: a budget cut
    # then loses the corners of the grid, not a whole batch size.
    middle = sorted(args.kv_lens)[len(args.kv_lens) // 2]
    kv_order = [middle] + [n for n in args.kv_lens if n != middle]
    for kv_len in kv_order:
        for batch in args.batches:
            point: dict[str, Any] = {"batch": batch, "kv_len": kv_len,
                                     "kv_tokens": batch * kv_len}
            if time.perf_counter() - start > args.budget_s:
                point["skipped"] = f"engine budget of {args.budget_s:.0f} s spent"
                points.append(point)
                continue
            ids = [f"b{batch}-l{kv_len}-{i}" for i in range(batch)]
            try:
                for i, rid in enumerate(ids):
                    engine.reserve(rid, pages_for(kv_len + extra, page_size))
                    engine.adopt(Request(request_id=rid, prompt_ids=[1], params=params,
                                         index=i), num_cached=kv_len, last_token=1 + i % 100,
                                 generated=1)
                compiled = _compiled_steps()
                t0 = time.perf_counter()
                engine.step()  # compiles this (batch, page-table width) bucket, if new
                point["first_step_s"] = round(time.perf_counter() - t0, 3)
                point["compiled"] = None if compiled is None else _compiled_steps() != compiled
                engine.step()  # a fresh pool's first step compiles a second variant: warm both
                times = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    out = engine.step()
                    times.append(time.perf_counter() - t0)
                assert len(out.tokens) == batch
                point.update({"median_ms": round(1e3 * statistics.median(times), 3),
                              "min_ms": round(1e3 * min(times), 3),
                              "max_ms": round(1e3 * max(times), 3)})
                try:
                    point["device_ms"] = round(1e3 * device_step_seconds(engine, args.steps), 3)
                except Exception as err:  # noqa: BLE001 - an extra; the step time stands
                    point["device_ms_error"] = f"{type(err).__name__}: {err}"
                log(f"batch {batch:3d} kv {kv_len:6d}: {point['median_ms']:8.2f} ms/step, "
                    f"device {point.get('device_ms', '?')} ms (first {point['first_step_s']} s)")
            except Exception as err:  # noqa: BLE001 - record it, try the next point
                point["error"] = f"{type(err).__name__}: {err}"
                log(f"batch {batch} kv {kv_len} failed: {err!r}")
            finally:
                for rid in ids:
                    engine.release(rid)
            points.append(point)
    state["device_kind"] = jax.devices()[0].device_kind
    state["points"] = points
    del engine, model
    gc.collect()
    return {"model": info, "page_size": page_size, "timed_steps": args.steps, "points": points}


def _compiled_steps() -> int | None:
    """Compiled decode-step variants so far (None if the engine does not count them)."""
    from ares_jax.engine import decode as decode_mod

    try:
        return decode_mod.compiled_step_count()
    except Exception:  # noqa: BLE001 - an engine without the counter: report no answer
        return None


def device_step_seconds(engine, steps: int) -> float:
    """Seconds per decode step on the device alone: the engine's jitted step, replayed
    ``steps`` times back to back on the inputs of one real ``step()`` (captured on the way
    through), with no host work between steps. Set against the engine's step time, it splits
    device time from per-step host work (batch assembly, the inputs' transfer, the tokens'
    return); the grid's numbers are device time (vLLM kernels under CUDA graphs).

    Each replay writes the same KV slot again and samples from the same inputs: the work is a
    real step's, the tokens are not used. Relies on ``DecodeEngine.step`` calling
    ``ares_jax.engine.decode._decode_jit`` with the K and V pools as arguments 2 and 3.
    """
    import jax

    from ares_jax.engine import decode as decode_mod

    real = decode_mod._decode_jit
    captured: list[tuple[tuple, dict]] = []

    def capture(*a, **kw):
        captured.append((a, kw))
        return real(*a, **kw)

    decode_mod._decode_jit = capture
    try:
        engine.step()
    finally:
        decode_mod._decode_jit = real
    if len(captured) != 1:
        raise RuntimeError(f"expected one decode call per step, saw {len(captured)}")
    a, kw = captured[0]
    pool = engine._pool  # a device-time probe: it replays the jitted step on the pool itself
    k, v = pool.k, pool.v

    def replay(k, v):
        return real(*a[:2], k, v, *a[4:], **kw)

    out = replay(k, v)  # no compile: the same shapes and static arguments as step()
    k, v = out[0], out[1]
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = replay(k, v)  # the pools are donated: chain them
        k, v = out[0], out[1]
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - t0
    pool.k, pool.v = k, v
    return elapsed / steps


# ----------------------------------------------------------------------------- the grid


def find_grid(path: Path | None) -> Path | None:
    if path is not None:
        return path if path.exists() else None
    return next((p for p in GRID_CANDIDATES if p.exists()), None)


def grid_system(device_kind: str) -> str | None:
    kind = device_kind.lower()
    for key, system in (("h200", "h200_sxm"), ("h100", "h100_sxm"), ("a100", "a100_sxm")):
        if key in kind:
            return system
    return None


def fit_abc(rows: list[tuple[int, int, float]]) -> tuple[float, float, float] | None:
    """Least squares ``ms = a + b*batch + c*kv_tokens`` over (batch, kv_tokens, ms)."""
    import numpy as np

    if len(rows) < 3 or len({(b, t) for b, t, _ in rows}) < 3:
        return None
    x = np.array([[1.0, b, t] for b, t, _ in rows])
    y = np.array([ms for _, _, ms in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2])


def grid_section(args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    path = find_grid(args.grid)
    if path is None:
        where = args.grid or " or ".join(str(p) for p in GRID_CANDIDATES)
        return {"skipped": f"no aic_grid.csv at {where}; pass --grid PATH or copy it to "
                           "benchmarks/data/aic_grid.csv"}
    with path.open() as f:
        rows = list(csv.DictReader(f))
    kind = state.get("device_kind", "")
    system = grid_system(kind) if args.system == "auto" else args.system
    out: dict[str, Any] = {"grid": str(path), "grid_rows": len(rows), "system": system,
                           "device_kind": kind}
    if system is None:
        out["skipped"] = f"no grid system for device kind {kind!r}; pass --system"
        return out
    decode = {(int(r["batch"]), int(r["len"])): float(r["ms"]) for r in rows
              if r["model"] == "llama3_8b" and r["system"] == system and int(r["tp"]) == 1
              and r["phase"] == "decode"}
    if not decode:
        out["skipped"] = f"the grid has no llama3_8b decode rows for {system!r}"
        return out
    grid_fit = fit_abc([(b, b * n, ms) for (b, n), ms in decode.items()])
    out["grid_fit_abc"] = grid_fit
    out["readme_fit_abc"] = README_FITS.get(system)
    measured = [p for p in state.get("points", []) if "median_ms" in p]
    compared = []
    for p in measured:
        b, n = p["batch"], p["kv_len"]
        row = {"batch": b, "kv_len": n, "measured_ms": p["median_ms"]}
        if "device_ms" in p:
            row["device_ms"] = p["device_ms"]
        if (b, n) in decode:
            row["grid_ms"] = round(decode[(b, n)], 3)
            row["measured_over_grid"] = round(p["median_ms"] / decode[(b, n)], 3)
            if "device_ms" in p:
                row["device_over_grid"] = round(p["device_ms"] / decode[(b, n)], 3)
        if grid_fit is not None:
            a, bb, c = grid_fit
            row["grid_fit_ms"] = round(a + bb * b + c * b * n, 3)
        compared.append(row)
    out["points"] = compared
    for key in ("measured_over_grid", "device_over_grid"):
        ratios = [r[key] for r in compared if key in r]
        if ratios:
            out[f"median_{key}"] = round(statistics.median(ratios), 3)
    out["measured_fit_abc"] = fit_abc([(p["batch"], p["kv_tokens"], p["median_ms"])
                                       for p in measured])
    out["device_fit_abc"] = fit_abc([(p["batch"], p["kv_tokens"], p["device_ms"])
                                     for p in measured if "device_ms" in p])
    return out


# ----------------------------------------------------------------------------- the transfer


def transfer_geometry(tiny: bool) -> tuple[int, int, int, int]:
    """(layers, page_size, kv_heads, head_dim) of the model's KV pages."""
    cfg = model_config(tiny)
    return cfg.n_layers, 16, cfg.n_kv_heads, cfg.head_dim


def run_transfer_source(spec: str) -> int:
    """The source process: offer one block COUNT times, print the tickets, wait for quit."""
    import jax
    import numpy as np

    from ares_jax.model.sharding import kv_pool_sharding, make_mesh
    from ares_jax.transfer.remote import KVTransferServer

    shape_text, dtype, count, seed = spec.split(":")
    shape = tuple(int(x) for x in shape_text.split(","))
    server = KVTransferServer()
    mesh = make_mesh(jax.devices()[:1])
    sharding = kv_pool_sharding(shape, mesh)
    key = jax.random.key(int(seed))
    make = jax.jit(lambda k: jax.random.normal(k, shape, jax.numpy.float32).astype(dtype),
                   out_shardings=sharding)
    k, v = make(key), make(jax.random.fold_in(key, 1))
    sums = [float(np.asarray(x, np.float32).sum(dtype=np.float64)) for x in (k, v)]
    tickets = [server.offer(k, v).to_json() for _ in range(int(count))]
    print(json.dumps({"tickets": tickets, "k_sum": sums[0], "v_sum": sums[1],
                      "platform": jax.devices()[0].platform}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
    return 0


def transfer_section(args: argparse.Namespace) -> dict[str, Any]:
    import jax.numpy as jnp
    import numpy as np

    from ares_jax.transfer.remote import KVTransferServer, PageTicket

    layers, page_size, kv_heads, head_dim = transfer_geometry(args.tiny)
    dtype = "float32" if args.tiny else "bfloat16"
    page_bytes = layers * page_size * kv_heads * head_dim * np.dtype(jnp.dtype(dtype)).itemsize
    pages = max(1, round(args.transfer_mib * 2**20 / (2 * page_bytes)))
    shape = (layers, pages, page_size, kv_heads, head_dim)
    payload = 2 * pages * page_bytes
    count = 1 + args.pulls  # the first pull (connection set-up) is reported apart
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # share the GPU with us
    cmd = [sys.executable, str(Path(__file__).resolve()), "--transfer-source",
           f"{','.join(map(str, shape))}:{dtype}:{count}:11"] + (["--tiny"] if args.tiny else [])
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        line = _readline(proc, timeout_s=120)
        offer = json.loads(line)
        server = KVTransferServer()
        pulls = []
        for i, text in enumerate(offer["tickets"]):
            ticket = PageTicket.from_json(text)
            t0 = time.perf_counter()
            k, v = server.pull(ticket, shape=shape, dtype=dtype, timeout_s=60.0)
            pulls.append(time.perf_counter() - t0)
            if i == 0:
                got = [float(np.asarray(x, np.float32).sum(dtype=np.float64)) for x in (k, v)]
                if got != [offer["k_sum"], offer["v_sum"]]:
                    raise AssertionError(f"pulled block checksums {got} differ from the "
                                         f"source's {[offer['k_sum'], offer['v_sum']]}")
            del k, v
        copy_s = device_copy_seconds(shape, dtype, repeats=max(3, args.pulls))
    finally:
        _stop(proc)
    timed = pulls[1:] or pulls
    best, median = min(timed), statistics.median(timed)
    return {"block_shape": list(shape), "dtype": dtype, "payload_mib": round(payload / 2**20, 1),
            "source_platform": offer.get("platform"), "checksum_ok": True,
            "first_pull_ms": round(1e3 * pulls[0], 2),
            "pull_ms": [round(1e3 * s, 2) for s in timed],
            "pull_gbs_best": round(payload / best / 1e9, 2),
            "pull_gbs_median": round(payload / median / 1e9, 2),
            "device_copy_ms": round(1e3 * copy_s, 3),
            "device_copy_gbs": round(payload / copy_s / 1e9, 2),
            "pull_over_device_copy": round(copy_s / best, 4),
            "note": "GB/s = K+V payload bytes / time; the device copy reads and writes each "
                    "byte once (x*2 on the device), so its memory traffic is twice that"}


def device_copy_seconds(shape: tuple[int, ...], dtype: str, repeats: int) -> float:
    """Best time of a device-to-device pass over K and V of ``shape`` in this process."""
    import jax
    import jax.numpy as jnp

    make = jax.jit(lambda: (jnp.ones(shape, dtype), jnp.ones(shape, dtype)))
    k, v = make()
    copy = jax.jit(lambda a, b: (a * 2, b * 2))  # not x+0: XLA would hand the input back
    jax.block_until_ready(copy(k, v))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(copy(k, v))
        best = min(best, time.perf_counter() - t0)
    return best


def _readline(proc: subprocess.Popen, timeout_s: float) -> str:
    """The source's first line, or an error naming why it did not come."""
    import threading

    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not box or not box[0]:
        raise RuntimeError(f"the transfer source gave no ticket within {timeout_s:.0f} s "
                           f"(exit status {proc.poll()})")
    return box[0]


def _stop(proc: subprocess.Popen) -> None:
    """Ask the source to quit; kill it (and anything it started) if it does not."""
    try:
        if proc.poll() is None:
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait(timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A timeout's TERM unwinds like an exception: the transfer source is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.transfer_source:
        return run_transfer_source(args.transfer_source)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    report = Report(args.out)
    report.data["mode"] = "tiny" if args.tiny else "llama-3.1-8b"
    report.data["argv"] = sys.argv[1:] if argv is None else argv
    state: dict[str, Any] = {}
    env = report.section("env", env_section)
    if env is not None:
        log(f"jax {env['jax']} on {env['backend']}: {env['devices']}")
        state["device_kind"] = env["device_kind"]
    if "engine" in skip:
        report.skip("engine", "--skip engine")
    else:
        report.section("engine", lambda: engine_section(args, state))
    report.section("grid", lambda: grid_section(args, state))
    if "transfer" in skip:
        report.skip("transfer", "--skip transfer")
    else:
        report.section("transfer", lambda: transfer_section(args))
    sections = [k for k, v in report.data.items() if isinstance(v, dict) and "ok" in v]
    report.data["failed_sections"] = [k for k in sections if report.data[k]["ok"] is False]
    report.data["ok"] = not report.data["failed_sections"]
    report.save()
    print(json.dumps(report.data, default=str), flush=True)
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
