"""ARES: predictive dispatch and decode-phase rescheduling (design brief, section 4).

Memory first, then step time:

* **Dispatch.** For each pending request, every replica's load is forecast with the request
  added. Replicas whose predicted peak KV over the horizon stays within
  ``memory_target * capacity`` (minus memory held outside the running batch) qualify; among them
  the lowest predicted TPOT wins. When none qualifies, the smallest predicted overflow wins.
* **Rescheduling** (each period, at most ``max_migrations_per_round`` moves):
  1. *OOM guard*: replicas whose predicted peak exceeds their budget move out requests that are
     still alive at the peak (longest predicted remaining first) to the replica with the lowest
     post-move TPOT that has headroom.
  2. *Balancing*: while the worst-minus-best predicted TPOT gap exceeds the threshold, move from
     the worst replica the longest-remaining request whose move improves the pair and whose
     benefit (token-time saved over the horizon) recoups ``recoup_factor`` times its transfer
     cost (KV bytes over the link plus the stall).
  3. A request that migrated is cooled down for ``cooldown_s``; one already migrating is left
     alone.

``ares-oracle`` is the same policy reading true remaining lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ares_jax.config import config
from ares_jax.scheduler.board import Board, estimate_remaining
from ares_jax.scheduler.cost import StepCostModel, TransferCost
from ares_jax.scheduler.policies import DISPATCH_SCORES
from ares_jax.scheduler.state import (
    ClusterSnapshot,
    Decisions,
    Dispatch,
    Migration,
    PendingDispatch,
    PolicyState,
)

__all__ = ["AresConfig", "AresPolicy", "estimate_remaining", "pending_remaining"]


@config
class AresConfig:
    horizon_steps: int = 2048  # decode steps the TPOT forecast looks ahead
    # Steps the memory forecast (predicted peak KV) looks ahead. Looking to every request's
    # predicted end (32768) with deferral was tried and lost: see docs/results_sim.md.
    memory_horizon_steps: int = 2048
    samples: int = 9  # sample points of the TPOT average over the horizon
    # The predicted peak may use this fraction of capacity. 1.0 (was 0.95): over 12-36 trace
    # seeds per cell it was better or level in every regime family measured, with 0-17% fewer
    # bytes moved, and it halved ARES's loss to least-load without migration at 4 x 4
    # (results_sim.md, "Memory target 1.0").
    memory_target: float = 1.0
    balance_threshold: float = 0.10  # rebalance when (worst - best) TPOT > this * mean TPOT ...
    balance_threshold_ms: float = 1.0  # ... and > this many ms
    # A robust noise gate on the same gap (worst minus median): it must also exceed this many
    # standard deviations of the replicas' predicted TPOT (1.4826 x MAD). Many replicas spread
    # by chance: the max of 64 draws sits ~2.4 sigma above the median. 0 disables it. Only
    # with at least ``balance_noise_min_replicas`` replicas: the MAD of a handful of values says
    # nothing, and on 4 replicas the gate cost P99 TPOT over 4 trace seeds (results_sim.md).
    balance_noise_z: float = 3.0
    balance_noise_min_replicas: int = 8
    recoup_factor: float = 2.0  # a move must save this many times its transfer cost
    # Gain of a move: True counts the cluster-wide change in token-time over the horizon
    # (source, destination and the moved request); False (the first version) counts only the
    # source's side and the moved request, ignoring what the destination's requests lose.
    net_gain: bool = True
    max_migrations_per_round: int = 8
    # Scale the per-round bound with the gap: ceil(max * (gap / threshold - 1)), capped at max.
    scale_migrations_with_gap: bool = True
    # True (before issue 16): balancing gets its own (gap-scaled) bound on top of the moves the
    # memory phases made, so a round could decide up to twice max_migrations_per_round moves.
    # False: the whole round stays within max_migrations_per_round, as documented; identical
    # P99 TPOT and bytes at 4 replicas x 16 KV units (results_sim.md) and a cheaper round.
    balance_own_budget: bool = False
    # Dispatch: fall back to a current-load policy's choice (if it fits the memory budget)
    # unless ARES's choice predicts a TPOT lower by more than this fraction. 0 disables it.
    dispatch_min_gain: float = 0.2
    dispatch_fallback: str = "llumnix"  # or "least-load"
    # ... only with at least this many replicas. The arg-min over many noisy predictions is
    # biased towards the luckiest one (winner's curse); on 4 replicas the fallback also helped
    # P99 TPOT over 4 trace seeds (results_sim.md), so it is on whenever there is a choice.
    dispatch_fallback_min_replicas: int = 2
    cooldown_s: float = 10.0
    # Risk: forecasts read this multiple of each *predicted* remaining length (the truth, for
    # the oracle, is never scaled). The error is multiplicative, so > 1 plans for an upper
    # quantile of the length instead of the point estimate.
    remaining_scale: float = 1.0
    # Balancing gate: also charge a move the slowdown its copy inflicts on both replicas'
    # batches (TransferCost.copy_slowdown x copy time x the two batch sizes, token x ms). A no-op
    # unless a slowdown is modelled; with one (5 GB/s, 25%) it was neutral on P99 TPOT and moved
    # 5% fewer bytes over 4 seeds (results_sim.md), and it charges a cost that exists.
    gate_full_cost: bool = True
    prior_remaining_tokens: float = 512.0  # for a request with no prediction yet
    candidates_per_replica: int = 8  # longest-remaining requests examined per source
    use_true_remaining: bool = False  # the oracle
    # When no replica's predicted peak fits, hold the request and those behind it (first come,
    # first served; offered again later) instead of over-committing a replica into a
    # preemption storm. An idle replica always takes a request, so nothing waits forever.
    defer_when_full: bool = False
    # Delay the first OOM: when a replica's forecast crosses its budget within this many steps
    # and the guard above found no replica with room, move out a request alive at the crossing
    # to the replica where the pair's earliest predicted crossing comes latest. Current load
    # cannot see this: how soon a pool fills depends on who finishes first. 0 disables it.
    oom_delay_steps: int = 256
    oom_delay_destinations: int = 4  # replicas with the latest crossing tried as destinations
    oom_delay_min_gain_steps: int = 64  # a move must put the pair's first crossing this much later

    def __post_init__(self) -> None:
        if self.dispatch_fallback not in DISPATCH_SCORES:
            raise ValueError(f"AresConfig.dispatch_fallback must be one of "
                             f"{sorted(DISPATCH_SCORES)}, not {self.dispatch_fallback!r}")


def _median(x: np.ndarray) -> float:
    """``np.median`` of a 1-D array without NaN (the same value, a third of the calls)."""
    n = x.shape[0]
    k = n // 2
    if n % 2:
        return float(np.partition(x, k)[k])
    part = np.partition(x, (k - 1, k))
    return float((part[k - 1] + part[k]) / 2.0)


def pending_remaining(p: PendingDispatch, cfg: AresConfig) -> float:
    rem = p.predicted_remaining
    if rem is not None:
        rem = rem * cfg.remaining_scale
    if cfg.use_true_remaining and p.true_remaining is not None:
        rem = p.true_remaining
    if rem is None:
        rem = cfg.prior_remaining_tokens
    return float(min(max(rem, 0.0), max(p.max_tokens - p.generated_tokens, 0)))


@dataclass(frozen=True, eq=False)
class AresPolicy:
    """ARES over a :class:`Board`. Every step below is evaluated for all the candidates it
    compares at once (requests x replicas in one numpy evaluation); the Python loops run over
    decisions taken (at most ``max_migrations_per_round`` moves, one per pending request) and
    over the replicas a phase examines, never over the requests of a replica."""

    cost: StepCostModel
    transfer: TransferCost
    config: AresConfig = AresConfig()
    name: str = "ares"
    needs_request_table: bool = True
    migrates: bool = True

    def dispatch(
        self, snapshot: ClusterSnapshot, state: PolicyState
    ) -> tuple[Decisions, PolicyState]:
        if not snapshot.pending:
            return Decisions(), state
        board = Board(snapshot, self.cost, self.config, room=len(snapshot.pending))
        fallback = DISPATCH_SCORES[self.config.dispatch_fallback](snapshot)
        min_gain = self.config.dispatch_min_gain
        if board.n < self.config.dispatch_fallback_min_replicas:
            min_gain = 0.0
        out = []
        rems = [pending_remaining(p, self.config) for p in snapshot.pending]
        # "KV just before the request's finish" on the snapshot's grouping, for every pending
        # request at once (placements only add their own corrections, in joined).
        horizon = float(self.config.memory_horizon_steps)
        grouped = board.grouped_alive(np.minimum(np.array(rems), horizon)[:, None],
                                      board.everyone)
        for i, p in enumerate(snapshot.pending):
            kv, rem = float(p.kv_tokens), rems[i]
            tpot, peak, work = board.joined(kv, rem, grouped=grouped[i])
            overflow = peak - board.budget
            fits = overflow <= 0
            if fits.any():
                pos = int(np.argmin(np.where(fits, tpot, np.inf)))
                if min_gain > 0:
                    least = fallback.choice()
                    if fits[least] and tpot[pos] >= (1 - min_gain) * tpot[least]:
                        pos = least  # the prediction gains nothing over current load
            elif self.config.defer_when_full and not board.idle.any():
                break  # held with all behind it (first come, first served), offered again later
            elif board.idle.any():
                pos = int(np.argmin(np.where(board.idle, overflow, np.inf)))
            else:
                pos = int(np.argmin(overflow))
            out.append(Dispatch(request_id=p.request_id, replica_id=int(snapshot.replica_ids[pos])))
            board.place(kv, rem, pos, tpot[pos], peak[pos], work[pos])
            fallback.place(pos, p.kv_tokens)
        return Decisions(dispatches=tuple(out)), state

    def reschedule(
        self, snapshot: ClusterSnapshot, state: PolicyState
    ) -> tuple[Decisions, PolicyState]:
        table = snapshot.table()
        cfg = self.config
        if len(table) == 0 or snapshot.num_replicas < 2:
            return Decisions(), state
        board = Board(snapshot, self.cost, cfg)
        movable = ~table.migrating & (snapshot.now - table.last_migrated_at >= cfg.cooldown_s)
        moves: list[tuple[int, int, int]] = []  # (row, src, dst)
        self._guard_memory(board, movable, moves)
        self._delay_overflow(board, movable, moves)
        self._balance(board, movable, moves)
        ids = snapshot.replica_ids
        return (
            Decisions(
                migrations=tuple(
                    Migration(request_id=table.id_at(row), src=int(ids[s]), dst=int(ids[d]))
                    for row, s, d in moves
                )
            ),
            state,
        )

    def _candidates(self, board: Board, movable: np.ndarray, src: int) -> np.ndarray:
        """Movable rows of ``src``, longest predicted remaining first (ties: lower row)."""
        return board.candidates(src, movable, self.config.candidates_per_replica)

    def _move(self, board: Board, movable: np.ndarray, moves: list[tuple[int, int, int]],
              row: int, dst: int, work: np.ndarray | None = None,
              tpot: np.ndarray | None = None) -> None:
        moves.append((row, int(board.rep[row]), dst))
        movable[row] = False
        board.move(row, dst, work, tpot)

    def _guard_memory(
        self, board: Board, movable: np.ndarray, moves: list[tuple[int, int, int]]
    ) -> None:
        """Replicas predicted over budget, worst first, move out requests alive at their peak
        (longest remaining first) to the replica with the lowest post-move TPOT that fits."""
        overflow = board.peak - board.budget
        if not board.could_take(np.zeros(1)).any():
            return  # no replica has headroom: nowhere to move anything
        for src in [int(i) for i in np.argsort(-overflow) if overflow[i] > 0]:
            while (
                board.peak[src] > board.budget[src]
                and len(moves) < self.config.max_migrations_per_round
            ):
                rows = self._candidates(board, movable, src)
                # Only requests still alive at the peak lower it.
                rows = rows[board.rem[rows] >= board.peak_at[src]]
                if rows.size == 0:
                    break
                kv, rem = board.kv[rows], board.rem[rows]
                # The new peak is at least its value at the old peak: a cheap first filter,
                # then the exact peak for the pairs left: of the first candidate alone (it
                # usually fits somewhere), then of all the others at once.
                # The first candidate's exact peak and TPOT on the replicas left, with the
                # source's work without it (what the move needs), in one evaluation.
                dests = np.flatnonzero(self._might_fit(board, kv[:1], rem[:1], src)[0])
                if dests.size:
                    budget = board.budget[dests]
                    tpot, peak, work = board.joined(float(kv[0]), float(rem[0]), dests, src,
                                                    fits_in=budget)
                    ok = peak <= budget
                    if tpot is not None and work is not None:
                        best = int(np.argmin(np.where(ok, tpot[:-1], np.inf)))
                        self._move(board, movable, moves, int(rows[0]), int(dests[best]),
                                   work[[-1, best]], tpot[[-1, best]])
                        continue
                # Then the exact peaks of all the others at once; the first that fits somewhere
                # goes where its TPOT is lowest.
                fits = self._might_fit(board, kv, rem, src)
                c_idx, p_idx = np.nonzero(fits[1:])
                c_idx += 1
                if c_idx.size:
                    over = board.peak_pairs(kv[c_idx], rem[c_idx], p_idx) > board.budget[p_idx]
                    fits[c_idx[over], p_idx[over]] = False
                hit = np.flatnonzero(fits[1:].any(axis=1))
                if hit.size == 0:
                    break
                c = 1 + int(hit[0])
                dests = np.flatnonzero(fits[c])
                tpot, _, work = board.joined(float(kv[c]), float(rem[c]), dests, src)
                best = int(np.argmin(tpot[:-1]))
                self._move(board, movable, moves, int(rows[c]), int(dests[best]),
                           work[[-1, best]], tpot[[-1, best]])

    @staticmethod
    def _might_fit(board: Board, kv: np.ndarray, rem: np.ndarray, src: int) -> np.ndarray:
        """``[C, R]``: the replicas other than ``src`` where each candidate might fit (the
        necessary conditions of :meth:`Board.could_take` and :meth:`Board.old_peak_bound`)."""
        fits = board.could_take(kv)
        fits[:, src] = False
        fits &= board.old_peak_bound(kv, rem) <= board.budget
        return fits

    def _delay_overflow(
        self, board: Board, movable: np.ndarray, moves: list[tuple[int, int, int]]
    ) -> None:
        """Replicas predicted to pass their budget within ``oom_delay_steps``, soonest first,
        move out the request (alive at the crossing) and to the destination (of the
        ``oom_delay_destinations`` latest-crossing replicas) that put the pair's first crossing
        latest, if at least ``oom_delay_min_gain_steps`` later.

        Sources are examined in chunks (8, then doubling while none finds a move): one
        evaluation per chunk instead of one per request and destination. A move changes the
        crossings, so the next chunk starts after it, from the re-sorted order."""
        cfg = self.config
        if cfg.oom_delay_steps <= 0:
            return
        done = np.zeros(board.n, dtype=bool)
        chunk = 8
        while len(moves) < cfg.max_migrations_per_round:
            crossing = board.overflow_steps()
            waiting = np.flatnonzero(~done & (crossing < cfg.oom_delay_steps))
            if waiting.size == 0:
                return
            order = waiting[np.argsort(crossing[waiting], kind="stable")][:chunk]
            found = self._delay_chunk(board, movable, order, crossing)
            if found is None:
                done[order] = True
                chunk *= 2
                continue
            k, row, dst = found
            done[order[:k + 1]] = True
            src = int(order[k])
            self._move(board, movable, moves, row, dst)
            done[src] = False  # it may still fill too soon
            chunk = 8

    def _delay_chunk(
        self, board: Board, movable: np.ndarray, sources: np.ndarray, crossing: np.ndarray
    ) -> tuple[int, int, int] | None:
        """The first source of ``sources`` (in order) with a move that delays its crossing:
        ``(index in sources, row, dst)``, the move with the latest pair crossing (first
        candidate, then first destination, on ties)."""
        cfg = self.config
        gain = cfg.oom_delay_min_gain_steps
        latest = np.argsort(-crossing, kind="stable")[: cfg.oom_delay_destinations + 1]
        srcs, rows, owner, dests_of = [], [], [], {}
        for k, src in enumerate(sources.tolist()):
            # A pair's first crossing is at most the destination's (a request joining can
            # only bring it forward): without a destination that late, skip the source.
            dests = [d for d in latest.tolist() if d != src][: cfg.oom_delay_destinations]
            dests = [d for d in dests if crossing[d] - crossing[src] >= gain]
            if not dests:
                continue
            cand = self._candidates(board, movable, src)
            cand = cand[board.rem[cand] > crossing[src]]  # only these are there when it fills
            srcs += [src] * cand.shape[0]
            rows.append(cand)
            owner += [k] * cand.shape[0]
            dests_of[k] = dests
        if not srcs:
            return None
        rows = np.concatenate(rows)
        owner = np.asarray(owner)
        before = crossing[np.asarray(srcs)]
        src_after = board.crossings(srcs, drop=rows)
        # ... and at most the source's: only candidates that delay it enough can qualify.
        triples = [(i, d) for i in np.flatnonzero(src_after - before >= gain).tolist()
                   for d in dests_of[int(owner[i])]]
        if not triples:
            return None
        cand_idx = np.array([t[0] for t in triples])
        dsts = [t[1] for t in triples]
        dst_after = board.crossings(dsts, add=rows[cand_idx])
        later = np.minimum(src_after[cand_idx], dst_after)
        ok = later - before[cand_idx] >= gain
        if not ok.any():
            return None
        k = int(owner[cand_idx[np.flatnonzero(ok)[0]]])  # the first source with a move
        mine = np.flatnonzero(ok & (owner[cand_idx] == k))
        best = mine[np.argmax(later[mine])]  # first maximum: first candidate, then dest
        return k, int(rows[cand_idx[best]]), dsts[best]

    def _balance(
        self, board: Board, movable: np.ndarray, moves: list[tuple[int, int, int]]
    ) -> None:
        """While the worst-minus-best TPOT gap is over the threshold (and over chance spread),
        move from the worst replica to the best the first candidate that pays; a replica with
        no such candidate is passed over for the next worst.

        Until a move changes the board, the replicas passed over come in the order of their
        TPOT and the checks depend on that alone, so they are examined in chunks (1, then
        doubling while none has a move): one evaluation per chunk, not one per replica."""
        cfg = self.config
        exhausted = np.zeros(board.n, dtype=bool)
        limit = cfg.max_migrations_per_round
        first = True
        chunk = 1
        while len(moves) < limit:
            mean = float(board.tpot.mean())
            worst = int(np.argmax(np.where(exhausted, -np.inf, board.tpot)))
            best = int(np.argmin(board.tpot))
            gap = board.tpot[worst] - board.tpot[best]
            threshold = max(cfg.balance_threshold_ms, cfg.balance_threshold * mean)
            if exhausted[worst] or gap <= threshold:
                return
            gated = cfg.balance_noise_z > 0 and board.n >= cfg.balance_noise_min_replicas
            if gated:
                median = _median(board.tpot)
                sigma = 1.4826 * _median(np.abs(board.tpot - median))
                if board.tpot[worst] - median <= cfg.balance_noise_z * sigma:
                    return  # the worst replica is within chance spread of the rest
            if first and cfg.scale_migrations_with_gap:
                extra = math.ceil(cfg.max_migrations_per_round * (gap / threshold - 1.0))
                limit = len(moves) + min(cfg.max_migrations_per_round, max(extra, 1))
                if not cfg.balance_own_budget:
                    limit = min(limit, cfg.max_migrations_per_round)
            first = False
            if chunk == 1:
                order = np.array([worst])
            else:  # the next worst (ties by position, np.argmax's order) while they pass too
                waiting = np.flatnonzero(~exhausted)
                order = waiting[np.argsort(-board.tpot[waiting], kind="stable")]
                passes = board.tpot[order] - board.tpot[best] > threshold
                if gated:
                    passes &= board.tpot[order] - median > cfg.balance_noise_z * sigma
                stop = np.flatnonzero(~passes)
                order = order[: stop[0] if stop.size else order.shape[0]]
            sources = order[:chunk]
            found = self._best_move(board, movable, sources, best)
            if found is None:
                exhausted[sources] = True
                chunk *= 2
                continue
            k, row, work, tpot = found
            exhausted[sources[:k]] = True
            self._move(board, movable, moves, row, best, work, tpot)
            chunk = 1

    def _best_move(
        self, board: Board, movable: np.ndarray, sources: np.ndarray, best: int
    ) -> tuple[int, int, np.ndarray, np.ndarray] | None:
        """The first of ``sources`` (in order) with a candidate (longest remaining first) whose
        move to ``best`` fits its memory, improves the pair and recoups its transfer cost:
        ``(index in sources, row, the move's work and TPOTs)`` (:meth:`Board.tpot_moved`).
        All the sources' candidates are evaluated at once."""
        cfg = self.config
        per = [self._candidates(board, movable, int(src)) for src in sources]
        rows = np.concatenate(per)
        if rows.size == 0:
            return None
        counts = [r.shape[0] for r in per]
        owner = np.repeat(np.arange(len(per)), counts)
        src = sources[owner]
        kv, rem = board.kv[rows], board.rem[rows]
        fits = board.peak_pairs(kv, rem, np.full(rows.shape[0], best)) <= board.budget[best]
        tpot_src, tpot_dst, work = board.tpot_moved(rows, best)
        before = board.tpot[src]
        improves = np.maximum(tpot_src, tpot_dst) < before  # the pair must improve
        if cfg.net_gain:
            saved_ms = board.token_time_saved(rows, best, tpot_src, tpot_dst)
        else:
            horizon = float(cfg.horizon_steps)
            # Summed in row order, as the rows of a replica were always summed.
            others = [np.minimum(board.rem[np.sort(board.rows_of(int(s)))], horizon).sum()
                      for s in sources]
            others_tokens = np.repeat(np.array(others, dtype=np.float64), counts)
            own = np.minimum(rem, horizon)
            saved_ms = (before - tpot_dst) * own + (before - tpot_src) * (others_tokens - own)
        cost_ms = self.transfer.migration_ms(kv)  # elementwise over the candidates
        if cfg.gate_full_cost and self.transfer.copy_slowdown > 0:
            both = board.batch[src, 0] + board.batch[best, 0]
            cost_ms = cost_ms + self.transfer.copy_slowdown * self.transfer.copy_ms(kv) * both
        ok = np.flatnonzero(fits & improves & (saved_ms >= cfg.recoup_factor * cost_ms))
        if ok.size == 0:
            return None
        i = int(ok[0])  # rows are in source order: the first source with a move, its first
        return int(owner[i]), int(rows[i]), work[i], np.array([tpot_src[i], tpot_dst[i]])
