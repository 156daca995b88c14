"""The serving loop: queue -> admission -> prefill -> insert -> decode steps -> outputs.

"Queues all the way down", after JetStream: requests wait in FIFO order until a decode engine
has a slot and pages for them, are prefilled in bucketed batches, inserted, and decoded together
until each one stops. A request evicted to free pages (preemption) goes back to the front of the
queue and is recomputed from its prompt plus the tokens it already produced, so nothing is lost.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence

from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.outputs import RequestTracker, StreamChunk
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.types import PrefillResult, Request, StepOutput
from ares_jax.model.tokenizer import Tokenizer

# (prefill result, decode engines) -> index of the engine that takes it, or None to wait.
DispatchFn = Callable[[PrefillResult, Sequence[DecodeEngine]], int | None]


def least_loaded(result: PrefillResult, engines: Sequence[DecodeEngine]) -> int | None:
    fits = [i for i, e in enumerate(engines) if e.can_admit(result.num_tokens)]
    return min(fits, key=lambda i: engines[i].allocator.num_used) if fits else None


class ServingLoop:
    def __init__(self, prefill: PrefillEngine, decoders: Sequence[DecodeEngine],
                 tokenizer: Tokenizer | None, dispatch: DispatchFn = least_loaded) -> None:
        if not decoders:
            raise ValueError("the serving loop needs at least one decode engine")
        self.prefill_engine = prefill
        self.decoders = list(decoders)
        self.tokenizer = tokenizer
        self.dispatch = dispatch
        self.max_model_len = min(d.max_model_len for d in self.decoders)
        self.waiting: collections.deque[Request] = collections.deque()
        self.trackers: dict[str, RequestTracker] = {}
        self.finished: dict[str, RequestTracker] = {}
        self.location: dict[str, int] = {}  # request id -> decode engine index
        self.on_step: list[Callable[[int, StepOutput], None]] = []
        # Time each decode engine spent stepping: its own clock, as if it ran on its own host.
        self.step_seconds = [0.0] * len(self.decoders)
        self.last_step_seconds = [0.0] * len(self.decoders)

    # ------------------------------------------------------------------ intake

    def add_request(self, request: Request, prompt_text: str | None = None) -> None:
        """Validate and queue a request; raises ValueError (naming the problem) if it can
        never be served."""
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError(f"request {request.request_id}: the prompt is empty")
        if request.request_id in self.trackers:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        vocab = self.prefill_engine.cfg.vocab_size
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request.request_id}: prompt token ids {bad[:5]} are "
                             f"outside the vocabulary [0, {vocab})")
        request.params.validate_for_vocab(vocab)
        if n >= self.max_model_len:
            raise ValueError(f"request {request.request_id}: the prompt has {n} tokens; this "
                             f"server's max_model_len is {self.max_model_len}")
        total = n + request.params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"request {request.request_id}: prompt ({n}) + max_tokens "
                             f"({request.params.max_tokens}) = {total} tokens exceeds "
                             f"max_model_len {self.max_model_len}")
        for d in self.decoders:
            d.check_fits(total)
        eos = self.prefill_engine.cfg.eos_token_ids
        self.trackers[request.request_id] = RequestTracker(
            request, self.tokenizer, eos, self.max_model_len, prompt_text)
        self.waiting.append(request)

    def abort(self, request_id: str) -> None:
        """Cancel a request wherever it is; its pages are freed."""
        tracker = self.trackers.get(request_id)
        if tracker is None or tracker.finish_reason is not None:
            return
        self.waiting = collections.deque(r for r in self.waiting if r.request_id != request_id)
        self._retire(request_id, abort=True)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(d.num_active for d in self.decoders)

    # ------------------------------------------------------------------ one iteration

    def step(self) -> list[StreamChunk]:
        """Admit and prefill what fits, then run one decode step on every busy engine."""
        events: list[StreamChunk] = []
        self._admit(events)
        for idx, engine in enumerate(self.decoders):
            if engine.num_active == 0:
                continue
            started = time.perf_counter()
            out = engine.step()
            self.last_step_seconds[idx] = time.perf_counter() - started
            self.step_seconds[idx] += self.last_step_seconds[idx]
            for rid in out.preempted:
                self._requeue(rid)
            for row, (rid, info) in enumerate(zip(out.request_ids, out.tokens)):
                tracker = self.trackers[rid]
                if out.predicted_remaining is not None:
                    tracker.predict(out.predicted_remaining[row])
                done = tracker.add(info)
                events.append(tracker.chunk(info))
                if done:
                    self._retire(rid)
            for hook in self.on_step:
                hook(idx, out)
        return events

    def _admit(self, events: list[StreamChunk]) -> None:
        batch: list[Request] = []
        budget = {i: (d.free_slots(), d.allocator.num_free) for i, d in enumerate(self.decoders)}
        while self.waiting:
            r = self.waiting[0]
            need = -(-(len(r.context_ids) + 1) // self.decoders[0].page_size)
            if not any(s > 0 and p >= need for s, p in budget.values()):
                break
            i = max(budget, key=lambda k: (budget[k][0] > 0 and budget[k][1] >= need,
                                           budget[k][1]))
            budget[i] = (budget[i][0] - 1, budget[i][1] - need)
            batch.append(self.waiting.popleft())
        if not batch:
            return
        started = time.perf_counter()
        for r in batch:
            metrics = self.trackers[r.request_id].metrics
            if metrics.scheduled_time is None:
                metrics.scheduled_time = started
        results = self.prefill_engine.prefill(batch)
        now = time.perf_counter()
        for res in results:
            rid = res.request.request_id
            tracker = self.trackers[rid]
            if res.predicted_remaining is not None:
                tracker.predict(res.predicted_remaining)
            done = tracker.add(res.first, now)
            events.append(tracker.chunk(res.first))
            if done:
                self._retire(rid)
                continue
            target = self.dispatch(res, self.decoders)
            if target is None:  # raced out of room: recompute later rather than drop
                self._requeue_after_prefill(res)
                continue
            self.decoders[target].insert(res)
            self.location[rid] = target

    def _requeue(self, rid: str) -> None:
        tracker = self.trackers[rid]
        tracker.metrics.num_preemptions += 1
        self.location.pop(rid, None)
        req = tracker.request
        req.resumed_ids = list(tracker.token_ids)
        self.waiting.appendleft(req)

    def _requeue_after_prefill(self, res: PrefillResult) -> None:
        tracker = self.trackers[res.request.request_id]
        res.request.resumed_ids = list(tracker.token_ids)
        self.waiting.appendleft(res.request)

    def _retire(self, rid: str, abort: bool = False) -> None:
        tracker = self.trackers[rid]
        if abort:
            tracker.abort()
        idx = self.location.pop(rid, None)
        if idx is not None:
            self.decoders[idx].release(rid)
        self.finished[rid] = self.trackers.pop(rid)

    def check_no_leaks(self) -> None:
        """Every page not held by a running request is free (used by tests and at shutdown)."""
        for d in self.decoders:
            owners = set(d.allocator.owners())
            running = set(d.slots)
            if owners - running:
                raise AssertionError(f"pages held by finished requests: {owners - running}")
