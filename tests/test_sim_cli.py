"""``ares-jax simulate`` smoke runs on tiny configs (a trace file, so no shared data needed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from ares_jax.scheduler.cost import default_grid_path
from ares_jax.sim import cli as sim_cli

pytestmark = pytest.mark.skipif(not default_grid_path().is_file(),
                                reason="../shared/data/costmodel/aic_grid.csv absent")


def main(argv: list[str]) -> int:
    """``ares-jax`` with only the ``simulate`` subcommand registered (what these tests need:
    the other subsystems' subcommands import packages that may be absent in a checkout)."""
    parser = argparse.ArgumentParser(prog="ares-jax")
    sim_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def tiny_trace(tmp_path: Path, n: int = 120) -> Path:
    rng = np.random.default_rng(0)
    rows = ["arrival_s,prompt_tokens,output_tokens"]
    t = 0.0
    for _ in range(n):
        t += rng.exponential(0.1)
        rows.append(f"{t:.4f},{rng.integers(10, 800)},{rng.integers(2, 400)}")
    path = tmp_path / "trace.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_simulate_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tiny_trace(tmp_path)
    code = main(["simulate", "--trace", str(trace), "--decode-replicas", "2",
                 "--prefill-replicas", "1", "--rate", "5,10", "--policy", "static,ares",
                 "--json", "--plot", str(tmp_path / "plots"), "--set", "ares.horizon_steps=512"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 120 and len(out["results"]) == 4
    first = out["results"][0]
    assert first["policy"] == "static" and first["rate_req_s"] == 5.0
    assert 0 <= first["slo_attainment"] <= 1 and first["tpot_ms_p99"] > 0
    assert (tmp_path / "plots" / "tpot_p99_vs_rate.png").stat().st_size > 0
    assert (tmp_path / "plots" / "load_timelines.png").stat().st_size > 0


def test_simulate_goodput_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tiny_trace(tmp_path, 60)
    code = main(["simulate", "goodput", "--trace", str(trace), "--decode-replicas", "1",
                 "--prefill-replicas", "1", "--rate", "20", "--policy", "least-load",
                 "--slo-tpot", "8", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    (entry,) = out["goodput"]
    assert entry["policy"] == "least-load" and entry["goodput_req_s"] > 0
    assert entry["goodput_req_s_per_gpu"] == pytest.approx(entry["goodput_req_s"] / 2)


def test_simulate_rejects_unknown_policy(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", "--trace", str(tiny_trace(tmp_path, 5)), "--policy", "magic"])


def test_a_trace_runs_whole_unless_requests_cuts_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # More rows than the sampled workloads' default of 2,000: all of them run.
    trace = tiny_trace(tmp_path, 2100)
    common = ["simulate", "--trace", str(trace), "--decode-replicas", "2",
              "--prefill-replicas", "1", "--rate", "40", "--policy", "static"]
    assert main([*common, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 2100
    assert out["results"][0]["requests"] == 2100
    assert main(common) == 0
    assert "trace: 2100 requests" in capsys.readouterr().out
    assert main([*common, "--requests", "300", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["requests"] == 300
