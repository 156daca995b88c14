"""``make demo``: answer a few chat prompts with the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import argparse
import time

from ares_jax import LLM, SamplingParams

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for writing clean Python code.",
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    llm = LLM(max_model_len=2048)
    print(f"loaded the embedded model in {time.perf_counter() - t0:.1f} s "
          f"on {llm.devices[0].platform}")
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    outs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], params)
    for prompt, out in zip(PROMPTS, outs):
        m = out.metrics
        print(f"\n>>> {prompt}\n{out.text.strip()}\n[{len(out.token_ids)} tokens, "
              f"{out.finish_reason}, TTFT {m.ttft * 1e3:.0f} ms, TPOT {m.tpot * 1e3:.1f} ms]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
