"""Policies by name."""

from __future__ import annotations

import dataclasses

from ares_jax.scheduler.ares import AresConfig, AresPolicy
from ares_jax.scheduler.cost import StepCostModel, TransferCost
from ares_jax.scheduler.policies import (
    LeastLoadPolicy,
    LlumnixConfig,
    LlumnixPolicy,
    Policy,
    StaticPolicy,
)

POLICY_NAMES: tuple[str, ...] = ("static", "least-load", "llumnix", "ares", "ares-oracle")


def make_policy(
    name: str,
    *,
    cost: StepCostModel,
    transfer: TransferCost,
    ares: AresConfig | None = None,
    llumnix: LlumnixConfig | None = None,
) -> Policy:
    """Build a policy; ``cost`` and ``transfer`` are only read by the ARES policies."""
    ares = ares or AresConfig()
    if name == "static":
        return StaticPolicy()
    if name == "least-load":
        return LeastLoadPolicy()
    if name == "llumnix":
        return LlumnixPolicy(llumnix or LlumnixConfig())
    if name == "ares":
        return AresPolicy(cost=cost, transfer=transfer, config=ares, name="ares")
    if name == "ares-oracle":
        oracle = dataclasses.replace(ares, use_true_remaining=True)
        return AresPolicy(cost=cost, transfer=transfer, config=oracle, name="ares-oracle")
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")
