"""The head inside the engine: ``(fused_head_fn, params)`` for ``PrefillEngine``/``DecodeEngine``.

The engines take ``head_fn`` as a *static* jit argument, so there is exactly one module-level
function object; the head's structure (its NNX graphdef) rides in the params pytree as static
metadata and its weights as leaves. A new head of the same shape reuses the compiled step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ares_jax.predictor.checkpoint import load_head, read_meta
from ares_jax.predictor.heads import LengthHead

# The head trained for the embedded SmolLM2-135M-Instruct (see docs/PREDICTOR.md).
DEFAULT_HEAD_DIR = Path(__file__).resolve().parent.parent / "assets" / "length_head"


@dataclasses.dataclass(frozen=True)
class FusedHeadParams:
    graphdef: nnx.GraphDef
    state: nnx.State


jax.tree_util.register_dataclass(FusedHeadParams, data_fields=["state"],
                                 meta_fields=["graphdef"])


def fused_head_fn(params: FusedHeadParams, hidden: jax.Array, hidden_tap: jax.Array,
                  generated: jax.Array, max_tokens: jax.Array) -> jax.Array:
    """The engine hook: [B] predicted remaining tokens, clipped to [0, max_tokens - generated]."""
    head = nnx.merge(params.graphdef, params.state)
    return head.predict(hidden, hidden_tap, generated, max_tokens)


def engine_head(head: LengthHead, mesh: Mesh | None = None):
    """``(fused_head_fn, params)`` for the engines; weights replicated on ``mesh``."""
    graphdef, state = nnx.split(head)
    if mesh is not None:
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    return fused_head_fn, FusedHeadParams(graphdef, state)


def check_compatible(meta: dict, hidden_size: int, n_layers: int | None = None,
                     tap_layer: int | None = None, path: str | Path = "") -> None:
    """Refuse a head trained on another model's hidden states, naming the mismatch."""
    if meta["hidden_size"] != hidden_size:
        raise ValueError(f"predictor head {path} expects hidden size {meta['hidden_size']}, but "
                         f"the model's hidden size is {hidden_size}; train a head for this model "
                         "(ares-jax predictor collect/train) or pass predictor=None")
    data = meta.get("data", {})
    if meta["head"].get("layer") == "tap" and tap_layer is not None and \
            data.get("tap_layer") not in (None, tap_layer):
        raise ValueError(f"predictor head {path} reads layer {data['tap_layer']} but the engine "
                         f"taps layer {tap_layer}; set EngineConfig.tap_layer={data['tap_layer']}")
    if n_layers is not None and data.get("n_layers") not in (None, n_layers):
        raise ValueError(f"predictor head {path} was trained on a {data['n_layers']}-layer model; "
                         f"this model has {n_layers} layers")


def load_engine_head(path: str | Path, hidden_size: int, *, n_layers: int | None = None,
                     tap_layer: int | None = None, mesh: Mesh | None = None):
    """Load a head checkpoint for a model, checking it fits; returns ``(fn, params)``."""
    check_compatible(read_meta(path), hidden_size, n_layers, tap_layer, path)
    return engine_head(load_head(path), mesh)
