"""The benchmark's configuration (one frozen dataclass, validated on construction) and the parsers
for the CLI's compound flags (``--goodput``, ``--metric-percentiles``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
DATASETS = ("sharegpt", "random", "trace")
METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


class BenchError(RuntimeError):
    """A problem that stops the whole run (unreachable server, not an OpenAI API, bad input),
    as opposed to a failed request, which is counted and reported."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Everything one ``bench serve`` run needs. Field names follow ``vllm bench serve``'s flags.

    Token lengths are targets: the server's tokenizer is not reachable over HTTP, so prompts are
    built with a local tokenizer (``tokenizer``) and the report counts the server's
    ``usage.prompt_tokens`` / ``usage.completion_tokens``.
    """

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first id from GET /v1/models
    api_key: str | None = None  # sent as "Authorization: Bearer ..."
    # Workload.
    dataset_name: str = "sharegpt"
    dataset_path: str | None = None  # trace CSV: arrival_s,prompt_tokens,output_tokens
    num_prompts: int = 1000
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    sharegpt_output_len: int | None = None
    # "auto": the embedded model's tokenizer when installed, else words; "embedded"; "words";
    # or a path (.gguf, tokenizer.json, or an HF directory holding one).
    tokenizer: str = "auto"
    # Arrivals.
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    # Sampling.
    ignore_eos: bool = False
    temperature: float = 0.0
    extra_body: Mapping[str, Any] | None = None  # merged into every request body
    # Metrics.
    goodput: Mapping[str, float] | None = None  # SLOs in ms, keys from SLO_METRICS
    percentile_metrics: tuple[str, ...] = METRICS
    metric_percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    # Runtime.
    request_timeout_s: float = 600.0  # longest silence allowed on one stream
    disable_tqdm: bool = False
    plot_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        if self.dataset_name not in DATASETS:
            raise ValueError(f"dataset_name must be one of {DATASETS}, got {self.dataset_name!r}")
        if self.dataset_name == "trace" and not self.dataset_path:
            raise ValueError("dataset_name='trace' needs dataset_path (a CSV of "
                             "arrival_s,prompt_tokens,output_tokens)")
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.random_input_len < 1 or self.random_output_len < 1:
            raise ValueError("random_input_len and random_output_len must be >= 1")
        if not 0.0 <= self.random_range_ratio < 1.0:
            raise ValueError(f"random_range_ratio must be in [0, 1), got "
                             f"{self.random_range_ratio}")
        if self.sharegpt_output_len is not None and self.sharegpt_output_len < 1:
            raise ValueError("sharegpt_output_len must be >= 1")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf = all at once), got "
                             f"{self.request_rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a positive number, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        for key, value in (self.goodput or {}).items():
            if key not in SLO_METRICS:
                raise ValueError(f"goodput SLO {key!r} is not one of {SLO_METRICS}")
            if not value >= 0:
                raise ValueError(f"goodput SLO {key} must be >= 0 ms, got {value}")
        for m in self.percentile_metrics:
            if m not in METRICS:
                raise ValueError(f"percentile metric {m!r} is not one of {METRICS}")
        for p in self.metric_percentiles:
            if not 0 < p < 100:
                raise ValueError(f"metric percentiles must be in (0, 100), got {p}")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")

    @property
    def chat(self) -> bool:
        return self.endpoint == "/v1/chat/completions"


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput takes NAME:MS with NAME in {', '.join(SLO_METRICS)}; "
                             f"got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of ms") from None
        if not ms >= 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be >= 0 ms")
        out[name] = ms
    return out


def parse_percentiles(text: str) -> tuple[float, ...]:
    """``"50,90,99"`` -> ``(50.0, 90.0, 99.0)``."""
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"--metric-percentiles takes numbers like 50,90,99; got {text!r}") \
            from None
    if not values:
        raise ValueError("--metric-percentiles is empty")
    return values


def parse_metrics(text: str) -> tuple[str, ...]:
    """``"ttft,tpot"`` -> ``("ttft", "tpot")``."""
    return tuple(m.strip().lower() for m in text.split(",") if m.strip())
