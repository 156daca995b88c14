"""Scheduling policies for PD-disaggregated serving, as pure code.

The same objects drive the discrete-event simulator (``ares_jax.sim``) and the live scheduler::

    from ares_jax.scheduler import ClusterSnapshot, PolicyState, make_policy, build_cost_model
    policy = make_policy("ares", cost=build_cost_model("grid", "llama3_8b", "h100_sxm", 1),
                         transfer=TransferCost(kv_bytes_per_token=131072))
    decisions, state = policy.dispatch(snapshot.with_pending(pending), state)
    decisions, state = policy.reschedule(snapshot, state)

See docs/SIMULATOR.md for the load model and the policies.
"""

from ares_jax.scheduler.ares import AresConfig, AresPolicy, estimate_remaining
from ares_jax.scheduler.cost import (
    GPUS,
    MODELS,
    GpuSpec,
    GridStepCost,
    LinearStepCost,
    ModelSpec,
    StepCostModel,
    TransferCost,
    build_cost_model,
    kv_capacity_tokens,
    shared_data_dir,
)
from ares_jax.scheduler.load import LoadForecast, forecast, peak_kv, trajectories
from ares_jax.scheduler.policies import (
    LeastLoadPolicy,
    LlumnixConfig,
    LlumnixPolicy,
    Policy,
    StaticPolicy,
)
from ares_jax.scheduler.registry import POLICY_NAMES, make_policy
from ares_jax.scheduler.state import (
    ClusterSnapshot,
    Decisions,
    Dispatch,
    Migration,
    PendingDispatch,
    PolicyState,
    ReplicaView,
    RequestId,
    RequestTable,
    RequestView,
)

__all__ = [
    "GPUS", "MODELS", "POLICY_NAMES", "AresConfig", "AresPolicy", "ClusterSnapshot",
    "Decisions", "Dispatch", "GpuSpec", "GridStepCost", "LeastLoadPolicy", "LinearStepCost",
    "LlumnixConfig", "LlumnixPolicy", "LoadForecast", "Migration", "ModelSpec",
    "PendingDispatch", "Policy", "PolicyState", "ReplicaView", "RequestId", "RequestTable",
    "RequestView", "StaticPolicy", "StepCostModel", "TransferCost", "build_cost_model",
    "estimate_remaining", "forecast", "kv_capacity_tokens", "make_policy", "peak_kv",
    "shared_data_dir", "trajectories",
]
