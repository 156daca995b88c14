"""Replica handles over engines in this process: commands run at once, and their results are
queued for the next ``poll()``; a decode replica's ``advance()`` runs one decode step.

The same classes run inside a replica process (``ares_jax.serving.replica_server``), where a
``KvTransport`` pulls blocks offered by other processes; in the in-process cluster every block
carries its device arrays and moves with ``jax.device_put``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax

from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.kv_pool import OutOfPages, pages_for
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.slots import DecodeLoad, SlotState, SlotTable
from ares_jax.engine.types import Request, StepOutput
from ares_jax.replica.types import (
    Detached,
    Event,
    ImportDone,
    InsertDone,
    KvBlock,
    Prefilled,
    PrefillFailed,
    ReplicaInfo,
    Stepped,
)

# (block) -> [(k, v, pages), ...]: the block's chunks as device arrays in this process.
PullFn = Callable[[KvBlock], list[tuple[jax.Array, jax.Array, int]]]


def pow2_chunks(start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) as (first, count) runs of power-of-two length, largest first
    (257 pages = 256 + 1): exactly the shapes ``export_pages`` buckets to, so no padding
    crosses a link and few shapes are compiled."""
    chunks, pos = [], start
    while pos < end:
        n = 1 << ((end - pos).bit_length() - 1)
        chunks.append((pos, n))
        pos += n
    return chunks


def local_chunks(block: KvBlock) -> list[tuple[jax.Array, jax.Array, int]]:
    if block.arrays is None:
        raise ValueError(f"request {block.request_id}: the KV block from replica "
                         f"{block.source} is in another process and no transport is set")
    return list(block.arrays)


def _block_bytes(chunks: Sequence[tuple[jax.Array, jax.Array, int]]) -> int:
    return int(sum(k.nbytes + v.nbytes for k, v, _ in chunks))


