"""Interleaved A/B of one decision round: this tree's ARES against another checkout's.

Separate runs of ``decision_round.py`` drift with a shared machine (the same code's round
varied 1.5x from minute to minute there). Here both policies run in one process: every round
polls one snapshot for each (the same simulator state), times ``reschedule`` and ``dispatch``
of both, alternating which goes first, and checks that they decided the same. The other
tree's ``ares_jax/scheduler`` package is copied into a temporary directory under another name
(its imports rewritten), so the simulator and cluster state are this tree's for both.

    mkdir -p /tmp/decision_base && git archive <commit> | tar -x -C /tmp/decision_base
    .venv/bin/python benchmarks/decision_round_ab.py --base /tmp/decision_base
        [--replicas 256] [--requests 128] [--rounds 60] [--scenario mixed|overflow]

JSON on stdout: for each phase (snapshot, reschedule, dispatch, round), the median ms, wall and
CPU, of base and this tree and their ratio; ``same_decisions``: every round's migrations and
dispatches matched.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decision_round import SCENARIOS, loaded_simulator  # noqa: E402

from ares_jax.scheduler import PolicyState  # noqa: E402
from ares_jax.scheduler.cost import default_grid_path  # noqa: E402
from ares_jax.sim import SimConfig  # noqa: E402
from ares_jax.sim.simulator import cluster_transfer  # noqa: E402
from ares_jax.sim.synthetic import random_snapshot  # noqa: E402

PHASES = ("snapshot", "reschedule", "dispatch")


def base_package(tree: Path, into: Path) -> object:
    """``tree``'s scheduler package, importable as ``ares_base_scheduler``."""
    dst = into / "ares_base_scheduler"
    shutil.copytree(tree / "ares_jax" / "scheduler", dst)
    for f in dst.glob("*.py"):
        f.write_text(f.read_text().replace("ares_jax.scheduler", "ares_base_scheduler"))
    sys.path.insert(0, str(into))
    return importlib.import_module("ares_base_scheduler")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="checkout of the other tree")
    p.add_argument("--replicas", type=int, default=256)
    p.add_argument("--requests", type=int, default=128, help="running requests per replica")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--pending", type=int, default=8)
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="mixed")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    default = SimConfig()
    cfg = dataclasses.replace(default, cluster=dataclasses.replace(
        default.cluster, decode_replicas=args.replicas))
    snap = random_snapshot(np.random.default_rng(args.seed), args.replicas, args.requests,
                           pending=args.pending, **SCENARIOS[args.scenario])
    sim = loaded_simulator(snap, "ares", cfg)
    with tempfile.TemporaryDirectory() as tmp:
        bs = base_package(args.base, Path(tmp))
        c = cfg.cluster
        ares = bs.AresConfig(**{f.name: getattr(cfg.ares, f.name)
                                for f in dataclasses.fields(bs.AresConfig)})
        # (the grid's path: this tree's, the copy does not sit where the default looks)
        cost = bs.build_cost_model(c.cost_model, c.model, c.gpu, c.tp, default_grid_path())
        policies = {"base": bs.make_policy("ares", cost=cost, transfer=cluster_transfer(cfg),
                                           ares=ares),
                    "this": sim.policy}
        times = {(n, ph, k): [] for n in policies for ph in (*PHASES, "round")
                 for k in ("wall", "cpu")}
        same = True
        for i in range(args.rounds + 2):  # the first two warm up
            decided = {}
            for name in ("base", "this") if i % 2 else ("this", "base"):
                policy = policies[name]
                marks = [(time.perf_counter(), time.process_time())]
                now = sim._snapshot((), with_table=True)
                marks.append((time.perf_counter(), time.process_time()))
                moved, _ = policy.reschedule(now, PolicyState())
                marks.append((time.perf_counter(), time.process_time()))
                placed, _ = policy.dispatch(now.with_pending(snap.pending), PolicyState())
                marks.append((time.perf_counter(), time.process_time()))
                decided[name] = ([(m.request_id, m.src, m.dst) for m in moved.migrations],
                                 [(d.request_id, d.replica_id) for d in placed.dispatches])
                if i < 2:
                    continue
                for k, clock in enumerate(("wall", "cpu")):
                    for j, phase in enumerate(PHASES):
                        times[(name, phase, clock)].append(
                            (marks[j + 1][k] - marks[j][k]) * 1e3)
                    times[(name, "round", clock)].append((marks[3][k] - marks[0][k]) * 1e3)
            same &= decided["base"] == decided["this"]
            for rep in sim.decode:  # one decode step: a new snapshot next round
                rep.steps += 1
    out: dict[str, object] = {
        "command": " ".join(sys.argv), "base": str(args.base), "scenario": args.scenario,
        "replicas": args.replicas, "requests_per_replica": args.requests,
        "rounds": args.rounds, "same_decisions": same,
        "migrations": len(decided["this"][0]), "dispatches": len(decided["this"][1]),
    }
    for phase in (*PHASES, "round"):
        for clock in ("wall", "cpu"):
            b = float(np.median(times[("base", phase, clock)]))
            t = float(np.median(times[("this", phase, clock)]))
            out[f"{clock}_{phase}_ms"] = {"base": round(b, 3), "this": round(t, 3),
                                          "ratio": round(t / b, 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
