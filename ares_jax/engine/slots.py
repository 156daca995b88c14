"""The host side of a decode replica: its running requests, their pages, preemption and the
token-level stop checks. No device arrays here.

``DecodeEngine`` is this table plus a KV pool and a jitted step; the simulated replica
(``replica/simulated.py``) is this table plus scripted tokens. Both therefore account pages,
choose preemption victims and stop requests identically, which is what lets a scripted
scenario produce the same scheduling decisions on either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ares_jax.engine.kv_pool import OutOfPages, PageAllocator
from ares_jax.engine.stops import token_stop
from ares_jax.engine.types import Request
from ares_jax.paging import pages_for


@dataclasses.dataclass
class SlotState:
    request: Request
    num_cached: int  # tokens whose K/V are in the pool
    last_token: int  # the next token to feed; its K/V is written by the next step
    generated: int  # tokens generated so far, the first (from prefill) included
    order: int  # insertion order: the newest is preempted first
    predicted_remaining: float = float("nan")  # the length head's latest output


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeLoad:
    """One replica's load, columnar (one entry per running request, in slot order)."""

    free_pages: int
    used_pages: int
    capacity_pages: int
    reserved_pages: int  # held for requests that are not running here (incoming migrations)
    free_slots: int
    request_ids: tuple[str, ...]
    kv_tokens: np.ndarray  # int64
    generated: np.ndarray  # int64
    max_tokens: np.ndarray  # int64
    predicted_remaining: np.ndarray  # float64, NaN before the first prediction

    @staticmethod
    def idle(*, capacity_pages: int = 0, free_pages: int = 0, free_slots: int = 0) -> DecodeLoad:
        """A load with nothing running: a prefill replica's, a decode replica's before its first
        report, or a failed one's (no free pages, no slots)."""
        z = np.zeros(0, np.int64)
        return DecodeLoad(free_pages=free_pages, used_pages=capacity_pages - free_pages,
                          capacity_pages=capacity_pages, reserved_pages=0, free_slots=free_slots,
                          request_ids=(), kv_tokens=z, generated=z, max_tokens=z,
                          predicted_remaining=z.astype(np.float64))


