"""Moving KV pages: between meshes of one process (``jax.device_put``) and across processes
(``jax.experimental.transfer``). The migration protocol that uses them is in
``ares_jax/cluster/migration.py``."""

from ares_jax.transfer.errors import (
    TransferError,
    TransferShapeMismatch,
    TransferTimeout,
)
from ares_jax.transfer.local import handoff

__all__ = ["TransferError", "TransferShapeMismatch", "TransferTimeout", "handoff"]
