"""Decode steps side by side: XLA's own lowering against ares-jax's XLA:CPU kernels.

``EngineConfig.decode_backend="xla"`` (gather + einsum attention, XLA dots) against ``"cpu_kernel"``
(the paged-attention kernel plus the small-batch layer matmuls, ``ares_jax/kernels/``). Two
decode engines share one model (the embedded SmolLM2-135M-Instruct, f32) and serve the same
prompts greedily; their steps alternate one by one, so both see the same background load. Prints
JSON (stdout) with ms per step for each, their ratio and whether the greedy tokens agree; a
markdown table goes to stderr.

    .venv/bin/python benchmarks/decode_kernels.py [--batches 1,8,32,64] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from common import load_average, log
from engine_vs_transformers import (
    AresRunner,
    DecodeRun,
    Options,
    _agreement,
    _ints,
    drive,
    fixed_length_prompts,
)

IMPLS = ("xla", "cpu_kernel")


def run(batches: tuple[int, ...], new_tokens: int, prompt_len: int) -> dict[str, Any]:
    from ares_jax.model.loader import load_model

    opts = Options(batches=batches, new_tokens=new_tokens, prompt_len=prompt_len,
                   dtype="float32")
    model = load_model(None, dtype="float32")
    runners = {impl: AresRunner(dataclasses.replace(opts, decode_backend=impl), model=model)
               for impl in IMPLS}
    prompts_all = fixed_length_prompts(model.tokenizer, max(batches), prompt_len)
    result: dict[str, Any] = {"benchmark": "decode_kernels", "command": " ".join(sys.argv),
                              "new_tokens": new_tokens, "prompt_len": prompt_len,
                              "load_avg_start": load_average(), "results": []}
    for b in batches:
        runs = {impl: DecodeRun() for impl in IMPLS}
        log(f"batch {b}: {' and '.join(IMPLS)}, interleaved step by step ...")
        drive(*(runners[i].steps(prompts_all[:b], new_tokens, runs[i]) for i in IMPLS))
        row: dict[str, Any] = {"batch": b}
        for impl in IMPLS:
            row[impl] = runs[impl].summary(b)
        ms = {impl: row[impl]["ms_per_step"]["median"] for impl in IMPLS}
        row["xla_over_kernel"] = ms["xla"] / ms["cpu_kernel"]
        row["greedy_agreement"] = _agreement(runs["xla"].tokens, runs["cpu_kernel"].tokens)
        log(f"  xla {ms['xla']:.1f} ms, kernel {ms['cpu_kernel']:.1f} ms (median), "
            f"xla / kernel {row['xla_over_kernel']:.2f}")
        result["results"].append(row)
    result["load_avg_end"] = load_average()
    return result


def table(result: dict[str, Any]) -> str:
    lines = ["| batch | xla ms/step | kernels ms/step | xla / kernels | greedy rows identical |",
             "|---|---|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['batch']} | {r['xla']['ms_per_step']['median']:.1f} | "
                     f"{r['cpu_kernel']['ms_per_step']['median']:.1f} | "
                     f"{r['xla_over_kernel']:.2f} | "
                     f"{r['greedy_agreement']['rows_identical']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=_ints, default=(1, 8, 32, 64))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=100)
    a = p.parse_args()
    if a.new_tokens < 3:
        p.error("--new-tokens must be >= 3")
    result = run(a.batches, a.new_tokens, a.prompt_len)
    log(table(result))
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
