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
90th percentile over the rounds of each phase in ms, and the decisions of the last round.
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

from ares_jax.scheduler import (
    ClusterSnapshot,
    Policy,
    PolicyState,
    build_cost_model,
    make_policy,
)
from ares_jax.sim import ClusterConfig, SimConfig, Simulator
from ares_jax.sim.replica import pages_for
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


def time_rounds(sim: Simulator, policy: Policy, pending: tuple, rounds: int) -> dict:
    """Median and p90 ms of each phase over ``rounds`` rounds."""
    needs_table = policy.needs_request_table or policy.migrates
    phases: dict[str, list[float]] = {k: [] for k in
                                      ("snapshot", "reschedule", "dispatch", "dispatch_cold")}
    state = PolicyState()
    migrations = dispatches = 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        snap = sim._snapshot((), with_table=needs_table)
        t1 = time.perf_counter()
        if policy.migrates:
            moved, _ = policy.reschedule(snap, state)
            migrations = len(moved.migrations)
        t2 = time.perf_counter()
        placed, _ = policy.dispatch(snap.with_pending(pending), state)
        t3 = time.perf_counter()
        dispatches = len(placed.dispatches)
        fresh = sim._snapshot(pending, with_table=policy.needs_request_table)
        t4 = time.perf_counter()
        policy.dispatch(fresh, state)
        t5 = time.perf_counter()
        for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t5 - t4), strict=True):
            phases[key].append(dt * 1e3)
        for rep in sim.decode:  # one decode step: a new snapshot next round
            rep.steps += 1
    total = [a + b + c for a, b, c in zip(phases["snapshot"], phases["reschedule"],
                                          phases["dispatch"], strict=True)]
    out = {f"{k}_ms": round(float(np.median(v)), 3) for k, v in phases.items()}
    out |= {f"{k}_ms_p90": round(float(np.percentile(v, 90)), 3) for k, v in phases.items()}
    out |= {"round_ms": round(float(np.median(total)), 3),
            "round_ms_p90": round(float(np.percentile(total, 90)), 3),
            "migrations": migrations, "dispatches": dispatches}
    return out


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
        cfg = SimConfig(cluster=ClusterConfig(decode_replicas=replicas))
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
