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
from functools import lru_cache

import numpy as np

from ares_jax.config import config
from ares_jax.scheduler.cost import StepCostModel, TransferCost
from ares_jax.scheduler.load import (
    kv_alive_at,
    peak_kv,
    sample_times,
    steps_to_overflow,
    trajectories,
    weighted_tpot,
)
from ares_jax.scheduler.policies import DISPATCH_SCORES
from ares_jax.scheduler.state import (
    ClusterSnapshot,
    Decisions,
    Dispatch,
    Migration,
    PendingDispatch,
    PolicyState,
    RequestTable,
)


@config
class AresConfig:
    horizon_steps: int = 2048  # decode steps the TPOT forecast looks ahead
    # Steps the memory forecast (predicted peak KV) looks ahead. Looking to every request's
    # predicted end (32768) with deferral was tried and lost: see docs/results_sim.md.
    memory_horizon_steps: int = 2048
    samples: int = 9  # sample points of the TPOT average over the horizon
    memory_target: float = 0.95  # the predicted peak may use this fraction of capacity
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
    # Dispatch: fall back to a current-load policy's choice (if it fits the memory budget)
    # unless ARES's choice predicts a TPOT lower by more than this fraction. 0 disables it.
    dispatch_min_gain: float = 0.2
    dispatch_fallback: str = "llumnix"  # or "least-load"
    # ... only with at least this many replicas. The arg-min over many noisy predictions is
    # biased towards the luckiest one (winner's curse); on 4 replicas the fallback also helped
    # P99 TPOT over 4 trace seeds (results_sim.md), so it is on whenever there is a choice.
    dispatch_fallback_min_replicas: int = 2
    cooldown_s: float = 10.0
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


def estimate_remaining(table: RequestTable, cfg: AresConfig) -> np.ndarray:
    """Remaining tokens per row: prediction (or truth for the oracle), prior when unknown,
    clipped to what ``max_tokens`` still allows."""
    rem = table.predicted_remaining
    if cfg.use_true_remaining:
        rem = np.where(np.isnan(table.true_remaining), rem, table.true_remaining)
    rem = np.where(np.isnan(rem), cfg.prior_remaining_tokens, rem)
    allowed = np.maximum(table.max_tokens - table.generated_tokens, 0)
    return np.clip(rem, 0.0, allowed).astype(np.float64)


def pending_remaining(p: PendingDispatch, cfg: AresConfig) -> float:
    rem = p.predicted_remaining
    if cfg.use_true_remaining and p.true_remaining is not None:
        rem = p.true_remaining
    if rem is None:
        rem = cfg.prior_remaining_tokens
    return float(np.clip(rem, 0.0, max(p.max_tokens - p.generated_tokens, 0)))


@dataclass(frozen=True, eq=False)
class _BaseForecast:
    kv: np.ndarray
    rem: np.ndarray
    rep: np.ndarray
    batch: np.ndarray
    memory: np.ndarray
    peak: np.ndarray
    peak_at: np.ndarray
    tpot: np.ndarray


@lru_cache(maxsize=4)
def _base_forecast(
    table: RequestTable, num_replicas: int, cost: StepCostModel, cfg: AresConfig
) -> _BaseForecast:
    """The forecast of a request table. Memoised on the table's identity: a caller that reuses
    a snapshot for several dispatch calls (a scheduler polling replica state periodically, as
    Llumnix does) pays for it once."""
    kv = table.kv_tokens.astype(np.float64)
    rem = estimate_remaining(table, cfg)
    rep = table.replica.astype(np.int64)
    times = sample_times(cfg.horizon_steps, cfg.samples)
    batch, memory = trajectories(kv, rem, rep, num_replicas, times)
    peak, peak_at = peak_kv(kv, rem, rep, num_replicas, cfg.memory_horizon_steps)
    return _BaseForecast(kv=kv, rem=rem, rep=rep, batch=batch, memory=memory, peak=peak,
                         peak_at=peak_at, tpot=weighted_tpot(cost, batch, memory))


