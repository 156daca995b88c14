"""Discrete-event simulator of a prefill/decode-disaggregated cluster.

Life of a request: arrival -> FIFO queue of the least-loaded prefill replica -> prefill (batched
up to a token budget; time from the cost model; the first token is emitted here) -> the policy
dispatches it to a decode replica -> it waits in that replica's admission queue until its pages
can be allocated (vLLM-style watermark) -> its KV crosses the link (bytes / bandwidth) -> it
joins the decode batch at the next step boundary -> one token per step until its output length.

Decode: each replica steps its whole running batch together; a step's time is the cost model of
(batch size, total KV tokens). Before a step the pages for the tokens it writes are allocated; if
the pool cannot supply them the replica records an OOM event and preempts the most recently
arrived running request (recompute: it keeps its generated tokens and recomputes its KV, either
on a prefill replica, from the front of a prefill queue, then dispatched again; or, with
``cluster.preemption = "local"``, on the same decode replica from the front of its queue, the
recompute stalling the step it joins in). Memory is never over-committed.

Migration (Llumnix's staged protocol) lives in ``migration.py``; the snapshots policies read,
the load timeline and the result in ``observe.py``.

Events are kept in a heap; arrivals are merged from the sorted workload. Policies are called on
every prefill completion (dispatch) and every ``reschedule_period_s`` (migration).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math
import time

import numpy as np

from ares_jax.cluster.migration import MigrationOutcome, MigrationRecord, StartLimiter
from ares_jax.paging import pages_for
from ares_jax.scheduler.cost import (
    GPUS,
    MODELS,
    StepCostModel,
    TransferCost,
    build_cost_model,
    kv_capacity_tokens,
)
from ares_jax.scheduler.policies import Policy
from ares_jax.scheduler.registry import make_policy
from ares_jax.scheduler.state import ClusterSnapshot, PendingDispatch, PolicyState
from ares_jax.sim.config import SimConfig
from ares_jax.sim.migration import (
    FINAL_DONE,
    PREFILL_DONE,
    RESCHEDULE,
    SAMPLE,
    STAGE_DONE,
    STEP_DONE,
    TRANSFER_DONE,
    MigrationMixin,
)
from ares_jax.sim.observe import ObserverMixin, SimResult
from ares_jax.sim.predictions import ErrorModel
from ares_jax.sim.replica import DecodeReplica, PrefillReplica, StepTimer
from ares_jax.sim.workloads import Workload


def cluster_transfer(cfg: SimConfig) -> TransferCost:
    """The prefill->decode link."""
    c = cfg.cluster
    return TransferCost(
        kv_bytes_per_token=MODELS[c.model].kv_bytes_per_token,
        link_gbytes_per_s=c.link_gbytes_per_s,
        stall_ms=c.migration_stall_ms,
    )


def migration_transfer(cfg: SimConfig) -> TransferCost:
    """The decode->decode link and what a copy costs the two replicas (what policies see)."""
    c = cfg.cluster
    return TransferCost(
        kv_bytes_per_token=MODELS[c.model].kv_bytes_per_token,
        link_gbytes_per_s=c.migration_link_gbytes_per_s or c.link_gbytes_per_s,
        stall_ms=c.migration_stall_ms,
        copy_slowdown=c.migration_slowdown,
    )


class Simulator(MigrationMixin, ObserverMixin):
    def __init__(
        self,
        workload: Workload,
        policy: Policy,
        cfg: SimConfig,
        *,
        cost: StepCostModel | None = None,
    ) -> None:
        c = cfg.cluster
        self.cfg, self.policy, self.workload = cfg, policy, workload
        model = MODELS[c.model]
        self.cost = cost or build_cost_model(c.cost_model, c.model, c.gpu, c.tp)
        self.timer = StepTimer(self.cost)
        self.page = c.page_size
        capacity = kv_capacity_tokens(
            model, GPUS[c.gpu], c.tp, memory_utilization=c.memory_utilization
        )
        self.capacity_pages = int(capacity * c.kv_capacity_scale) // self.page
        self.watermark_pages = int(c.admission_watermark * self.capacity_pages)
        self.transfer = cluster_transfer(cfg)
        self.mig_transfer = migration_transfer(cfg)
        self.copy_factor = 1.0 + c.migration_slowdown
        self.start_limiter = StartLimiter(c.migration.max_starts_per_minute)
        self.kv_bytes = model.kv_bytes_per_token
        self.predictor = ErrorModel(cfg.prediction, cfg.seed)
        self.decode = [DecodeReplica(i, self.capacity_pages, self.page)
                       for i in range(c.decode_replicas)]
        self.prefill = [PrefillReplica(i) for i in range(c.prefill_replicas)]
        self._init_requests(workload)
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.now = 0.0
        self.state = PolicyState()
        self.active: dict[int, MigrationRecord] = {}
        # Every ended migration, as the live core keeps them (the last 10,000).
        self.migration_history: collections.deque[MigrationRecord] = collections.deque(
            maxlen=10_000)
        self.view: ClusterSnapshot | None = None  # the dispatcher's last poll
        self.held: list[int] = []  # finished prefill, not yet placed by the policy
        self.counters = dict.fromkeys(
            ("oom_events", "preemptions", "migrations_started", "migrations_completed",
             "migrations_aborted", "migrations_rejected", "bytes_moved_completed",
             "bytes_moved_aborted", "migrated_pages", "decode_tokens", "clipped_requests",
             "recomputed_tokens_local", "migrations_capped"),
            0,
        )
        self.local_recompute = c.preemption == "local"
        self.finished = 0
        self.samples: list[tuple[float, np.ndarray, np.ndarray]] = []

    def _init_requests(self, w: Workload) -> None:
        n = len(w)
        # A request must fit alone in one replica's pool, or nothing could ever serve it.
        fit = self.capacity_pages * self.page - 2 * self.page
        prompt = np.minimum(w.prompt_tokens, fit // 2)
        output = np.minimum(w.output_tokens, fit - prompt)
        self.clipped = int(np.sum((prompt != w.prompt_tokens) | (output != w.output_tokens)))
        self.arrival = w.arrival_s.astype(np.float64)
        self.prompt, self.output = prompt.astype(np.int64), output.astype(np.int64)
        self.max_tokens = np.full(n, w.max_tokens, dtype=np.int64)
        self.arrival_list = self.arrival.tolist()
        self.output_list = self.output.tolist()
        self.kv_cur = self.prompt.tolist()  # KV when not running (prefill/queue/transfer)
        self.gen_cur = [0] * n
        self.epoch = [0] * n
        self.rep_of = np.full(n, -1, dtype=np.int64)  # decode replica while in a running batch
        self.kv_off = np.zeros(n, dtype=np.int64)
        self.gen_off = np.zeros(n, dtype=np.int64)
        self.migrating = np.zeros(n, dtype=bool)
        self.last_migrated = np.full(n, -np.inf)
        self.first_token = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.finish_count = np.zeros(n, dtype=np.int64)
        self.req_preemptions = np.zeros(n, dtype=np.int64)
        self.req_migrations = np.zeros(n, dtype=np.int64)
        self.recompute_here = np.zeros(n, dtype=bool)  # queued on a decode replica to recompute

    # ----------------------------------------------------------------- event plumbing
    def _push(self, t: float, kind: int, a: int = 0, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def run(self) -> SimResult:
        start = time.perf_counter()
        n = len(self.arrival_list)
        self.counters["clipped_requests"] = self.clipped
        # Ticks also re-offer requests a policy held back.
        self._push(self.cfg.reschedule_period_s, RESCHEDULE)
        self._push(0.0, SAMPLE)
        arrivals, heap, ai = self.arrival_list, self.heap, 0
        while self.finished < n:
            if ai < n and (not heap or arrivals[ai] <= heap[0][0]):
                self.now = arrivals[ai]
                self._arrive(ai)
                ai += 1
                continue
            t, _, kind, a, b = heapq.heappop(heap)
            self.now = t
            if kind == STEP_DONE:
                self._step_done(self.decode[a])
            elif kind == PREFILL_DONE:
                self._prefill_done(self.prefill[a])
            elif kind == TRANSFER_DONE:
                self._joins(self.decode[a], b)
            elif kind == STAGE_DONE:
                self._stage_done(b)
            elif kind == FINAL_DONE:
                self._final_done(b)
            elif kind == RESCHEDULE:
                self._reschedule()
            elif kind == SAMPLE:
                self._sample()
        self._sample()
        return self._result(time.perf_counter() - start)

    # ----------------------------------------------------------------- prefill
    def _arrive(self, r: int) -> None:
        self._to_prefill(r, front=False)

    def _to_prefill(self, r: int, *, front: bool) -> None:
        p = min(self.prefill, key=lambda q: (q.queued_tokens, q.busy))
        if front:
            p.queue.appendleft(r)
        else:
            p.queue.append(r)
        p.queued_tokens += self.kv_cur[r]
        self._start_prefill(p)

    def _start_prefill(self, p: PrefillReplica) -> None:
        if p.busy or not p.queue:
            return
        budget = self.cfg.cluster.prefill_token_budget
        tokens = 0
        while p.queue:
            t = self.kv_cur[p.queue[0]]
            if p.batch and tokens + t > budget:
                break
            p.batch.append(p.queue.popleft())
            tokens += t
        p.queued_tokens -= tokens
        p.busy = True
        self._push(self.now + float(self.cost.prefill_ms(tokens)) / 1e3, PREFILL_DONE, p.pos)

    def _prefill_done(self, p: PrefillReplica) -> None:
        batch, p.batch, p.busy = p.batch, [], False
        pending = []
        for r in batch:
            if math.isnan(self.first_token[r]):
                self.first_token[r] = self.now
                self.gen_cur[r] = 1
                if self.output_list[r] <= 1:
                    self._complete(r)
                    continue
            pending.append(r)
        if pending:
            self._dispatch(pending)
        self._start_prefill(p)

    # ----------------------------------------------------------------- policy calls
    def _dispatch(self, new: list[int]) -> None:
        reqs = self.held + new  # held requests first: they are older
        self.held = []
        if not reqs:
            return
        idx = np.array(reqs, dtype=np.int64)
        gen = np.array([self.gen_cur[r] for r in reqs], dtype=np.int64)
        pred = self.predictor.predict(idx, gen, self.output[idx], self.max_tokens[idx])
        pending = tuple(
            PendingDispatch(
                request_id=r,
                kv_tokens=self.kv_cur[r],
                generated_tokens=self.gen_cur[r],
                max_tokens=int(self.max_tokens[r]),
                predicted_remaining=float(pred[i]),
                true_remaining=self.output_list[r] - self.gen_cur[r],
            )
            for i, r in enumerate(reqs)
        )
        snap = self._dispatch_view().with_pending(pending)
        decisions, self.state = self.policy.dispatch(snap, self.state)
        placed = decisions.dispatch_map()
        if len(placed) != len(decisions.dispatches) or not set(placed) <= set(reqs):
            raise RuntimeError(f"policy {self.policy.name} placed an unknown request or twice")
        self.held = [r for r in reqs if r not in placed]
        queued_kv, queued_count = snap.queued_kv_tokens.copy(), snap.queued_count.copy()
        for r in reqs:
            if r not in placed:
                continue
            rep = self.decode[placed[r]]
            rep.queue.append(r)
            rep.queued_kv += self.kv_cur[r]
            queued_kv[rep.pos] += self.kv_cur[r]
            queued_count[rep.pos] += 1
            self._admit(rep)
        # Until the next poll the scheduler knows only what it placed itself.
        self.view = dataclasses.replace(snap, pending=(), queued_kv_tokens=queued_kv,
                                        queued_count=queued_count)

    def _dispatch_view(self) -> ClusterSnapshot:
        """The cluster as the scheduler last polled it (every ``dispatch_poll_s``)."""
        period = self.cfg.dispatch_poll_s
        if self.view is None or self.now - self.view.now >= period:
            self.view = self._snapshot((), with_table=self.policy.needs_request_table)
        return self.view

    def _reschedule(self) -> None:
        if self.held:
            self.view = None  # re-poll: held requests deserve fresh state
            self._dispatch([])
        if self.policy.migrates:
            self.view = self._snapshot((), with_table=True)
            decisions, self.state = self.policy.reschedule(self.view, self.state)
            for m in decisions.migrations:
                self._start_migration(int(m.request_id), m.src, m.dst)
        self._push(self.now + self.cfg.reschedule_period_s, RESCHEDULE)

    # ----------------------------------------------------------------- decode
    def _admit(self, rep: DecodeReplica) -> None:
        while rep.queue:
            r = rep.queue[0]
            kv = self.kv_cur[r]
            need = pages_for(kv, self.page)
            keep = self.watermark_pages if rep.used_pages else 0
            if need > rep.free_pages - keep:
                return
            rep.queue.popleft()
            rep.queued_kv -= kv
            rep.used_pages += need
            if self.recompute_here[r]:
                self.recompute_here[r] = False
                rep.recompute_tokens += kv
                self._joins(rep, r)
            else:
                self._push(self.now + self.transfer.copy_ms(kv) / 1e3, TRANSFER_DONE, rep.pos, r)

    def _joins(self, rep: DecodeReplica, r: int) -> None:
        rep.joining.append(r)
        if not rep.busy:
            self._start_step(rep)

    def _join(self, rep: DecodeReplica, r: int) -> None:
        s = rep.steps
        off = self.kv_cur[r] - s
        self.kv_off[r] = off
        self.gen_off[r] = self.gen_cur[r] - s
        self.rep_of[r] = rep.pos
        rep.running.add(r)
        rep.kv_offset_sum += off
        rep.phase_counts[off % self.page] += 1
        finish_step = s + self.output_list[r] - self.gen_cur[r]
        heapq.heappush(rep.finish_heap, (finish_step, r, self.epoch[r]))

    def _leave(self, rep: DecodeReplica, r: int) -> int:
        """Take ``r`` out of the batch, free its pages; returns its KV tokens."""
        s = rep.steps
        off = int(self.kv_off[r])
        kv = off + s
        rep.running.remove(r)
        rep.kv_offset_sum -= off
        rep.phase_counts[off % self.page] -= 1
        rep.used_pages -= pages_for(kv, self.page)
        self.kv_cur[r] = kv
        self.gen_cur[r] = int(self.gen_off[r]) + s
        self.rep_of[r] = -1
        self.epoch[r] += 1
        return kv

    def _start_step(self, rep: DecodeReplica) -> None:
        if rep.joining:
            for r in rep.joining:
                self._join(rep, r)
            rep.joining.clear()
        need = rep.pages_needed_this_step()
        if need > rep.free_pages:
            self.counters["oom_events"] += 1
            arrival = self.arrival_list
            while need > rep.free_pages and rep.running:
                self._preempt(rep, max(rep.running, key=arrival.__getitem__))
                need = rep.pages_needed_this_step()
            if need > rep.free_pages:
                raise RuntimeError("KV pool over-committed")  # cannot happen: we preempt first
        rep.used_pages += need
        n = len(rep.running)
        rep.step_batch = n
        rep.busy = n > 0
        if n:
            step_ms = self.timer(n, rep.running_kv())
            if rep.copying:
                step_ms *= self.copy_factor
            if rep.recompute_tokens:
                # The recompute runs in this step (chunked into it, as vLLM mixes prefill
                # chunks into decode steps): every request of the batch waits for it.
                step_ms += float(self.cost.prefill_ms(rep.recompute_tokens))
                self.counters["recomputed_tokens_local"] += rep.recompute_tokens
                rep.recompute_tokens = 0
            self._push(self.now + step_ms / 1e3, STEP_DONE, rep.pos)

    def _step_done(self, rep: DecodeReplica) -> None:
        rep.steps += 1
        self.counters["decode_tokens"] += rep.step_batch
        heap, s = rep.finish_heap, rep.steps
        while heap and heap[0][0] <= s:
            _, r, epoch = heapq.heappop(heap)
            if epoch == self.epoch[r]:
                if self.migrating[r]:
                    self._abort_migration(r, MigrationOutcome.ABORTED_SOURCE,
                                          "the request finished")
                self._leave(rep, r)
                self._complete(r)
        if rep.leaving:
            self._depart(rep)
        if rep.queue:
            self._admit(rep)
        self._start_step(rep)

    def _preempt(self, rep: DecodeReplica, r: int) -> None:
        if self.migrating[r]:
            self._abort_migration(r, MigrationOutcome.ABORTED_SOURCE, "the request was "
                                  "preempted")
        kv = self._leave(rep, r)
        self.counters["preemptions"] += 1
        self.req_preemptions[r] += 1
        if self.local_recompute:
            # Admitted again from the front of this replica's queue when pages free up.
            self.recompute_here[r] = True
            rep.queue.appendleft(r)
            rep.queued_kv += kv
        else:
            self._to_prefill(r, front=True)

    def _complete(self, r: int) -> None:
        self.finish[r] = self.now
        self.finish_count[r] += 1
        self.finished += 1



def simulate(
    workload: Workload,
    policy_name: str,
    cfg: SimConfig,
    *,
    cost: StepCostModel | None = None,
) -> SimResult:
    """Run one policy on one workload."""
    c = cfg.cluster
    cost = cost or build_cost_model(c.cost_model, c.model, c.gpu, c.tp)
    policy = make_policy(policy_name, cost=cost, transfer=migration_transfer(cfg), ares=cfg.ares,
                         llumnix=cfg.llumnix)
    return Simulator(workload, policy, cfg, cost=cost).run()
