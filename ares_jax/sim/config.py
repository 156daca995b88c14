"""Simulator settings (one ``@config`` tree; override with ``--set a.b=value``)."""

from __future__ import annotations

from ares_jax.cluster.migration import MigrationConfig
from ares_jax.config import config
from ares_jax.scheduler.ares import AresConfig
from ares_jax.scheduler.policies import LlumnixConfig


@config
class SimClusterConfig:
    """The simulated cluster: hardware, shape, links and memory.

    The live scheduler core's settings are ``cluster.config.ClusterConfig``; the two share the
    migration protocol's knobs (``MigrationConfig``) and the policies' (``AresConfig``).
    """

    model: str = "llama3_8b"  # llama3_8b | qwen25_7b | r1_qwen_32b
    gpu: str = "h100_sxm"  # h100_sxm | h200_sxm | a100_sxm
    tp: int = 1
    prefill_replicas: int = 4
    decode_replicas: int = 16
    cost_model: str = "grid"  # grid (aiconfigurator interpolation) | linear (the README fit)
    page_size: int = 16
    memory_utilization: float = 0.9
    # < 1 shrinks every decode replica's KV pool: the memory-pressure regimes.
    kv_capacity_scale: float = 1.0
    link_gbytes_per_s: float = 50.0  # prefill->decode and decode->decode KV links
    migration_stall_ms: float = 1.0  # fixed cost of the final stop-and-copy stage
    # Decode->decode (migration) link; 0 = the same as link_gbytes_per_s. Separate so a slow
    # migration path can be studied without slowing prefill->decode transfers too.
    migration_link_gbytes_per_s: float = 0.0
    # While a migration copies, the source's and destination's decode steps take this fraction
    # longer (the copy competes with decoding for HBM bandwidth); 0 = free copies.
    migration_slowdown: float = 0.0
    # The live protocol's knobs (``cluster/migration.py``). Stop-and-copy at 16 pages left, as
    # Llumnix does on GPUs: a 16-page final copy of Llama-3.1-8B is 33 MB, under 1 ms at 50
    # GB/s (the CPU engines' default of 2 suits their slow copies). Its
    # ``max_starts_per_minute`` caps migrations started per 60 s of simulated time.
    migration: MigrationConfig = MigrationConfig(final_stage_pages=16)
    prefill_token_budget: int = 8192  # prompt tokens batched into one prefill
    admission_watermark: float = 0.01  # vLLM: keep this fraction of pages free at admission
    # Where a preempted request recomputes its KV: "prefill" sends it back to the front of a
    # prefill queue (vllm-ascend's RecomputeScheduler); "local" keeps it at the front of its
    # decode replica's queue and recomputes there once pages free up, stalling that replica's
    # batch for the recompute (vLLM's decode instance with a KV connector).
    preemption: str = "prefill"

    def __post_init__(self) -> None:
        if self.migration_slowdown < 0:
            raise ValueError(f"cluster.migration_slowdown must be >= 0, "
                             f"not {self.migration_slowdown}")
        if self.preemption not in ("prefill", "local"):
            raise ValueError(f"cluster.preemption must be 'prefill' or 'local', "
                             f"not {self.preemption!r}")


@config
class PredictionConfig:
    """Multiplicative log-normal error of the remaining-length prediction.

    ``pred = true_remaining * exp(sigma(g) * z)`` at each refresh (every ``refresh_tokens``
    generated tokens), counted down between refreshes. ``sigma`` shrinks with generated tokens
    ``g``: ``floor + (start - floor) * half / (half + g)``, or is read from ``table`` (a CSV of
    ``generated_tokens,sigma`` rows measured on the real predictor). ``z`` mixes a per-request
    persistent bias with fresh noise per refresh (``persistence`` is their correlation).
    """

    sigma_start: float = 0.8
    sigma_floor: float = 0.1
    half_tokens: float = 600.0
    persistence: float = 0.8
    refresh_tokens: int = 16
    table: str | None = None


@config
class SloConfig:
    ttft_s: float = 2.0
    tpot_ms: float = 50.0
    attainment: float = 0.9  # goodput: fraction of requests that must meet both SLOs


@config
class SimConfig:
    cluster: SimClusterConfig = SimClusterConfig()
    prediction: PredictionConfig = PredictionConfig()
    slo: SloConfig = SloConfig()
    ares: AresConfig = AresConfig()
    llumnix: LlumnixConfig = LlumnixConfig()
    reschedule_period_s: float = 0.5
    # Dispatch reads replica state polled at most this often (Llumnix polls every 50 ms),
    # plus its own placements since; 0 polls on every dispatch.
    dispatch_poll_s: float = 0.05
    sample_period_s: float = 1.0  # load-imbalance samples
    seed: int = 0