class _Board:
    """Mutable forecast of every replica for the duration of one policy call."""

    def __init__(
        self,
        snapshot: ClusterSnapshot,
        cost: StepCostModel,
        cfg: AresConfig,
    ) -> None:
        self.cost = cost
        self.horizon = cfg.memory_horizon_steps
        self.times = sample_times(cfg.horizon_steps, cfg.samples)
        self.n = snapshot.num_replicas
        self.idle = (snapshot.batch_size == 0) & (snapshot.queued_count == 0)
        base = _base_forecast(snapshot.table(), self.n, cost, cfg)
        self.kv, self.rem, self.rep = base.kv, base.rem, base.rep.copy()
        self.batch, self.memory = base.batch.copy(), base.memory.copy()
        self.peak, self.peak_at = base.peak.copy(), base.peak_at.copy()
        self.tpot = base.tpot.copy()
        # Memory outside the running batch (page rounding, transfers, reservations, queue)
        # does not grow; the running batch's trajectory must fit in what is left.
        fixed = snapshot.used_tokens - snapshot.running_kv_tokens + snapshot.queued_kv_tokens
        self.budget = cfg.memory_target * snapshot.kv_capacity_tokens - fixed

    def refresh(self, positions: list[int]) -> None:
        for pos in positions:
            rows = self.rep == pos
            kv, rem = self.kv[rows], self.rem[rows]
            zero = np.zeros(kv.shape[0], dtype=np.int64)
            b, m = trajectories(kv, rem, zero, 1, self.times)
            pk, pk_at = peak_kv(kv, rem, zero, 1, self.horizon)
            self.batch[pos], self.memory[pos] = b[0], m[0]
            self.peak[pos], self.peak_at[pos] = pk[0], pk_at[0]
            self.tpot[pos] = weighted_tpot(self.cost, b, m)[0]

    def place(self, kv: float, rem: float, pos: int, tpot: float, peak: float) -> None:
        """Add a request to ``pos`` with the forecast ``with_request`` computed for it."""
        d_batch, d_memory = self._added(kv, rem)
        self.batch[pos] += d_batch
        self.memory[pos] += d_memory
        self.tpot[pos] = tpot
        self.idle[pos] = False
        if peak > self.peak[pos]:
            self.peak[pos] = peak
            self.peak_at[pos] = min(rem, float(self.horizon))  # approximately where it moved
        self.kv = np.append(self.kv, kv)
        self.rem = np.append(self.rem, rem)
        self.rep = np.append(self.rep, pos)

    def _added(self, kv: float, rem: float) -> tuple[np.ndarray, np.ndarray]:
        alive = (rem > self.times).astype(np.float64)
        return alive, alive * (kv + self.times)

    def with_request(
        self, kv: float, rem: float, positions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Predicted ``(tpot, peak)`` of ``positions`` if the request joined each of them.

        The peak is exact at the old peak, at the request's own finish and at the samples.
        """
        d_batch, d_memory = self._added(kv, rem)
        batch = self.batch[positions] + d_batch
        memory = self.memory[positions] + d_memory
        tpot = weighted_tpot(self.cost, batch, memory)
        t_x = min(rem, float(self.horizon))
        if positions.size < self.n:
            wanted = np.zeros(self.n, dtype=bool)
            wanted[positions] = True
            rows = wanted[self.rep]
            alive_at_x = kv_alive_at(self.kv[rows], self.rem[rows], self.rep[rows], self.n, t_x)
        else:
            alive_at_x = kv_alive_at(self.kv, self.rem, self.rep, self.n, t_x)
        peak, peak_at = self.peak[positions], self.peak_at[positions]
        at_old_peak = np.where(rem >= peak_at, peak + kv + peak_at, peak)
        at_own_finish = alive_at_x[positions] + kv + t_x
        return tpot, np.maximum(np.maximum(at_old_peak, at_own_finish), memory.max(axis=1))

    def could_take(self, kv: float) -> np.ndarray:
        """Replicas that might fit a request of ``kv`` tokens (a necessary condition: the new
        peak is at least the old one and at least today's KV plus the request's)."""
        return np.flatnonzero(
            (self.peak <= self.budget) & (self.memory[:, 0] + kv <= self.budget)
        )

    def tpot_without(self, row: int) -> float:
        pos = int(self.rep[row])
        d_batch, d_memory = self._added(self.kv[row], self.rem[row])
        b = (self.batch[pos] - d_batch)[None, :]
        m = (self.memory[pos] - d_memory)[None, :]
        return float(weighted_tpot(self.cost, b, m)[0])

    def token_time_saved(self, row: int, dst: int, tpot_src: float, tpot_dst: float) -> float:
        """Token-time (token x ms) the cluster saves over the horizon if ``row`` moves to
        ``dst``, given the post-move TPOTs: the source's remaining tokens get faster, the
        destination's existing and the moved request's tokens run at the destination's new
        speed. Per sample, ``sum B * step = tpot * sum B``; samples are ``H / (S - 1)`` apart."""
        src = int(self.rep[row])
        d_batch, _ = self._added(self.kv[row], self.rem[row])
        tokens_src, tokens_dst, moved = self.batch[src].sum(), self.batch[dst].sum(), d_batch.sum()
        before = self.tpot[src] * tokens_src + self.tpot[dst] * tokens_dst
        after = tpot_src * (tokens_src - moved) + tpot_dst * (tokens_dst + moved)
        return float(before - after) * float(self.times[-1]) / max(len(self.times) - 1, 1)

    def overflow_steps(self) -> np.ndarray:
        """Predicted steps until each replica's running KV passes its budget (inf: never)."""
        return steps_to_overflow(self.kv, self.rem, self.rep, self.n, self.budget, self.horizon)

    def overflow_step_if(self, pos: int, row: int, *, joins: bool) -> float:
        """``overflow_steps()[pos]`` if ``row`` joined (or left) ``pos``."""
        rows = self.rep == pos
        rows[row] = joins
        kv, rem = self.kv[rows], self.rem[rows]
        zero = np.zeros(kv.shape[0], dtype=np.int64)
        return float(steps_to_overflow(kv, rem, zero, 1, self.budget[pos:pos + 1],
                                       self.horizon)[0])

    def move(self, row: int, dst: int) -> None:
        src = int(self.rep[row])
        self.rep[row] = dst
        self.refresh([src, dst])


@dataclass(frozen=True, eq=False)
class AresPolicy:
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
        board = _Board(snapshot, self.cost, self.config)
        everyone = np.arange(board.n)
        fallback = DISPATCH_SCORES[self.config.dispatch_fallback](snapshot)
        min_gain = self.config.dispatch_min_gain
        if board.n < self.config.dispatch_fallback_min_replicas:
            min_gain = 0.0
        out = []
        for p in snapshot.pending:
            rem = pending_remaining(p, self.config)
            tpot, peak = board.with_request(float(p.kv_tokens), rem, everyone)
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
            board.place(float(p.kv_tokens), rem, pos, tpot[pos], peak[pos])
            fallback.place(pos, p.kv_tokens)
        return Decisions(dispatches=tuple(out)), state

    def reschedule(
        self, snapshot: ClusterSnapshot, state: PolicyState
    ) -> tuple[Decisions, PolicyState]:
        table = snapshot.table()
        cfg = self.config
        if len(table) == 0 or snapshot.num_replicas < 2:
            return Decisions(), state
        board = _Board(snapshot, self.cost, cfg)
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

    def _candidates(self, board: _Board, movable: np.ndarray, src: int) -> np.ndarray:
        """Movable rows of ``src``, longest predicted remaining first."""
        rows = np.flatnonzero((board.rep == src) & movable)
        order = np.argsort(-board.rem[rows], kind="stable")
        return rows[order][: self.config.candidates_per_replica]

    def _guard_memory(
        self, board: _Board, movable: np.ndarray, moves: list[tuple[int, int, int]]
    ) -> None:
        overflow = board.peak - board.budget
        if board.could_take(0.0).size == 0:
            return  # no replica has headroom: nowhere to move anything
        for src in [int(i) for i in np.argsort(-overflow) if overflow[i] > 0]:
            while (
                board.peak[src] > board.budget[src]
                and len(moves) < self.config.max_migrations_per_round
            ):
                rows = self._candidates(board, movable, src)
                # Only requests still alive at the peak lower it.
                rows = rows[board.rem[rows] >= board.peak_at[src]]
                chosen = None
                for row in rows:
                    dests = board.could_take(board.kv[row])
                    dests = dests[dests != src]
                    if dests.size == 0:
                        continue
                    tpot, peak = board.with_request(board.kv[row], board.rem[row], dests)
                    fits = peak <= board.budget[dests]
                    if fits.any():
                        chosen = (int(row), int(dests[np.argmin(np.where(fits, tpot, np.inf))]))
                        break
                if chosen is None:
                    break
                row, dst = chosen
                moves.append((row, src, dst))
                movable[row] = False
                board.move(row, dst)

    def _delay_overflow(
        self, board: _Board, movable: np.ndarray, moves: list[tuple[int, int, int]]
    ) -> None:
        cfg = self.config
        if cfg.oom_delay_steps <= 0:
            return
        crossing = board.overflow_steps()
        done = np.zeros(board.n, dtype=bool)
        while len(moves) < cfg.max_migrations_per_round:
            src = int(np.argmin(np.where(done, np.inf, crossing)))
            if done[src] or crossing[src] >= cfg.oom_delay_steps:
                return
            done[src] = True
            rows = self._candidates(board, movable, src)
            rows = rows[board.rem[rows] > crossing[src]]  # only these are there when it fills
            dests = [int(d) for d in np.argsort(-crossing, kind="stable") if d != src]
            best: tuple[float, int, int] | None = None
            for row in rows:
                src_after = board.overflow_step_if(src, int(row), joins=False)
                for dst in dests[: cfg.oom_delay_destinations]:
                    later = min(src_after, board.overflow_step_if(dst, int(row), joins=True))
                    gain = later - crossing[src]
                    if gain >= cfg.oom_delay_min_gain_steps and (best is None or later > best[0]):
                        best = (later, int(row), dst)
            if best is None:
                continue
            _, row, dst = best
            moves.append((row, src, dst))
            movable[row] = False
            board.move(row, dst)
            crossing = board.overflow_steps()
            done[src] = False  # it may still fill too soon

    def _balance(
        self, board: _Board, movable: np.ndarray, moves: list[tuple[int, int, int]]
    ) -> None:
        cfg = self.config
        exhausted = np.zeros(board.n, dtype=bool)
        limit = cfg.max_migrations_per_round
        first = True
        while len(moves) < limit:
            mean = float(board.tpot.mean())
            worst = int(np.argmax(np.where(exhausted, -np.inf, board.tpot)))
            best = int(np.argmin(board.tpot))
            gap = board.tpot[worst] - board.tpot[best]
            threshold = max(cfg.balance_threshold_ms, cfg.balance_threshold * mean)
            if exhausted[worst] or gap <= threshold:
                return
            if cfg.balance_noise_z > 0 and board.n >= cfg.balance_noise_min_replicas:
                median = float(np.median(board.tpot))
                sigma = 1.4826 * float(np.median(np.abs(board.tpot - median)))
                if board.tpot[worst] - median <= cfg.balance_noise_z * sigma:
                    return  # the worst replica is within chance spread of the rest
            if first and cfg.scale_migrations_with_gap:
                extra = math.ceil(cfg.max_migrations_per_round * (gap / threshold - 1.0))
                limit = len(moves) + min(cfg.max_migrations_per_round, max(extra, 1))
            first = False
            row = self._best_move(board, movable, worst, best)
            if row is None:
                exhausted[worst] = True
                continue
            moves.append((row, worst, best))
            movable[row] = False
            board.move(row, best)

    def _best_move(
        self, board: _Board, movable: np.ndarray, worst: int, best: int
    ) -> int | None:
        cfg = self.config
        horizon = float(cfg.horizon_steps)
        before = board.tpot[worst]
        on_worst = board.rep == worst
        others_tokens = np.minimum(board.rem[on_worst], horizon).sum()
        dst = np.array([best])
        for row in self._candidates(board, movable, worst):
            tpot_dst, peak_dst = board.with_request(board.kv[row], board.rem[row], dst)
            if peak_dst[0] > board.budget[best]:
                continue
            tpot_src = board.tpot_without(int(row))
            if max(tpot_src, tpot_dst[0]) >= before:
                continue  # the pair must improve
            if cfg.net_gain:
                saved_ms = board.token_time_saved(int(row), best, tpot_src, tpot_dst[0])
            else:
                own = min(board.rem[row], horizon)
                saved_ms = ((before - tpot_dst[0]) * own
                            + (before - tpot_src) * (others_tokens - own))
            if saved_ms >= cfg.recoup_factor * self.transfer.migration_ms(board.kv[row]):
                return int(row)
        return None
