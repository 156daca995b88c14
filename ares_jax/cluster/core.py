"""The scheduler core: one transport-agnostic loop that owns every request's life.

It holds the waiting queue, the request trackers, the policy state, the hold and fallback
rules and the migration records, and drives replicas only through ``ReplicaHandle``. The
in-process cluster (``cluster/local.py``), and the scheduler process over gRPC
(``serving/scheduler_server.py``) run this same code.

One ``step()``:
1. admission: the waiting requests that the decode side has room for go to a prefill replica;
2. prefill events: first tokens stream out; each prefilled request is *held* until dispatched;
3. dispatch: the dispatch policy places the held requests (in one call, as the simulator
   does); a request the policy leaves unplaced stays held, one placed on a replica that cannot
   take it falls back to the least-loaded replica that can (counted), and with none it stays
   held, its KV parked on the prefill side;
4. migrations advance one stage each (``cluster/migrating.py`` drives ``cluster/migration.py``);
5. decode events: insert and copy completions, then the replicas step (``advance``; remote
   replicas step on their own) and their token rows come in (stop conditions were checked by
   the replica), with preemptions, which are recomputed from prompt + generated tokens;
6. every ``reschedule_every`` steps the policy proposes new migrations.

Nothing is dropped: a failed prefill or insert sends the request back to the front of the
queue, a failed migration leaves it decoding on its source, and every abort frees pages
wherever the request has them.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from ares_jax.cluster.config import ClusterConfig
from ares_jax.cluster.deadlines import DEADLINE, Deadlines
from ares_jax.cluster.migrating import Migrations
from ares_jax.cluster.migration import MigrationOutcome, MigrationRecord, StartLimiter
from ares_jax.cluster.report import cluster_state
from ares_jax.cluster.snapshot import build_snapshot
from ares_jax.engine.outputs import RequestTracker, StreamChunk
from ares_jax.engine.slots import DecodeLoad
from ares_jax.engine.types import Request
from ares_jax.model.tokenizer import Tokenizer
from ares_jax.paging import pages_for
from ares_jax.replica.handle import ReplicaHandle
from ares_jax.replica.types import (
    Detached,
    Event,
    ImportDone,
    InsertDone,
    Prefilled,
    PrefillFailed,
    ReplicaFailed,
    Stepped,
)
from ares_jax.scheduler import (
    ClusterSnapshot,
    LinearStepCost,
    PendingDispatch,
    PolicyState,
    TransferCost,
    make_policy,
)

MAX_PREFILL_RETRIES = 3
log = logging.getLogger("ares_jax.scheduler")


class ClusterCore(Migrations):
    def __init__(self, prefill: Sequence[ReplicaHandle], decode: Sequence[ReplicaHandle],
                 tokenizer: Tokenizer | None, *, vocab_size: int, cluster: ClusterConfig,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if not prefill or not decode:
            raise ValueError("a cluster needs at least one prefill and one decode replica")
        self.prefill = list(prefill)
        self.decode = list(decode)
        self.by_id: dict[int, ReplicaHandle] = {}
        for h in self.prefill + self.decode:
            if h.info.replica_id in self.by_id:
                raise ValueError(f"two replicas have id {h.info.replica_id}")
            self.by_id[h.info.replica_id] = h
        self.decode_pos = {h.info.replica_id: i for i, h in enumerate(self.decode)}
        page_sizes = {h.info.page_size for h in self.prefill + self.decode}
        if len(page_sizes) != 1:
            raise ValueError(f"replicas disagree on page size: {sorted(page_sizes)}")
        self.page_size = page_sizes.pop()
        self.max_model_len = min(h.info.max_model_len for h in self.prefill + self.decode)
        self.max_pages = min(h.info.capacity_pages for h in self.decode)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cluster = cluster
        self.clock = clock
        a, b, c = cluster.step_cost_abc
        self.cost = LinearStepCost(a=a, b=b, c=c)
        self.transfer_cost = TransferCost(
            kv_bytes_per_token=self.decode[0].info.kv_bytes_per_token,
            link_gbytes_per_s=cluster.link_gbytes_per_s)
        self._make_policies()
        self.policy_state = PolicyState()

        self.waiting: collections.deque[Request] = collections.deque()
        self.trackers: dict[str, RequestTracker] = {}
        self.finished: dict[str, RequestTracker] = {}
        self.prefilling: dict[str, int] = {}  # request -> prefill replica
        self.held: dict[str, Prefilled] = {}  # prefilled, waiting for a decode replica
        self.inserting: dict[str, int] = {}  # request -> decode replica taking it
        self.kv_source: dict[str, int] = {}  # request -> prefill replica holding its block
        self.location: dict[str, int] = {}  # request -> decode replica it runs on
        self.prefill_failures: collections.Counter[str] = collections.Counter()
        self.migrations: dict[str, MigrationRecord] = {}
        self.detached: dict[str, Detached] = {}
        self.migration_history: collections.deque[MigrationRecord] = collections.deque(
            maxlen=1000)
        self.last_migrated: dict[str, float] = {}
        self.start_limiter = StartLimiter(self.cluster.migration.max_starts_per_minute)
        self.counters: collections.Counter[str] = collections.Counter()
        # (iteration, kind, request, a, b): every placement and migration decision, in order
        # (kinds: dispatch, fallback, migrate, migration_end), for tests and debugging.
        self.decisions: collections.deque[tuple] = collections.deque(maxlen=100_000)
        self.iterations = 0
        # (batch, kv_tokens, ms) per replica step, for the online cost refit.
        self.step_samples: collections.deque[tuple[int, int, float]] = \
            collections.deque(maxlen=512)
        # Each replica's own stepping time, and per request the seconds of its replica's
        # steps plus migration stalls (TPOT as if every replica had its own accelerator).
        self.step_seconds = {h.info.replica_id: 0.0 for h in self.decode}
        self.replica_time: dict[str, float] = collections.defaultdict(float)
        self.on_stepped: list[Callable[[ReplicaHandle, Stepped], None]] = []
        self.dead: set[int] = set()  # replicas that failed; nothing is placed there again
        self._late_chunks: list[StreamChunk] = []  # chunks made outside step()
        self.deadlines = Deadlines()

    def _make_policies(self) -> None:
        make = lambda name: make_policy(name, cost=self.cost,  # noqa: E731
                                        transfer=self.transfer_cost, ares=self.cluster.ares)
        self.policy = make(self.cluster.policy)
        self.dispatch_policy = make(self.cluster.dispatch_policy or self.cluster.policy)
        # Only policies that forecast step times (ARES) read the cost model worth refitting.
        self._refits = any(getattr(p, "cost", None) is not None
                           for p in (self.policy, self.dispatch_policy))

    # ------------------------------------------------------------------ intake

    def add_request(self, request: Request, prompt_text: str | None = None) -> None:
        """Validate and queue a request; raises ValueError (naming the problem) if it can
        never be served."""
        rid = request.request_id
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError(f"request {rid}: the prompt is empty")
        if rid in self.trackers:
            raise ValueError(f"request id {rid!r} is already in use")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"request {rid}: prompt token ids {bad[:5]} are outside the "
                             f"vocabulary [0, {self.vocab_size})")
        request.params.validate_for_vocab(self.vocab_size)
        if n >= self.max_model_len:
            raise ValueError(f"request {rid}: the prompt has {n} tokens; this server's "
                             f"max_model_len is {self.max_model_len}")
        total = n + request.params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"request {rid}: prompt ({n}) + max_tokens "
                             f"({request.params.max_tokens}) = {total} tokens exceeds "
                             f"max_model_len {self.max_model_len}")
        need = pages_for(total, self.page_size)
        if need > self.max_pages:
            raise ValueError(f"request {rid}: it needs {need} KV pages; the pool holds "
                             f"{self.max_pages}")
        self.trackers[rid] = RequestTracker(request, self.tokenizer, prompt_text)
        self.waiting.append(request)
        self.deadlines.add(request)

    def abort(self, request_id: str) -> None:
        """Cancel a request wherever it is; its pages are freed on every replica."""
        tracker = self.trackers.get(request_id)
        if tracker is None or tracker.finish_reason is not None:
            return
        if any(r.request_id == request_id for r in self.waiting):
            self.waiting = collections.deque(r for r in self.waiting
                                             if r.request_id != request_id)
        self._retire(request_id, abort=True)

    @property
    def has_work(self) -> bool:
        # A request failed outside step() still has its last chunk to deliver.
        return bool(self.trackers or self._late_chunks)

    # ------------------------------------------------------------------ one iteration

    def step(self) -> list[StreamChunk]:
        """One scheduling iteration (see the module docstring); returns the stream events."""
        self._expire_deadlines()
        out, self._late_chunks = self._late_chunks, []
        self._admit()
        self._drain(self.prefill, out)
        self._dispatch_held()
        self._advance_migrations()
        # Inserts and copies complete (in this process, at once) before the replicas step, so
        # a migrated request decodes on its destination in this very iteration.
        self._drain(self.decode, out)
        for h in self.decode:
            h.advance()
        self._drain(self.decode, out)
        self.iterations += 1
        if self.policy.migrates and self.iterations % self.cluster.reschedule_every == 0:
            self._reschedule()
        if self._refits and len(self.step_samples) >= \
                self.cluster.refit_after_steps and \
                self.iterations % self.cluster.refit_after_steps == 0:
            self._refit_cost()
        return out

    def _drain(self, handles: Sequence[ReplicaHandle], out: list[StreamChunk]) -> None:
        for h in handles:
            for ev in h.poll():
                self._on_event(h, ev, out)

    def _on_event(self, h: ReplicaHandle, ev: Event, out: list[StreamChunk]) -> None:
        if ev.replica_id in self.dead and not isinstance(ev, ReplicaFailed):
            return  # what a failed replica said last is void: its requests are recomputed
        if isinstance(ev, Stepped):
            self._on_stepped(h, ev, out)
        elif isinstance(ev, Prefilled):
            self._on_prefilled(h, ev, out)
        elif isinstance(ev, InsertDone):
            self._on_inserted(ev)
        elif isinstance(ev, ImportDone):
            self._on_imported(ev)
        elif isinstance(ev, PrefillFailed):
            self._on_prefill_failed(ev)
        elif isinstance(ev, ReplicaFailed):
            self._on_replica_failed(ev)

    def poll(self) -> list[StreamChunk]:
        """Take in what the replicas said while no request runs, so that a replica failing
        on an idle cluster is noticed (and its state reported) at once, not at the next
        request."""
        out, self._late_chunks = self._late_chunks, []
        self._drain(self.prefill, out)
        self._drain(self.decode, out)
        return out

    # ------------------------------------------------------------------ admission + prefill

    def _admit(self) -> None:
        """Prefill, in FIFO order, the waiting requests the decode side has room for: a free
        slot and the pages for the context plus the next token on some replica, after what is
        already promised to requests prefilling, held or being inserted."""
        if not self.waiting:
            return
        loads = list(self.loads().values())
        slots = np.fromiter((ld.free_slots for ld in loads), np.int64, len(loads))
        pages = np.fromiter((ld.free_pages for ld in loads), np.int64, len(loads))

        def take(need: int) -> bool:
            # The replica with the most free pages among those with a slot and room.
            room = np.where((slots > 0) & (pages >= need), pages, -1)
            best = int(np.argmax(room))
            if room[best] < 0:
                return False
            slots[best] -= 1
            pages[best] -= need
            return True

        for rid in [*self.prefilling, *self.held, *self.inserting]:
            tracker = self.trackers.get(rid)  # None: aborted, its event not back yet
            if tracker is not None:
                take(pages_for(len(tracker.request.context_ids) + 1, self.page_size))
        batch: list[Request] = []
        while self.waiting and take(pages_for(len(self.waiting[0].context_ids) + 1,
                                              self.page_size)):
            batch.append(self.waiting.popleft())
        if not batch:
            return
        alive = [h for h in self.prefill if h.info.replica_id not in self.dead]
        if not alive:  # nowhere to prefill: say so rather than wait for ever
            for r in batch:
                self._fail(r.request_id, "no prefill replica is alive")
            return
        target = min(alive, key=lambda h: sum(
            1 for r in self.prefilling.values() if r == h.info.replica_id))
        now = self.clock()
        for r in batch:
            self.prefilling[r.request_id] = target.info.replica_id
            metrics = self.trackers[r.request_id].metrics
            if metrics.scheduled_time is None:
                metrics.scheduled_time = now
        target.prefill(batch)

    def _on_prefilled(self, h: ReplicaHandle, ev: Prefilled, out: list[StreamChunk]) -> None:
        rid = ev.request_id
        tracker = self.trackers.get(rid)
        if tracker is None or self.prefilling.get(rid) != h.info.replica_id:
            h.drop_kv(rid)  # aborted while prefilling
            return
        del self.prefilling[rid]
        if ev.predicted_remaining is not None:
            tracker.predict(ev.predicted_remaining)
        done = tracker.add(ev.first, self.clock(), ev.finish_reason, ev.stop_reason)
        out.append(tracker.chunk(ev.first))
        if done:
            h.drop_kv(rid)
            self._retire(rid)
            return
        self.held[rid] = ev

    def _on_prefill_failed(self, ev: PrefillFailed) -> None:
        self.counters["prefill_failures"] += 1
        log.warning("prefill of %d request(s) failed on replica %d: %s", len(ev.request_ids),
                    ev.replica_id, ev.error)
        for rid in reversed(ev.request_ids):
            if self.prefilling.pop(rid, None) is None or rid not in self.trackers:
                continue
            self.prefill_failures[rid] += 1
            if self.prefill_failures[rid] >= MAX_PREFILL_RETRIES:
                self._fail(rid, f"prefill failed {MAX_PREFILL_RETRIES} times: {ev.error}")
            else:
                self.waiting.appendleft(self.trackers[rid].request)

    # ------------------------------------------------------------------ dispatch

    def _dispatch_held(self) -> None:
        if not self.held:
            return
        pending = []
        for rid, ev in self.held.items():
            req = self.trackers[rid].request
            pending.append(PendingDispatch(
                request_id=rid, kv_tokens=ev.num_tokens,
                generated_tokens=len(req.resumed_ids) + 1, max_tokens=req.params.max_tokens,
                predicted_remaining=self.trackers[rid].predicted_remaining))
        loads = self.loads()
        room = {i: [ld.free_slots, ld.free_pages] for i, ld in loads.items()}
        snap = build_snapshot(self, loads, pending,
                              with_table=self.dispatch_policy.needs_request_table)
        decisions, self.policy_state = self.dispatch_policy.dispatch(snap, self.policy_state)
        chosen = decisions.dispatch_map()
        idle = not self.location and not self.inserting
        for p in pending:
            rid = str(p.request_id)
            need = pages_for(p.kv_tokens + 1, self.page_size)
            target = chosen.get(rid)
            if target is None and not idle:
                continue  # the policy holds it: offered again next step
            if target is None or not _fits(room[target], need):
                # The policy chose a replica that cannot take it now (e.g. round-robin onto a
                # full one), or holds it while the whole decode side is idle: place it where it
                # fits, least loaded first, rather than stall it.
                fitting = [i for i in room if _fits(room[i], need)]
                if not fitting:
                    continue
                target = max(fitting, key=lambda i: room[i][1])
                self.counters["fallback_dispatches"] += 1
            room[target][0] -= 1
            room[target][1] -= need
            self.decisions.append((self.iterations, "dispatch", rid, target,
                                   chosen.get(rid)))
            ev = self.held.pop(rid)
            self.inserting[rid] = target
            self.kv_source[rid] = ev.replica_id
            self.location[rid] = target
            self.by_id[target].insert(self.trackers[rid].request, ev)

    def _on_inserted(self, ev: InsertDone) -> None:
        rid = ev.request_id
        if self.inserting.get(rid) != ev.replica_id:
            return
        del self.inserting[rid]
        source = self.kv_source.pop(rid, None)
        if source is not None:
            self.by_id[source].drop_kv(rid)
        if rid not in self.trackers:  # aborted while inserting
            self.by_id[ev.replica_id].release(rid)
            return
        if not ev.ok:
            # Raced out of room, or the KV pull failed: recompute rather than drop.
            self.counters["insert_failures"] += 1
            log.warning("replica %d did not take request %s (%s); recomputing it",
                        ev.replica_id, rid, ev.error)
            self.location.pop(rid, None)
            self._requeue(rid, preempted=False)

    # ------------------------------------------------------------------ decode

    def _on_stepped(self, h: ReplicaHandle, ev: Stepped, out: list[StreamChunk]) -> None:
        self.step_seconds[ev.replica_id] += ev.elapsed_s
        self.step_samples.append((len(ev.request_ids), ev.kv_tokens, ev.elapsed_s * 1e3))
        for rid in ev.preempted:
            if rid in self.trackers and self.location.get(rid) == ev.replica_id:
                self._abort_migration(rid, MigrationOutcome.ABORTED_SOURCE, "preempted")
                self.location.pop(rid, None)
                self._requeue(rid, preempted=True)
        now = self.clock()
        for row, rid in enumerate(ev.request_ids):
            tracker = self.trackers.get(rid)
            if tracker is None or self.location.get(rid) != ev.replica_id:
                # Aborted while the step ran (a remote race), or a ghost: a copy of a request
                # the core placed elsewhere since (a command that outlived its replica's
                # reset). Its tokens are not the request's; free it there.
                if tracker is not None:
                    self.counters["ghost_rows"] += 1
                if ev.finish_reasons[row] is None:
                    h.release(rid)
                continue
            self.replica_time[rid] += ev.elapsed_s
            if ev.predicted_remaining is not None:
                tracker.predict(ev.predicted_remaining[row])
            info = ev.tokens[row]
            if tracker.add(info, now, ev.finish_reasons[row], ev.stop_reasons[row]):
                if ev.finish_reasons[row] is None:  # a stop string, seen only here
                    h.release(rid)
                    self.location.pop(rid, None)
                else:
                    self.location.pop(rid, None)  # the replica released it itself
                out.append(tracker.chunk(info))
                self._retire(rid)
            else:
                out.append(tracker.chunk(info))
        for hook in self.on_stepped:
            hook(h, ev)

    def _requeue(self, rid: str, *, preempted: bool) -> None:
        tracker = self.trackers[rid]
        if preempted:
            tracker.metrics.num_preemptions += 1
            self.counters["preemptions"] += 1
        tracker.request.resumed_ids = list(tracker.token_ids)
        self.waiting.appendleft(tracker.request)

    def _retire(self, rid: str, abort: bool = False) -> None:
        tracker = self.trackers.pop(rid)
        if abort:
            tracker.abort()
        self._abort_migration(rid, MigrationOutcome.ABORTED_SOURCE, "the request finished")
        where = self.location.pop(rid, None)
        if where is not None and abort:
            self.by_id[where].release(rid)
        if rid in self.held:
            ev = self.held.pop(rid)
            self.by_id[ev.replica_id].drop_kv(rid)
        # A request still prefilling or inserting is cleaned up when its event arrives.
        self.prefill_failures.pop(rid, None)
        self.last_migrated.pop(rid, None)
        self.finished[rid] = tracker
        self.counters["requests_finished"] += 1

    def _fail(self, rid: str, reason: str, finish_reason: str = "error") -> None:
        """End a request that cannot be served; its stream gets a last, token-less chunk."""
        self.counters["requests_failed" if finish_reason == "error" else
                      "requests_past_deadline"] += 1
        tracker = self.trackers[rid]
        tracker.error = reason
        self._retire(rid, abort=True)
        tracker.finish_reason = finish_reason
        self._late_chunks.append(StreamChunk(
            request_id=rid, index=tracker.request.index, token_id=-1, text_delta="",
            finished=True, finish_reason=finish_reason, output=tracker.output()))

    def _expire_deadlines(self) -> None:
        """End, as an abort would, every request whose caller's deadline has passed."""
        now = self.clock()
        for req in self.deadlines.expired(now) if len(self.deadlines) else ():
            tracker = self.trackers.get(req.request_id)
            if tracker is not None and tracker.request is req:  # else finished first
                self.waiting = collections.deque(r for r in self.waiting if r is not req)
                self._fail(req.request_id, f"deadline exceeded: request {req.request_id} "
                           f"ran {now - req.arrival_time:.3f} s", DEADLINE)

    # ------------------------------------------------------------------ failures

    def loads(self) -> dict[int, DecodeLoad]:
        """Every decode replica's load by id; a dead replica shows no room (so no policy
        places or moves anything there) and nothing running."""
        return {h.info.replica_id: (DecodeLoad.idle(capacity_pages=h.info.capacity_pages)
                                    if h.info.replica_id in self.dead
                                    else h.load()) for h in self.decode}

    def _on_replica_failed(self, ev: ReplicaFailed) -> None:
        """A replica stopped answering: everything it held is recomputed elsewhere from the
        prompt plus the tokens already streamed (so a client's stream goes on with no token
        repeated or missing), and nothing is placed on it again."""
        dead = ev.replica_id
        if dead in self.dead:
            return
        self.dead.add(dead)
        self.counters["replica_failures"] += 1
        lost = [rid for rid, at in self.location.items() if at == dead]
        lost += [rid for rid, at in self.prefilling.items() if at == dead]
        lost += [rid for rid, held in self.held.items() if held.replica_id == dead]
        lost += [rid for rid, at in self.kv_source.items() if at == dead and
                 rid in self.inserting]
        for rid, rec in list(self.migrations.items()):
            if dead not in (rec.src, rec.dst):
                continue
            del self.migrations[rid]
            state = self.detached.pop(rid, None)
            rec.in_flight = None
            if rec.src == dead:  # the request is recomputed; drop the partial copy
                self.by_id[rec.dst].release(rid)
                outcome = MigrationOutcome.ABORTED_SOURCE
            else:  # it goes on decoding where it was
                if state is not None:
                    self.by_id[rec.src].reattach(rid)
                outcome = MigrationOutcome.ABORTED_DESTINATION
            self._end(rec, outcome, f"replica {dead} failed")
        log.error("replica %d failed (%s); recomputing %d request(s) elsewhere", dead,
                  ev.error, len(set(lost)))
        for rid in dict.fromkeys(lost):
            if rid not in self.trackers:
                continue
            for table in (self.location, self.prefilling, self.held, self.inserting,
                          self.kv_source):
                table.pop(rid, None)
            self.counters["recovered_requests"] += 1
            self._requeue(rid, preempted=False)

    def rejoin(self, handle: ReplicaHandle) -> None:
        """A replica declared dead is back (a healed partition, a resumed process) under its
        old id, with a fresh handle: it has dropped everything it held (its requests are
        recomputed elsewhere), so it starts empty and may be placed on again. Events left on
        the old handle are void."""
        rid = handle.info.replica_id
        if rid not in self.dead:  # its failure is not taken in yet (an idle core): now
            self._on_replica_failed(ReplicaFailed(replica_id=rid, error="it registered again"))
        old = self.by_id[rid]
        for table in (self.prefill, self.decode):
            for i, h in enumerate(table):
                if h is old:
                    table[i] = handle
        self.by_id[rid] = handle
        self.dead.discard(rid)
        self.counters["replica_rejoins"] += 1

    # ------------------------------------------------------------------ observation

    def snapshot(self, pending: Sequence[PendingDispatch] = ()) -> ClusterSnapshot:
        """The decode side as the policies see it (columnar, built from replica loads)."""
        loads = self.loads()
        return build_snapshot(self, loads, pending, with_table=True)

    def held_kv_tokens(self, rid: str) -> int:
        """KV tokens a prefilled request brings to its decode replica."""
        return len(self.trackers[rid].request.context_ids) if rid in self.trackers else 0

    def _refit_cost(self) -> None:
        rows = np.asarray(self.step_samples)
        if np.ptp(rows[:, 0]) == 0 or np.ptp(rows[:, 1]) == 0:
            return  # a degenerate design matrix: keep the current fit
        fit = LinearStepCost.fit_linear(rows)
        if fit.a > 0 and fit.b >= 0 and fit.c >= 0:
            self.cost = fit
            self._make_policies()

    def cluster_state(self, recent: int = 100) -> dict:
        """Every replica's identity and load, the recent migrations and the counters, as
        JSON-ready data (served at ``/cluster`` and by the ``Stats`` RPC)."""
        return cluster_state(self, recent)

    def stats(self) -> dict[str, float | int]:
        c = self.counters
        return {
            "migrations_committed": c["migrations_committed"],
            "migrations_aborted": c["migrations_aborted"],
            "migration_bytes": int(c["migration_bytes"]),
            "fallback_dispatches": c["fallback_dispatches"],
            "migrations_capped": c["migrations_capped"],
        }


def _fits(room: list[int], pages: int) -> bool:
    """A replica's remaining (slots, pages) can take a request of ``pages`` pages."""
    return room[0] > 0 and room[1] >= pages

