"""Cost of one scheduling decision round at scale: snapshot, reschedule, dispatch.

A round is what a global scheduler does every rescheduling period: poll the decode replicas
into a :class:`ClusterSnapshot`, ask the policy for migrations (``reschedule``), and place the
requests whose prefill finished (``dispatch``, on the same snapshot). The cluster state is a
random one (``ares_jax.sim.synthetic.random_snapshot``: uneven load, a few hot replicas, idle
replicas, missing predictions, migrating and cooling-down requests) loaded into a
:class:`Simulator`, so the snapshot phase is the simulator's own columnar build (including its
prediction error model over every running request).

    .venv/bin/python benchmarks/decision_round.py [--replicas 16,64,256] [--requests 32,128]
        [--policy static,least-load,llumnix,ares] [--rounds 20] [--pending 8]
        [--scenario mixed|overflow]

JSON on stdout: for every (policy, replicas, running requests per replica), the median and the
90th percentile over the rounds of each phase in ms (wall time, and ``cpu_`` the process's CPU
time), and how many migrations and dispatches the last round decided.
``dispatch_cold_ms`` is a dispatch on a snapshot nothing was computed on yet (what a dispatch
between two reschedule ticks costs right after a poll). Between rounds every replica advances
one decode step, so each round sees a new snapshot (nothing is memoised across rounds).
``overflow`` is a cluster where every replica's predicted peak is over its budget: the rounds
where the OOM guard finds nowhere to move and the overflow-delay phase examines every replica.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

from ares_jax.paging import pages_for
from ares_jax.scheduler import (
    ClusterSnapshot,
    Policy,
    PolicyState,
    build_cost_model,
    make_policy,
)
from ares_jax.sim import SimClusterConfig, SimConfig, Simulator
from ares_jax.sim.simulator import cluster_transfer
from ares_jax.sim.synthetic import random_snapshot
from ares_jax.sim.workloads import Workload

SCENARIOS: dict[str, dict[str, object]] = {
    "mixed": {},
    "overflow": {"fill": (2.1, 2.12), "hot_fraction": 0.0, "idle_fraction": 0.0},
}


def loaded_simulator(snapshot: ClusterSnapshot, policy: str, cfg: SimConfig) -> Simulator:
    """A simulator whose decode replicas run exactly the snapshot's requests (the rest of the
    simulator state is empty: nothing is queued, nothing in flight)."""
    table = snapshot.table()
    n = len(table)
    gen = table.generated_tokens.astype(np.int64)
    kv = table.kv_tokens.astype(np.int64)
    workload = Workload(
        name="synthetic", arrival_s=np.arange(n, dtype=np.float64) * 1e-3,
        prompt_tokens=np.maximum(kv - gen, 1), output_tokens=gen + table.true_remaining.astype(
            np.int64), max_tokens=int(table.max_tokens.max()),
    )
    c = cfg.cluster
    cost = build_cost_model(c.cost_model, c.model, c.gpu, c.tp)
    sim = Simulator(workload, make_policy(policy, cost=cost, transfer=cluster_transfer(cfg),
                                          ares=cfg.ares, llumnix=cfg.llumnix), cfg, cost=cost)
    sim.now = snapshot.now
    for r in range(n):
        rep = sim.decode[int(table.replica[r])]
        sim.kv_cur[r], sim.gen_cur[r] = int(kv[r]), int(gen[r])
        sim._join(rep, r)
        rep.used_pages += pages_for(int(kv[r]), sim.page)
    sim.migrating[:] = table.migrating
    sim.last_migrated[:] = table.last_migrated_at
    return sim


PHASES = ("snapshot", "reschedule", "dispatch", "dispatch_cold")


def time_rounds(sim: Simulator, policy: Policy, pending: tuple, rounds: int) -> dict:
    """Median and p90 ms of each phase over ``rounds`` rounds: wall time, and the process's
    CPU time (``cpu_``: on a machine shared with other jobs, closer to what the code costs)."""
    needs_table = policy.needs_request_table or policy.migrates
    wall: dict[str, list[float]] = {k: [] for k in PHASES}
    cpu: dict[str, list[float]] = {k: [] for k in PHASES}
    state = PolicyState()
    migrations = dispatches = 0

    def clocks() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    for _ in range(rounds):
        marks = [clocks()]
        snap = sim._snapshot((), with_table=needs_table)
        marks.append(clocks())
        if policy.migrates:
            moved, _ = policy.reschedule(snap, state)
            migrations = len(moved.migrations)
        marks.append(clocks())
        placed, _ = policy.dispatch(snap.with_pending(pending), state)
        marks.append(clocks())
        dispatches = len(placed.dispatches)
        fresh = sim._snapshot(pending, with_table=policy.needs_request_table)
        marks.append(clocks())
        policy.dispatch(fresh, state)
        marks.append(clocks())
        spans = [(0, 1), (1, 2), (2, 3), (4, 5)]
        for key, (a, b) in zip(PHASES, spans, strict=True):
            wall[key].append((marks[b][0] - marks[a][0]) * 1e3)
            cpu[key].append((marks[b][1] - marks[a][1]) * 1e3)
        for rep in sim.decode:  # one decode step: a new snapshot next round
            rep.steps += 1
    out: dict[str, float | int] = {}
    for prefix, series in (("", wall), ("cpu_", cpu)):
        total = [sum(v) for v in zip(series["snapshot"], series["reschedule"],
                                     series["dispatch"], strict=True)]
        for key, values in (*series.items(), ("round", total)):
            out[f"{prefix}{key}_ms"] = round(float(np.median(values)), 3)
            out[f"{prefix}{key}_ms_p90"] = round(float(np.percentile(values, 90)), 3)
    return out | {"migrations": migrations, "dispatches": dispatches}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", default="16,64,256")
    p.add_argument("--requests", default="32,128", help="running requests per replica")
    p.add_argument("--policy", default="static,least-load,llumnix,ares")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--pending", type=int, default=8, help="requests to dispatch per round")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="mixed")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = []
    for replicas in [int(x) for x in args.replicas.split(",")]:
        cfg = SimConfig(cluster=SimClusterConfig(decode_replicas=replicas))
        for per in [int(x) for x in args.requests.split(",")]:
            rng = np.random.default_rng(args.seed)
            snap = random_snapshot(rng, replicas, per, pending=args.pending,
                                   **SCENARIOS[args.scenario])
            for name in args.policy.split(","):
                sim = loaded_simulator(snap, name, cfg)
                row = {"policy": name, "replicas": replicas, "requests_per_replica": per,
                       "running": len(snap.table())}
                row |= time_rounds(sim, sim.policy, snap.pending, args.rounds)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    print(json.dumps({"command": " ".join(sys.argv), "scenario": args.scenario,
                      "rounds": args.rounds, "pending": args.pending,
                      "python": platform.python_version(), "numpy": np.__version__,
                      "results": rows}, indent=2))


if __name__ == "__main__":
    main()
