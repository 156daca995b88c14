"""Settings of the scheduler core: policies, rescheduling, migration, the step-cost model, and
the in-process cluster's device split."""

from __future__ import annotations

from ares_jax.cluster.migration import MigrationConfig
from ares_jax.config import config
from ares_jax.scheduler.ares import AresConfig


@config
class ClusterConfig:
    prefill_devices: int = 2
    decode_replicas: int = 3
    devices_per_replica: int = 2
    policy: str = "ares"  # static | least-load | llumnix | ares
    # Dispatch by another policy than the one that reschedules (None: the same). ARES's own
    # setting is e.g. static PD dispatch with ARES decode-phase rescheduling.
    dispatch_policy: str | None = None
    # Reschedule (ask the policy for migrations) every this many loop iterations.
    reschedule_every: int = 4
    migration: MigrationConfig = MigrationConfig()
    ares: AresConfig = AresConfig(cooldown_s=2.0, horizon_steps=512)
    # Starting CPU step-cost fit, ms = a + b*batch + c*kv_tokens (SmolLM2-135M, f32, 2 cores);
    # refitted online from the replicas' own step times once enough steps are seen.
    step_cost_abc: tuple[float, float, float] = (14.0, 1.4, 0.0004)
    refit_after_steps: int = 24
    # Modelled link for the transfer-cost gate (in-process copies are device to device).
    link_gbytes_per_s: float = 10.0
