"""Goodput search: the bracket-and-bisect logic and its monotone behaviour on the simulator."""

from __future__ import annotations

import dataclasses

import pytest
from test_sim_simulator import COST, synthetic

from ares_jax.sim.config import SimClusterConfig, SimConfig
from ares_jax.sim.goodput import find_goodput, search_rate
from ares_jax.sim.metrics import attainment
from ares_jax.sim.simulator import simulate


@pytest.mark.parametrize("threshold", [0.3, 7.0, 123.0])
def test_search_rate_finds_a_step_threshold(threshold: float) -> None:
    seen = []

    def passes(rate: float) -> bool:
        seen.append(rate)
        return rate <= threshold

    found = search_rate(passes, 5.0, tolerance=0.01)
    assert found <= threshold < found * 1.02
    assert len(seen) < 30


def test_search_rate_when_nothing_passes() -> None:
    assert search_rate(lambda r: False, 1.0) == 0.0


def test_goodput_on_the_simulator(monkeypatch: pytest.MonkeyPatch) -> None:
    import ares_jax.sim.goodput as goodput

    monkeypatch.setattr(goodput, "simulate",
                        lambda w, p, c: simulate(w, p, c, cost=COST))
    cfg = SimConfig(cluster=SimClusterConfig(decode_replicas=2, prefill_replicas=1,
                                          kv_capacity_scale=0.05))
    cfg = dataclasses.replace(cfg, slo=dataclasses.replace(cfg.slo, tpot_ms=12.0))
    w = synthetic(150, long=False)
    res = find_goodput(w, "least-load", cfg, start_rate=5.0, tolerance=0.1)
    assert res.goodput_req_s > 0
    at_goodput = attainment(simulate(w.at_rate(res.goodput_req_s), "least-load", cfg, cost=COST),
                            cfg.slo)
    assert at_goodput >= cfg.slo.attainment
    overloaded = attainment(simulate(w.at_rate(8 * res.goodput_req_s), "least-load", cfg,
                                     cost=COST), cfg.slo)
    assert overloaded < at_goodput  # far more load, fewer requests within SLO
    rates = [e["rate_req_s"] for e in res.evaluations]
    assert rates == sorted(rates) and res.goodput_req_s in rates
