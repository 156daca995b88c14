"""Carve the local devices into a prefill mesh and decode meshes, and build the engines."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ares_jax.cluster.config import ClusterConfig
from ares_jax.cluster.local import ServingLoop
from ares_jax.engine.decode import DecodeEngine, HeadFn
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.types import EngineConfig
from ares_jax.model.loader import LoadedModel, on_mesh
from ares_jax.model.sharding import make_mesh


def split_devices(cluster: ClusterConfig, devices: Sequence[jax.Device] | None = None
                  ) -> tuple[list[jax.Device], list[list[jax.Device]]]:
    """(prefill devices, [decode devices per replica]); disjoint, in device order."""
    devs = list(jax.devices() if devices is None else devices)
    need = cluster.prefill_devices + cluster.decode_replicas * cluster.devices_per_replica
    if need > len(devs):
        raise ValueError(
            f"the cluster needs {need} devices ({cluster.prefill_devices} prefill + "
            f"{cluster.decode_replicas} x {cluster.devices_per_replica} decode) but "
            f"{len(devs)} are available; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={need} before JAX starts")
    prefill = devs[: cluster.prefill_devices]
    rest = devs[cluster.prefill_devices:]
    k = cluster.devices_per_replica
    return prefill, [rest[i * k:(i + 1) * k] for i in range(cluster.decode_replicas)]


def build_cluster(model: LoadedModel, cluster: ClusterConfig, engine: EngineConfig,
                  head: tuple[HeadFn, object] | None = None,
                  prefill_head: tuple[HeadFn, object] | None = None) -> ServingLoop:
    """Place the model on every mesh (device to device) and wire the policy-driven loop."""
    prefill_devs, decode_devs = split_devices(cluster)
    prefill_mesh = make_mesh(prefill_devs)
    kwargs = {} if prefill_head is None else {"head": _head_on(prefill_head, prefill_mesh)}
    prefill = PrefillEngine(on_mesh(model, prefill_mesh), engine, **kwargs)
    decoders = []
    for devs in decode_devs:
        mesh = make_mesh(devs)
        decoders.append(DecodeEngine(on_mesh(model, mesh), engine, head=_head_on(head, mesh)))
    return ServingLoop(prefill, decoders, model.tokenizer, cluster)


def _head_on(head: tuple[HeadFn, object] | None, mesh: Mesh) -> tuple[HeadFn, object] | None:
    """The predictor head's parameters replicated onto ``mesh`` (jit needs them co-located)."""
    if head is None:
        return None
    fn, params = head
    return fn, jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
