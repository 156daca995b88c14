"""The headroom study's paired interval (benchmarks/headroom.py) and the goodput scan's
crossing (benchmarks/goodput_map.py), on hand-computed cases."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from headroom import paired_interval  # noqa: E402


def test_paired_interval_of_log_ratios() -> None:
    # Per-seed log ratios 0.2, 0.0, 0.1: mean 0.1, sd 0.1, se 0.1 / sqrt(3); t(0.975, 2) is
    # 4.303, so the half width is 0.2484. Seed 3 exists on one side only and is not paired.
    mine = {0: 10 * math.exp(0.2), 1: 10.0, 2: 10 * math.exp(0.1), 3: 99.0}
    theirs = {0: 10.0, 1: 10.0, 2: 10.0}
    ratio, low, high, seeds = paired_interval(mine, theirs)
    assert seeds == 3
    assert ratio == pytest.approx(math.exp(0.1))
    assert low == pytest.approx(math.exp(0.1 - 0.2484), abs=1e-4)
    assert high == pytest.approx(math.exp(0.1 + 0.2484), abs=1e-4)


def test_paired_interval_needs_two_shared_seeds() -> None:
    assert paired_interval({0: 1.0, 1: 2.0}, {1: 2.0, 2: 3.0}) is None


def test_goodput_crossing_interpolates_in_log_rate() -> None:
    from goodput_map import crossing, goodputs

    rates = [1.0, 2.0, 4.0]
    # Passes 0.9 at 2 (0.95) and fails at 4 (0.75): a quarter of the way in attainment, so a
    # quarter of the way from log 2 to log 4.
    rate, flag = crossing(rates, [1.0, 0.95, 0.75], 0.9)
    assert flag == "" and rate == pytest.approx(2.0 * 2.0 ** 0.25)
    assert crossing(rates, [1.0, 0.95, 0.75], 0.99)[0] == pytest.approx(2.0 ** 0.2)
    assert crossing(rates, [0.5, 0.4, 0.1], 0.9) == (0.5, "below-grid")
    assert crossing(rates, [1.0, 1.0, 0.995], 0.99) == (4.0, "above-grid")
    # A dip and recovery counts from the first failure (the highest rate below it).
    assert crossing(rates, [0.95, 0.85, 0.95], 0.9)[0] == pytest.approx(2.0 ** 0.5)
    rows = [{"replicas": 4, "kv_units": 16.0, "migration": "fast", "variant": "ares",
             "seed": 0, "rate": r, "slo_attainment": a}
            for r, a in ((4.0, 0.75), (1.0, 1.0), (2.0, 0.95))]  # any order
    (got,) = goodputs(rows).values()
    assert got[0][0.9][0] == pytest.approx(2.0 * 2.0 ** 0.25)
