"""Simulated replicas: the replica protocol with no model behind it.

A simulated decode replica is the same ``SlotTable`` a ``DecodeEngine`` keeps (pages,
preemption, stop checks) with scripted tokens and predictions instead of a forward pass; a
simulated prefill replica answers at once. Driving ``ClusterCore`` with them runs the live
scheduler's exact code (dispatch, hold and fallback, migration stages) on virtual replicas:
the third transport, used to check that the scheduler decides the same whatever runs the model
(``tests/test_core_transports.py``) and to measure orchestration without a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ares_jax.engine.kv_pool import OutOfPages
from ares_jax.engine.sampling import TokenInfo
from ares_jax.engine.slots import DecodeLoad, SlotTable
from ares_jax.engine.stops import token_stop
from ares_jax.engine.types import Request
from ares_jax.paging import pages_for
from ares_jax.replica.local import DecodeSlots, EventQueue
from ares_jax.replica.types import (
    ImportDone,
    InsertDone,
    KvBlock,
    Prefilled,
    ReplicaInfo,
    Stepped,
)

# (request id, tokens generated so far) -> the next token.
TokenFn = Callable[[str, int], int]
# (tokens generated before this pass [B], max_tokens [B]) -> predicted remaining [B]; the same
# inputs an engine's fused length head receives.
PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
# (batch size, KV tokens in the batch) -> seconds the step takes.
StepTimeFn = Callable[[int, int], float]


def _token(rid: str, generated: int) -> int:
    return 4 + (hash((rid, generated)) % 100)


class SimulatedPrefillReplica(EventQueue):
    def __init__(self, replica_id: int, *, page_size: int, max_model_len: int,
                 kv_bytes_per_token: int, eos_token_ids: Sequence[int] = (),
                 token: TokenFn = _token, predict: PredictFn | None = None) -> None:
        super().__init__()
        self.info = ReplicaInfo(replica_id=replica_id, role="prefill", page_size=page_size,
                                capacity_pages=0, max_num_seqs=0, max_model_len=max_model_len,
                                kv_bytes_per_token=kv_bytes_per_token, process="simulated")
        self.token, self.predict = token, predict
        self._eos = frozenset(eos_token_ids)
        self._blocks: set[str] = set()

    def load(self) -> DecodeLoad:
        return DecodeLoad.idle()

    def prefill(self, requests: Sequence[Request]) -> None:
        page = self.info.page_size
        for r in requests:
            n = len(r.context_ids)
            first = TokenInfo(self.token(r.request_id, len(r.resumed_ids)))
            finish, stop = token_stop(first.token_id, len(r.resumed_ids) + 1, len(r.prompt_ids),
                                      r.params, self._eos, self.info.max_model_len)
            pred = None
            if self.predict is not None:
                pred = float(self.predict(np.array([len(r.resumed_ids)]),
                                          np.array([r.params.max_tokens]))[0])
            block = None
            if finish is None:
                pages = pages_for(n, page)
                block = KvBlock(source=self.info.replica_id, request_id=r.request_id,
                                pages=pages, nbytes=pages * page * self.info.kv_bytes_per_token)
                self._blocks.add(r.request_id)
            self._events.append(Prefilled(
                replica_id=self.info.replica_id, request_id=r.request_id, first=first,
                num_tokens=n, predicted_remaining=pred, finish_reason=finish, stop_reason=stop,
                kv=block))

    def drop_kv(self, request_id: str) -> None:
        self._blocks.discard(request_id)

    def held_block_ids(self) -> set[str]:
        return set(self._blocks)


class SimulatedDecodeReplica(DecodeSlots):
    def __init__(self, replica_id: int, *, num_pages: int, page_size: int, max_num_seqs: int,
                 max_model_len: int, kv_bytes_per_token: int,
                 eos_token_ids: Sequence[int] = (), token: TokenFn = _token,
                 predict: PredictFn | None = None,
                 step_time: StepTimeFn = lambda b, kv: 0.0) -> None:
        super().__init__()
        self.table = SlotTable(num_pages=num_pages, page_size=page_size,
                               max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                               eos_token_ids=eos_token_ids)
        self.info = ReplicaInfo(replica_id=replica_id, role="decode", page_size=page_size,
                                capacity_pages=self.table.capacity_pages,
                                max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                kv_bytes_per_token=kv_bytes_per_token, process="simulated")
        self.slots = self.table
        self.token, self.predict, self.step_time = token, predict, step_time

    def advance(self) -> None:
        t = self.table
        if not t.num_active:
            return
        preempted = t.ensure_pages()
        ld = t.load()
        ids = list(ld.request_ids)
        if not ids:
            self._events.append(Stepped(
                replica_id=self.info.replica_id, request_ids=(), tokens=(), finish_reasons=(),
                stop_reasons=(), predicted_remaining=None, preempted=tuple(preempted),
                elapsed_s=0.0, kv_tokens=0))
            return
        tokens = [self.token(rid, int(g)) for rid, g in zip(ids, ld.generated)]
        pred = None if self.predict is None else \
            np.asarray(self.predict(ld.generated, ld.max_tokens), np.float64)
        finish, stop = t.advance_slots(ids, tokens, pred)
        kv = int(ld.kv_tokens.sum())
        self._events.append(Stepped(
            replica_id=self.info.replica_id, request_ids=tuple(ids),
            tokens=tuple(TokenInfo(x) for x in tokens), finish_reasons=tuple(finish),
            stop_reasons=tuple(stop), predicted_remaining=pred, preempted=tuple(preempted),
            elapsed_s=self.step_time(len(ids), kv), kv_tokens=kv))

    def insert(self, request: Request, prefilled: Prefilled) -> None:
        rid = request.request_id
        try:
            self.table.admit(request, num_tokens=prefilled.num_tokens,
                             first_token=prefilled.first.token_id,
                             predicted_remaining=prefilled.predicted_remaining)
        except (OutOfPages, ValueError) as err:
            self._events.append(InsertDone(replica_id=self.info.replica_id, request_id=rid,
                                           ok=False, error=f"{type(err).__name__}: {err}"))
            return
        self._events.append(InsertDone(replica_id=self.info.replica_id, request_id=rid, ok=True))

    def export(self, request_id: str, start: int, end: int,
               to: ReplicaInfo | None = None) -> KvBlock:
        n = end - start
        return KvBlock(source=self.info.replica_id, request_id=request_id, pages=n,
                       nbytes=n * self.info.page_size * self.info.kv_bytes_per_token,
                       start=start)

    def import_kv(self, request_id: str, start: int, block: KvBlock) -> None:
        ok = start + block.pages <= self.table.pages_held(request_id)
        self._events.append(ImportDone(
            replica_id=self.info.replica_id, request_id=request_id, start=start,
            pages=block.pages, nbytes=block.nbytes if ok else 0, ok=ok,
            error="" if ok else "IndexError: importing past the reserved pages"))
