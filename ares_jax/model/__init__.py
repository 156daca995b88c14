"""Llama-family model: config, weights, sharding, loaders."""

from ares_jax.model.loader import LoadedModel, load_model
from ares_jax.model.model import Config, RopeScaling, Weights, decode_step, forward, prefill
from ares_jax.model.sharding import ShardingRules, make_mesh

__all__ = [
    "Config", "LoadedModel", "RopeScaling", "ShardingRules", "Weights", "decode_step",
    "forward", "load_model", "make_mesh", "prefill",
]
