"""The replica boundary: what the scheduler core may ask of a prefill or decode replica.

``handle.ReplicaHandle`` is the whole interface; ``local`` implements it over engines in this
process, ``ares_jax.serving.remote`` over gRPC to a replica process. Nothing outside an engine
touches its slots, allocator or pool.
"""

from ares_jax.replica.handle import ReplicaHandle
from ares_jax.replica.types import (
    Detached,
    Event,
    ImportDone,
    InsertDone,
    KvBlock,
    Prefilled,
    ReplicaFailed,
    ReplicaInfo,
    Stepped,
)

__all__ = ["Detached", "Event", "ImportDone", "InsertDone", "KvBlock", "Prefilled",
           "ReplicaFailed", "ReplicaHandle", "ReplicaInfo", "Stepped"]
