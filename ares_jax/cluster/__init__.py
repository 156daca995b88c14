"""The scheduler side: one transport-agnostic core (``core.py``) that owns requests, queues,
policy state and migrations, the migration state machine, and the in-process transport."""

from ares_jax.cluster.build import build_cluster, split_devices
from ares_jax.cluster.config import ClusterConfig
from ares_jax.cluster.core import ClusterCore
from ares_jax.cluster.local import ServingLoop
from ares_jax.cluster.migration import MigrationConfig, MigrationOutcome, MigrationRecord

__all__ = ["ClusterConfig", "ClusterCore", "MigrationConfig", "MigrationOutcome",
           "MigrationRecord", "ServingLoop", "build_cluster", "split_devices"]
