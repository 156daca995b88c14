"""In-process PD-disaggregated serving: one prefill mesh, N decode meshes, a policy-driven loop."""

from ares_jax.cluster.build import build_cluster, split_devices
from ares_jax.cluster.config import ClusterConfig
from ares_jax.cluster.live import ClusterLoop

__all__ = ["ClusterConfig", "ClusterLoop", "build_cluster", "split_devices"]
