"""DistServe goodput: the highest request rate at which enough requests meet both SLOs.

The workload's request set is fixed; a rate rescales its arrival times. Search: from a starting
rate, double (or halve) until the attainment target is bracketed, then bisect until the bracket
is within ``tolerance`` (relative). Attainment is not strictly monotone in rate for a finite
trace, so the answer is the highest rate *seen* to pass below the lowest failing one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ares_jax.sim.config import SimConfig
from ares_jax.sim.metrics import summarize
from ares_jax.sim.simulator import simulate
from ares_jax.sim.workloads import Workload


@dataclass(frozen=True, kw_only=True)
class GoodputResult:
    policy: str
    target: float
    goodput_req_s: float  # 0 when even the lowest rate tried fails
    goodput_req_s_per_gpu: float
    evaluations: tuple[dict, ...] = field(default=())  # summaries at every rate tried


def search_rate(
    passes: Callable[[float], bool],
    start: float,
    *,
    tolerance: float = 0.05,
    max_doublings: int = 8,
) -> float:
    """Largest rate with ``passes(rate)`` below the smallest failing rate (0 if none passes)."""
    lo, hi = 0.0, None
    rate = start
    for _ in range(max_doublings):
        if passes(rate):
            lo = rate
            if hi is not None:
                break
            rate *= 2
        else:
            hi = rate
            if lo > 0:
                break
            rate /= 2
    if hi is None or lo == 0.0:
        return lo
    while (hi - lo) / lo > tolerance:
        mid = 0.5 * (lo + hi)
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return lo


def find_goodput(
    workload: Workload,
    policy: str,
    cfg: SimConfig,
    *,
    start_rate: float | None = None,
    tolerance: float = 0.05,
    on_evaluation: Callable[[dict], None] | None = None,
) -> GoodputResult:
    evaluations: list[dict] = []

    def passes(rate: float) -> bool:
        summary = summarize(simulate(workload.at_rate(rate), policy, cfg), cfg.slo)
        summary["rate_req_s"] = rate
        evaluations.append(summary)
        if on_evaluation is not None:
            on_evaluation(summary)
        return summary["slo_attainment"] >= cfg.slo.attainment

    rate = search_rate(passes, start_rate or workload.native_rate, tolerance=tolerance)
    c = cfg.cluster
    gpus = (c.prefill_replicas + c.decode_replicas) * c.tp
    return GoodputResult(
        policy=policy,
        target=cfg.slo.attainment,
        goodput_req_s=rate,
        goodput_req_s_per_gpu=rate / gpus,
        evaluations=tuple(sorted(evaluations, key=lambda e: e["rate_req_s"])),
    )
