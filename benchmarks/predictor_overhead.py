"""Decode-step overhead of the fused length head, head on vs off, side by side in one run.

Two decode engines hold the same 32 prefilled requests; their steps alternate (off, on, off,
on, ...) so machine noise hits both alike. Prints JSON: median step times and the ratio. On a
shared CPU the difference is within noise, so the head is also timed alone (the same function,
jitted on its own at the same batch) to bound its share of the step.

    .venv/bin/python benchmarks/predictor_overhead.py [--batch 32] [--steps 60] [--head PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig, Request
from ares_jax.model.loader import load_model
from ares_jax.predictor.serving import DEFAULT_HEAD_DIR, load_engine_head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--head", default=str(DEFAULT_HEAD_DIR))
    args = ap.parse_args()

    model = load_model()
    tap = model.cfg.default_tap_layer
    head = load_engine_head(args.head, model.cfg.d_model, n_layers=model.cfg.n_layers,
                            tap_layer=tap, mesh=model.mesh)
    ecfg = EngineConfig(max_num_seqs=args.batch, num_pages=args.batch * 16, max_model_len=512)
    params = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=400, ignore_eos=True)
    tok = model.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content":
               f"Tell me a long story about topic number {i}."}])) for i in range(args.batch)]
    reqs = [Request(request_id=f"r{i}", prompt_ids=p, params=params, index=i)
            for i, p in enumerate(prompts)]
    results = PrefillEngine(model, ecfg).prefill(reqs)
    engines = {"off": DecodeEngine(model, ecfg), "on": DecodeEngine(model, ecfg, head=head)}
    for engine in engines.values():
        for r in results:
            engine.insert(r)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(args.warmup + args.steps):
        for name, engine in engines.items():
            start = time.perf_counter()
            out = engine.step()  # returns host tokens, so the step has finished
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times[name].append(elapsed)
    assert out.predicted_remaining is not None and len(out.predicted_remaining) == args.batch
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    head_fn, head_params = head
    alone = jax.jit(head_fn)
    d = model.cfg.d_model
    args_ = (head_params, jnp.ones((args.batch, d)), jnp.ones((args.batch, d)),
             jnp.full(args.batch, 16, jnp.int32), jnp.full(args.batch, 512, jnp.int32))
    alone(*args_).block_until_ready()
    head_times = []
    for _ in range(200):
        start = time.perf_counter()
        alone(*args_).block_until_ready()
        head_times.append(time.perf_counter() - start)
    head_ms = statistics.median(head_times) * 1e3
    print(json.dumps({
        "batch": args.batch, "steps": args.steps, "head": args.head,
        "median_step_ms_head_off": off * 1e3, "median_step_ms_head_on": on * 1e3,
        "mean_step_ms_head_off": statistics.mean(times["off"]) * 1e3,
        "mean_step_ms_head_on": statistics.mean(times["on"]) * 1e3,
        "ratio_on_over_off": on / off, "overhead_pct": (on / off - 1) * 100,
        "head_alone_median_ms": head_ms,
        "head_alone_pct_of_step": head_ms / (off * 1e3) * 100,
    }, indent=2))


if __name__ == "__main__":
    main()