class EventQueue:
    """The events a replica in this process produced since the last ``poll()``; commands a
    replica's role does not take are refused with the role named."""

    info: ReplicaInfo

    def __init__(self) -> None:
        self._events: list[Event] = []

    def poll(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def advance(self) -> None:
        """Nothing runs between commands (prefill runs inside ``prefill()``)."""

    def _unsupported(self, what: str):
        raise TypeError(f"replica {self.info.replica_id} ({self.info.role}) cannot {what}")

    def prefill(self, requests: Sequence[Request]) -> None:
        self._unsupported("prefill")

    def insert(self, request: Request, prefilled: Prefilled) -> None:
        self._unsupported("insert")

    def drop_kv(self, request_id: str) -> None:
        """Only prefill replicas park blocks; nothing to drop."""

    def release(self, request_id: str) -> None:
        self.drop_kv(request_id)


class DecodeSlots(EventQueue):
    """What every decode replica in this process does the same way, whatever computes its
    tokens: bookkeeping on its ``SlotTable`` (an engine's, or a simulated replica's)."""

    slots: SlotTable

    def __init__(self) -> None:
        super().__init__()
        self._detached: dict[str, SlotState] = {}

    def load(self) -> DecodeLoad:
        return self.slots.load()

    def release(self, request_id: str) -> None:
        self._detached.pop(request_id, None)
        self.slots.release(request_id)

    def reserve(self, request_id: str, pages: int) -> bool:
        try:
            self.slots.reserve(request_id, pages)
        except OutOfPages:
            return False
        return True

    def detach(self, request_id: str) -> Detached | None:
        if not self.slots.is_running(request_id):
            return None
        st = self.slots.detach(request_id)
        self._detached[request_id] = st
        return Detached(request_id=request_id, num_cached=st.num_cached,
                        last_token=st.last_token, generated=st.generated,
                        predicted_remaining=st.predicted_remaining)

    def reattach(self, request_id: str) -> None:
        self.slots.reattach(self._detached.pop(request_id))

    def adopt(self, request: Request, state: Detached) -> None:
        self.slots.adopt(request, num_cached=state.num_cached, last_token=state.last_token,
                         generated=state.generated,
                         predicted_remaining=state.predicted_remaining)


class LocalPrefillReplica(EventQueue):
    """A prefill engine; each result's pages stay on its mesh until ``drop_kv``."""

    def __init__(self, engine: PrefillEngine, replica_id: int, **info: object) -> None:
        super().__init__()
        self.engine = engine
        cfg = engine.config
        self.info = ReplicaInfo(replica_id=replica_id, role="prefill", page_size=cfg.page_size,
                                capacity_pages=0, max_num_seqs=0,
                                max_model_len=engine.max_model_len,
                                kv_bytes_per_token=engine.cfg.kv_bytes_per_token,
                                devices=engine.model.mesh.devices.size, **info)  # type: ignore
        self._blocks: dict[str, KvBlock] = {}

    def load(self) -> DecodeLoad:
        return DecodeLoad.idle()

    def held_block_ids(self) -> set[str]:
        return set(self._blocks)

    def prefill(self, requests: Sequence[Request]) -> None:
        started = time.perf_counter()
        try:
            results = self.engine.prefill(requests)
        except Exception as err:  # noqa: BLE001 - reported to the core, which requeues
            self._events.append(PrefillFailed(
                replica_id=self.info.replica_id,
                request_ids=tuple(r.request_id for r in requests),
                error=f"{type(err).__name__}: {err}"))
            return
        elapsed = time.perf_counter() - started
        page = self.info.page_size
        for res in results:
            rid = res.request.request_id
            block = None
            if res.finish_reason is None:
                n = pages_for(res.num_tokens, page)
                block = KvBlock(source=self.info.replica_id, request_id=rid, pages=n,
                                nbytes=n * page * self.info.kv_bytes_per_token,
                                arrays=((res.k, res.v, n),))
                self._blocks[rid] = block
            self._events.append(Prefilled(
                replica_id=self.info.replica_id, request_id=rid, first=res.first,
                num_tokens=res.num_tokens, predicted_remaining=res.predicted_remaining,
                finish_reason=res.finish_reason, stop_reason=res.stop_reason, kv=block,
                elapsed_s=elapsed))

    def drop_kv(self, request_id: str) -> None:
        self._blocks.pop(request_id, None)

    def block(self, request_id: str) -> KvBlock | None:
        return self._blocks.get(request_id)

class LocalDecodeReplica(DecodeSlots):
    """A decode engine behind the replica protocol."""

    def __init__(self, engine: DecodeEngine, replica_id: int, pull: PullFn = local_chunks,
                 **info: object) -> None:
        super().__init__()
        self.engine = engine
        self.slots = engine
        self.pull = pull
        self.info = ReplicaInfo(replica_id=replica_id, role="decode",
                                page_size=engine.page_size, capacity_pages=engine.capacity_pages,
                                max_num_seqs=engine.config.max_num_seqs,
                                max_model_len=engine.max_model_len,
                                kv_bytes_per_token=engine.cfg.kv_bytes_per_token,
                                devices=engine.model.mesh.devices.size, **info)  # type: ignore
        self.last_step_s = 0.0
        self.last_output: StepOutput | None = None  # device outputs, for in-process hooks

    def advance(self) -> None:
        """One decode step of the whole batch, if anything runs here."""
        if self.engine.num_active:
            self._events.append(self.step())

    def step(self) -> Stepped:
        load_kv = int(self.engine.load().kv_tokens.sum())
        started = time.perf_counter()
        out = self.engine.step()
        self.last_step_s = time.perf_counter() - started
        self.last_output = out
        return Stepped(replica_id=self.info.replica_id, request_ids=tuple(out.request_ids),
                       tokens=tuple(out.tokens), finish_reasons=tuple(out.finish_reasons),
                       stop_reasons=tuple(out.stop_reasons),
                       predicted_remaining=out.predicted_remaining,
                       preempted=tuple(out.preempted), elapsed_s=self.last_step_s,
                       kv_tokens=load_kv)

    # prefill -> decode ------------------------------------------------------------------

    def insert(self, request: Request, prefilled: Prefilled) -> None:
        rid = request.request_id
        try:
            if prefilled.kv is None:
                raise ValueError(f"request {rid}: the prefill result carries no KV")
            (k, v, _), *rest = self.pull(prefilled.kv)
            if rest:
                raise ValueError(f"request {rid}: a prefill block must be one chunk")
            self.engine.insert_kv(request, k, v, num_tokens=prefilled.num_tokens,
                                  first_token=prefilled.first.token_id,
                                  predicted_remaining=prefilled.predicted_remaining)
        except Exception as err:  # noqa: BLE001 - reported; the core recomputes the request
            self.engine.release(rid)
            self._events.append(InsertDone(replica_id=self.info.replica_id, request_id=rid,
                                           ok=False, error=f"{type(err).__name__}: {err}"))
            return
        self._events.append(InsertDone(replica_id=self.info.replica_id, request_id=rid, ok=True))

    # migration --------------------------------------------------------------------------

    def export(self, request_id: str, start: int, end: int,
               to: ReplicaInfo | None = None) -> KvBlock:
        chunks = []
        for pos, n in pow2_chunks(start, end):
            k, v = self.engine.export_pages(request_id, pos, pos + n)
            chunks.append((k, v, n))
        return KvBlock(source=self.info.replica_id, request_id=request_id, pages=end - start,
                       nbytes=_block_bytes(chunks), arrays=tuple(chunks))

    def import_kv(self, request_id: str, start: int, block: KvBlock) -> None:
        try:
            pos = start
            for k, v, n in self.pull(block):
                self.engine.import_pages(request_id, pos, k, v, n)
                pos += n
            self.engine.block_until_ready()  # the copy has landed before anyone commits
        except Exception as err:  # noqa: BLE001 - the core abandons the migration
            self._events.append(ImportDone(
                replica_id=self.info.replica_id, request_id=request_id, start=start,
                pages=block.pages, nbytes=0, ok=False, error=f"{type(err).__name__}: {err}"))
            return
        self._events.append(ImportDone(replica_id=self.info.replica_id, request_id=request_id,
                                       start=start, pages=block.pages, nbytes=block.nbytes,
                                       ok=True))
