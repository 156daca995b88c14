"""Device meshes and the mapping from logical axes to mesh axes.

Tensor parallelism runs over heads, KV heads, FFN and vocab on the ``model`` mesh axis; the batch
runs over ``data``. A logical axis whose size does not divide the mesh axis is replicated rather
than refused (SmolLM2's 9 heads / 3 KV heads on a 4-way ``model`` axis, say): correctness first,
and the FFN and vocab still shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ares_jax.config import config
from ares_jax.model.model import (
    Config,
    LayerWeights,
    Weights,
    is_shape_leaf,
    weight_axes,
    weight_shapes,
)


@config
class ShardingRules:
    """Logical axis -> mesh axis (or None for replicated)."""

    batch: str | None = "data"
    heads: str | None = "model"
    kv_heads: str | None = "model"
    ffn: str | None = "model"
    vocab: str | None = "model"
    embed: str | None = None
    head_dim: str | None = None
    layers: str | None = None
    pages: str | None = None
    page_slot: str | None = None
    seq: str | None = None

    def mesh_axis(self, logical: str | None) -> str | None:
        return None if logical is None else getattr(self, logical)


DEFAULT_RULES = ShardingRules()
KV_POOL_AXES = ("layers", "pages", "page_slot", "kv_heads", "head_dim")


def make_mesh(
    devices: Sequence[jax.Device] | None = None, *, data: int = 1, model: int | None = None
) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: all local devices, all on ``model``)."""
    devs = list(jax.devices() if devices is None else devices)
    if model is None:
        model = len(devs) // data
    if data * model != len(devs):
        raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices, "
                         f"got {len(devs)}")
    return Mesh(np.array(devs).reshape(data, model), ("data", "model"))


def logical_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: ShardingRules
) -> PartitionSpec:
    """PartitionSpec for an array, replicating any axis its mesh axis does not divide."""
    out: list[str | None] = []
    used: set[str] = set()
    for logical, size in zip(axes, shape, strict=True):
        mesh_axis = rules.mesh_axis(logical)
        if mesh_axis is None or mesh_axis in used or mesh_axis not in mesh.shape:
            out.append(None)
            continue
        if size % mesh.shape[mesh_axis]:
            out.append(None)
            continue
        used.add(mesh_axis)
        out.append(mesh_axis)
    return PartitionSpec(*out)


def named(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int],
          rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, shape, mesh, rules))


def weight_shardings(cfg: Config, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Weights:
    """A ``Weights``-shaped pytree of NamedShardings (None for absent weights)."""
    axes, shapes = weight_axes(cfg), weight_shapes(cfg)
    return jax.tree.map(
        lambda a, s: named(mesh, a, s, rules), axes, shapes, is_leaf=is_shape_leaf
    )


def kv_pool_sharding(shape: Sequence[int], mesh: Mesh,
                     rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    return named(mesh, KV_POOL_AXES, shape, rules)


def place(host: np.ndarray | Callable[[Any], np.ndarray], shape: Sequence[int], dtype: Any,
          sharding: NamedSharding) -> jax.Array:
    """Build a global array where each device receives only its own shard.

    ``host`` is a full host array or a callable returning the block for an index tuple, so a
    loader can read shards lazily instead of copying the whole tensor to every device.
    """
    def block(index: Any) -> np.ndarray:
        part = host(index) if callable(host) else host[index]
        return np.asarray(part, dtype=dtype)

    return jax.make_array_from_callback(tuple(shape), sharding, block)


def place_weights(host_weights: Weights, cfg: Config, mesh: Mesh,
                  rules: ShardingRules = DEFAULT_RULES) -> Weights:
    """Host (numpy) weights -> device arrays in their target shardings and ``cfg`` dtype."""
    shardings = weight_shardings(cfg, mesh, rules)
    dtype = cfg.jnp_dtype
    expected = weight_shapes(cfg)

    def put(x: np.ndarray | None, s: NamedSharding | None, want: tuple | None, path: str):
        if x is None:
            return None
        if tuple(x.shape) != tuple(want):
            raise ValueError(f"weight {path}: shape {tuple(x.shape)} does not match config "
                             f"{tuple(want)}")
        return place(x, x.shape, dtype, s)

    flat_w = _flatten_with_names(host_weights)
    flat_s = _flatten_with_names(shardings)
    flat_e = _flatten_with_names(expected)
    placed = {k: put(flat_w[k], flat_s[k], flat_e[k], k) for k in flat_w}
    return _unflatten_names(placed)


def _flatten_with_names(w: Weights) -> dict[str, Any]:
    out = {f"{f.name}": getattr(w, f.name) for f in dataclasses.fields(w) if f.name != "layers"}
    out.update({f"layers.{f.name}": getattr(w.layers, f.name)
                for f in dataclasses.fields(w.layers)})
    return out


def _unflatten_names(flat: dict[str, Any]) -> Weights:
    layer = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("layers.")}
    top = {k: v for k, v in flat.items() if not k.startswith("layers.")}
    return Weights(layers=LayerWeights(**layer), **top)
