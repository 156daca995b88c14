"""Engine configuration and the records that flow between prefill, decode and the serving loop."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ares_jax.config import config
from ares_jax.engine.sampling import SamplingParams, TokenInfo

DECODE_BACKENDS = ("auto", "xla", "cpu_kernel")


@config
class EngineConfig:
    page_size: int = 16
    # None: sized from kv_cache_gib (or 2,048 pages on CPU).
    num_pages: int | None = None
    kv_cache_gib: float | None = None
    max_num_seqs: int = 64
    # None: the model's context length, capped at 4,096.
    max_model_len: int | None = None
    max_prefill_tokens: int = 4096
    min_prefill_bucket: int = 32
    # Output of this transformer block feeds the intermediate-layer hidden tap; None: middle.
    tap_layer: int | None = None
    sampling_candidates: int = 1024
    # Decode step: "xla" (XLA's own lowering, any platform), "cpu_kernel" (C++ kernels for
    # XLA:CPU's attention, layer matmuls and lm_head; f32, one device; built on first use) or
    # "auto" (the kernels where they apply and build, else xla).
    decode_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.decode_backend not in DECODE_BACKENDS:
            raise ValueError(f"EngineConfig.decode_backend must be one of {DECODE_BACKENDS}, "
                             f"got {self.decode_backend!r}")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"EngineConfig.page_size must be a power of two, got {self.page_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"EngineConfig.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"EngineConfig.num_pages must be >= 2, got {self.num_pages}")


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    # A stable index that seeds unseeded sampling, so reruns reproduce.
    index: int = 0
    # Tokens generated before a preemption; recompute prefills prompt + these.
    resumed_ids: list[int] = dataclasses.field(default_factory=list)
    # When the caller stops waiting (``time.perf_counter()`` seconds, the scheduler's clock);
    # past it the scheduler aborts the request everywhere. None: no deadline.
    deadline: float | None = None

    @property
    def context_ids(self) -> list[int]:
        return self.prompt_ids + self.resumed_ids


@dataclasses.dataclass
class PrefillResult:
    """Everything a decode engine needs to continue a request.

    ``k``/``v`` are the request's pages, [L, n_pages, S, KVH, K], on the prefill mesh. ``hidden``
    and ``hidden_tap`` are [D] arrays at the last prompt token (final layer after the norm, and
    block ``tap_layer``).
    """

    request: Request
    first: TokenInfo
    k: jax.Array
    v: jax.Array
    num_tokens: int
    hidden: jax.Array
    hidden_tap: jax.Array
    predicted_remaining: float | None = None
    # Set when the first token already ends the request (EOS, a stop id, max_tokens=1).
    finish_reason: str | None = None
    stop_reason: int | None = None


@dataclasses.dataclass
class StepOutput:
    """One decode step: a token per active request (row order = ``request_ids``).

    ``hidden``/``hidden_tap`` are [B_bucket, D] device arrays; rows past ``len(request_ids)`` are
    padding. ``predicted_remaining`` holds the fused predictor's output per request, if any.
    """

    request_ids: list[str]
    tokens: list[TokenInfo]
    hidden: jax.Array
    hidden_tap: jax.Array
    predicted_remaining: np.ndarray | None = None
    # Requests evicted to free pages; the serving loop re-queues them for recompute.
    preempted: list[str] = dataclasses.field(default_factory=list)
    # Per row: why the request stopped at this token (None: it goes on). Finished requests are
    # already released by the engine.
    finish_reasons: list[str | None] = dataclasses.field(default_factory=list)
    stop_reasons: list[int | None] = dataclasses.field(default_factory=list)
