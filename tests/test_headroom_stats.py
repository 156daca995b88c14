"""The headroom study's paired interval (benchmarks/headroom.py), on a hand-computed case."""

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
