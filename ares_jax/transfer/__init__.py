"""Moving KV pages: prefill -> decode handoff, decode -> decode live migration, and
cross-process pulls with ``jax.experimental.transfer``."""

from ares_jax.transfer.errors import (
    TransferError,
    TransferShapeMismatch,
    TransferTimeout,
)
from ares_jax.transfer.local import handoff
from ares_jax.transfer.migration import (
    MigrationConfig,
    MigrationManager,
    MigrationOutcome,
    MigrationRecord,
)

__all__ = [
    "MigrationConfig", "MigrationManager", "MigrationOutcome", "MigrationRecord",
    "TransferError", "TransferShapeMismatch", "TransferTimeout", "handoff",
]