class SlotTable:
    def __init__(self, *, num_pages: int, page_size: int, max_num_seqs: int,
                 max_model_len: int, eos_token_ids: Sequence[int]) -> None:
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self._allocator = PageAllocator(num_pages)
        self._slots: dict[str, SlotState] = {}
        self._order = 0
        self._eos = frozenset(eos_token_ids)
        self._load: DecodeLoad | None = None  # cached until the next change

    # ------------------------------------------------------------------ queries

    @property
    def num_active(self) -> int:
        return len(self._slots)

    @property
    def num_free_pages(self) -> int:
        return self._allocator.num_free

    @property
    def num_used_pages(self) -> int:
        return self._allocator.num_used

    @property
    def capacity_pages(self) -> int:
        return self._allocator.capacity

    def free_slots(self) -> int:
        return self.max_num_seqs - len(self._slots)

    def is_running(self, request_id: str) -> bool:
        return request_id in self._slots

    def running_ids(self) -> list[str]:
        return list(self._slots)

    def pages_held(self, request_id: str) -> int:
        """Pages allocated to ``request_id`` (running, detached or reserved)."""
        return len(self._allocator.pages(request_id))

    def page_owners(self) -> list[str]:
        return self._allocator.owners()

    def num_cached(self, request_id: str) -> int:
        return self._slots[request_id].num_cached

    def can_admit(self, num_tokens: int) -> bool:
        """A slot is free and the pool has the pages for ``num_tokens`` plus the next token."""
        return self.free_slots() > 0 and \
            pages_for(num_tokens + 1, self.page_size) <= self._allocator.num_free

    def load(self) -> DecodeLoad:
        """The running requests as columns plus page counts: what a scheduler snapshot needs
        (cached: the scheduler asks several times between two changes)."""
        if self._load is None:
            self._load = self._make_load()
        return self._load

    def _changed(self) -> None:
        self._load = None

    def _make_load(self) -> DecodeLoad:
        states = list(self._slots.values())
        n = len(states)
        running_pages = sum(len(self._allocator.pages(r)) for r in self._slots)
        return DecodeLoad(
            free_pages=self._allocator.num_free, used_pages=self._allocator.num_used,
            capacity_pages=self._allocator.capacity,
            reserved_pages=self._allocator.num_used - running_pages,
            free_slots=self.free_slots(), request_ids=tuple(self._slots),
            kv_tokens=np.fromiter((s.num_cached for s in states), np.int64, n),
            generated=np.fromiter((s.generated for s in states), np.int64, n),
            max_tokens=np.fromiter((s.request.params.max_tokens for s in states), np.int64, n),
            predicted_remaining=np.fromiter((s.predicted_remaining for s in states),
                                            np.float64, n))

    # ------------------------------------------------------------------ requests in and out

    def admit(self, request: Request, *, num_tokens: int, first_token: int,
              predicted_remaining: float | None = None) -> list[int]:
        """Take a prefilled request of ``num_tokens`` KV tokens; returns the pages allocated
        for them (the caller writes the KV there, or releases the request on failure)."""
        rid = request.request_id
        if rid in self._slots:
            raise ValueError(f"request {rid} is already running on this replica")
        if self.free_slots() <= 0:
            raise OutOfPages(f"request {rid}: no free decode slot ({self.max_num_seqs})")
        pages = self._allocator.allocate(rid, pages_for(num_tokens, self.page_size))
        self._changed()
        self._add_slot(request, num_cached=num_tokens, last_token=first_token,
                       generated=len(request.resumed_ids) + 1)
        if predicted_remaining is not None:
            self._slots[rid].predicted_remaining = float(predicted_remaining)
        return pages

    def _add_slot(self, request: Request, *, num_cached: int, last_token: int,
                  generated: int) -> None:
        self._changed()
        self._order += 1
        self._slots[request.request_id] = SlotState(request, num_cached, last_token, generated,
                                                    self._order)

    def release(self, request_id: str) -> int:
        """Drop a request (finished, cancelled, failed, or reserved for a migration that was
        abandoned) and free its pages. Idempotent; returns the pages freed."""
        self._changed()
        self._slots.pop(request_id, None)
        return self._allocator.free(request_id)

    # ------------------------------------------------------------------ migration

    def reserve(self, request_id: str, num_pages: int) -> list[int]:
        """Pre-allocate pages for an incoming request (migration destination); raises
        ``OutOfPages`` when the pool cannot supply them."""
        if request_id in self._slots:
            raise ValueError(f"request {request_id} is already running on this replica")
        self._changed()
        return self._allocator.allocate(request_id, num_pages)

    def adopt(self, request: Request, *, num_cached: int, last_token: int, generated: int,
              predicted_remaining: float = float("nan")) -> None:
        """Start decoding a request whose pages were imported (migration commit)."""
        rid = request.request_id
        need = pages_for(num_cached, self.page_size)
        if len(self._allocator.pages(rid)) < need:
            raise ValueError(f"request {rid}: {need} pages needed to adopt it")
        if rid in self._slots:
            raise ValueError(f"request {rid} is already running on this replica")
        if self.free_slots() <= 0:
            raise OutOfPages(f"request {rid}: no free decode slot")
        self._add_slot(request, num_cached=num_cached, last_token=last_token,
                       generated=generated)
        self._slots[rid].predicted_remaining = predicted_remaining

    def detach(self, request_id: str) -> SlotState:
        """Stop decoding a request but keep its pages (the stop-and-copy stage of a migration:
        its last pages are exported next). ``reattach`` undoes it; ``release`` ends it."""
        self._changed()
        return self._slots.pop(request_id)

    def reattach(self, state: SlotState) -> None:
        """Resume decoding a detached request exactly where it stopped."""
        if len(self._allocator.pages(state.request.request_id)) < \
                pages_for(state.num_cached, self.page_size):
            raise ValueError(f"request {state.request.request_id}: its pages were freed")
        self._changed()
        self._slots[state.request.request_id] = state

    # ------------------------------------------------------------------ a step

    def ensure_pages(self) -> list[str]:
        """Give every request a page for its next token, preempting the newest on shortage;
        returns the preempted (released) requests."""
        self._changed()
        preempted: list[str] = []
        slots, alloc = self._slots, self._allocator
        for rid in sorted(slots, key=lambda r: slots[r].order):
            if rid not in slots:
                continue
            st = slots[rid]
            while len(alloc.pages(rid)) < pages_for(st.num_cached + 1, self.page_size):
                try:
                    alloc.allocate(rid, 1)
                except OutOfPages:
                    victim = max(slots, key=lambda r: slots[r].order)
                    self.release(victim)
                    preempted.append(victim)
                    if victim == rid:
                        break
        return preempted

    def advance_slots(self, ids: Sequence[str], tokens: Sequence[int],
                      predicted: np.ndarray | None) -> tuple[list[str | None], list[int | None]]:
        """Record one step's tokens (row order = ``ids``); requests that stop are released.
        Returns each row's (finish_reason, stop_reason)."""
        self._changed()
        finish: list[str | None] = []
        stop: list[int | None] = []
        for row, (rid, token) in enumerate(zip(ids, tokens)):
            st = self._slots[rid]
            st.num_cached += 1
            st.last_token = token
            st.generated += 1
            if predicted is not None:
                st.predicted_remaining = float(predicted[row])
            reason, stop_reason = token_stop(token, st.generated, len(st.request.prompt_ids),
                                             st.request.params, self._eos, self.max_model_len)
            finish.append(reason)
            stop.append(stop_reason)
            if reason is not None:
                self.release(rid)
        return finish, stop
