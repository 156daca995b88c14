"""The simulator's migration-cost knobs: a separate migration link, the copy slowing both
replicas' decode steps, and a per-minute cap on migrations started."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_sim_simulator import ShuffleEverything, assert_conserved, config, run, synthetic

from ares_jax.cluster.migration import MigrationConfig, StartLimiter
from ares_jax.scheduler import LeastLoadPolicy
from ares_jax.sim.config import SimClusterConfig


def _shuffle_cfg(cap: int = 0, **cluster: float):  # noqa: ANN202 - a SimConfig
    cfg = config(scale=0.05, link_gbytes_per_s=0.5, **cluster)
    migration = dataclasses.replace(cfg.cluster.migration, max_starts_per_minute=cap)
    return dataclasses.replace(cfg, reschedule_period_s=0.1,
                               cluster=dataclasses.replace(cfg.cluster, migration=migration))


def test_cap_bounds_migrations_started_per_minute() -> None:
    sim = run(synthetic(120, long=True), ShuffleEverything(), _shuffle_cfg(cap=3))
    c = sim.result.counters
    minutes = int(np.ceil(float(np.nanmax(sim.result.finish_s)) / 60.0))
    assert 0 < c["migrations_started"] <= 3 * minutes
    assert c["migrations_capped"] > 0  # the shuffler asks for far more
    uncapped = run(synthetic(120, long=True), ShuffleEverything(), _shuffle_cfg()).result
    assert uncapped.counters["migrations_capped"] == 0
    assert uncapped.counters["migrations_started"] > c["migrations_started"]
    assert_conserved(sim)


def test_copy_slowdown_slows_only_replicas_that_copy() -> None:
    w = synthetic(120, long=True)
    free = run(w, ShuffleEverything(), _shuffle_cfg()).result
    slow = run(w, ShuffleEverything(), _shuffle_cfg(migration_slowdown=1.0))
    # Copies in flight double the step time of both replicas: decoding takes longer.
    assert np.nanmax(slow.result.finish_s) > np.nanmax(free.finish_s)
    assert all(rep.copying == 0 for rep in slow.decode)  # every copy ended, counted down
    assert_conserved(slow)
    # A policy that never migrates never copies: the knob changes nothing.
    a = run(w, LeastLoadPolicy(), config(scale=0.05)).result
    b = run(w, LeastLoadPolicy(), config(scale=0.05, migration_slowdown=1.0)).result
    np.testing.assert_array_equal(a.finish_s, b.finish_s)


def test_migration_link_is_separate_from_the_prefill_link() -> None:
    sim = run(synthetic(50), ShuffleEverything(), _shuffle_cfg(migration_link_gbytes_per_s=5.0))
    assert sim.transfer.link_gbytes_per_s == 0.5  # prefill -> decode
    assert sim.mig_transfer.link_gbytes_per_s == 5.0  # decode -> decode
    assert sim.mig_transfer.copy_slowdown == 0.0
    default = run(synthetic(50), ShuffleEverything(), _shuffle_cfg())
    assert default.mig_transfer.link_gbytes_per_s == 0.5  # 0 = the same link


def test_negative_knobs_are_refused() -> None:
    with pytest.raises(ValueError, match="migration_slowdown"):
        SimClusterConfig(migration_slowdown=-0.1)
    with pytest.raises(ValueError, match="max_starts_per_minute"):
        MigrationConfig(max_starts_per_minute=-1)


def test_start_limiter_slides_a_60_second_window() -> None:
    limiter = StartLimiter(2)
    assert not limiter.full(0.0)
    limiter.record(0.0)
    limiter.record(10.0)
    assert limiter.full(10.0) and limiter.full(59.9)
    assert not limiter.full(60.0)  # the start at 0 s has left the window
    limiter.record(60.0)
    assert limiter.full(69.9) and not limiter.full(70.0)
    unlimited = StartLimiter(0)
    for t in range(100):
        unlimited.record(float(t))
    assert not unlimited.full(100.0)
