"""The in-process transport: the scheduler core over engines in this process.

``ServingLoop(prefill_engine, decode_engines, tokenizer, cluster)`` wraps each engine in a
local replica handle and runs the one ``ClusterCore``. With one decode engine and the default
``least-load`` policy it is the plain serving loop behind ``LLM``; with several, on their own
meshes, it is the in-process disaggregated cluster (``build_cluster``), whose KV moves between
meshes with ``jax.device_put``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ares_jax.cluster.config import ClusterConfig
from ares_jax.cluster.core import ClusterCore
from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.types import StepOutput
from ares_jax.model.tokenizer import Tokenizer
from ares_jax.replica.handle import ReplicaHandle
from ares_jax.replica.local import LocalDecodeReplica, LocalPrefillReplica
from ares_jax.replica.types import Stepped

# Dispatch by current KV use, no migration: what a single-replica loop needs.
PLAIN = ClusterConfig(policy="least-load")


class ServingLoop(ClusterCore):
    def __init__(self, prefill: PrefillEngine, decoders: Sequence[DecodeEngine],
                 tokenizer: Tokenizer | None, cluster: ClusterConfig = PLAIN) -> None:
        if not decoders:
            raise ValueError("the serving loop needs at least one decode engine")
        self.prefill_engine = prefill
        self.decoders = list(decoders)
        self.prefill_replica = LocalPrefillReplica(prefill, replica_id=len(decoders))
        self.decode_replicas = [LocalDecodeReplica(d, replica_id=i)
                                for i, d in enumerate(decoders)]
        super().__init__([self.prefill_replica], self.decode_replicas, tokenizer,
                         vocab_size=prefill.cfg.vocab_size, cluster=cluster)
        # In-process hooks that see each step's device outputs (hidden states), e.g. the
        # predictor's data collection: (decode engine index, StepOutput).
        self.on_step: list[Callable[[int, StepOutput], None]] = []
        self.on_stepped.append(self._call_step_hooks)

    def _call_step_hooks(self, handle: ReplicaHandle, ev: Stepped) -> None:
        if self.on_step:
            out = handle.last_output  # type: ignore[attr-defined]
            for hook in self.on_step:
                hook(ev.replica_id, out)

    def check_no_leaks(self) -> None:
        """Every page is held by a request that runs (or is migrating) where it is held, and
        every parked prefill block belongs to a request waiting for a decode replica."""
        for rep in self.decode_replicas:
            rid = rep.info.replica_id
            allowed = {r for r, at in self.location.items() if at == rid}
            allowed |= {r for r, m in self.migrations.items() if m.dst == rid}
            stray = set(rep.engine.page_owners()) - allowed
            if stray:
                raise AssertionError(f"replica {rid}: pages held by requests that are not "
                                     f"running there: {sorted(stray)}")
        parked = self.prefill_replica.held_block_ids() - set(self.held) - set(self.inserting)
        if parked:
            raise AssertionError(f"prefill blocks held for finished requests: {sorted(parked)}")
