"""Shared by the multi-process tests: what the same model produces in this process, waiting
for a condition, and closing a cluster of separately started processes."""

from __future__ import annotations

import time

import numpy as np

from ares_jax.client import Client
from ares_jax.cluster import ServingLoop
from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig, Request
from ares_jax.serving.local_cluster import process_alive

# The engine of the fault tests' replica processes (flags), and its in-process twin.
FAULT_ECFG = EngineConfig(page_size=8, num_pages=256, max_num_seqs=8, max_model_len=512)
FAULT_ENGINE = ["--model", "random:tiny", "--predictor", "none", "--num-pages", "256",
                "--max-model-len", "512", "--page-size", "8", "--max-num-seqs", "8",
                "--log-level", "INFO"]


def random_prompt(seed: int, n: int = 12) -> list[int]:
    return np.random.default_rng(seed).integers(4, 500, size=n).tolist()


def in_process_tokens(model, ecfg: EngineConfig, prompts: list[list[int]],
                      params: SamplingParams) -> list[list[int]]:
    """Tokens of ``prompts`` on one prefill and one decode engine of ``model`` in this
    process: the reference a cluster of the same model and engine settings must match."""
    loop = ServingLoop(PrefillEngine(model, ecfg), [DecodeEngine(model, ecfg)], None)
    for i, p in enumerate(prompts):
        loop.add_request(Request(request_id=f"r{i}", prompt_ids=p, params=params, index=i))
    while loop.has_work:
        loop.step()
    return [loop.finished[f"r{i}"].token_ids for i in range(len(prompts))]


def settled(client: Client, timeout_s: float = 30.0) -> dict:
    """Stats once nothing runs and every replica has reported its pages free (loads arrive
    with step batches and heartbeats, so they may lag a command by a heartbeat)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.stats()
        quiet = stats["running"] == 0 and stats["waiting"] == 0
        if quiet and all(r["kv_pages_used"] == 0 for r in stats["replicas"]) or \
                time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def wait_for(cond, timeout_s: float, what: str, poll_s: float = 0.05):
    """``cond()``'s first truthy value within ``timeout_s``; else fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def all_free(stats: dict) -> bool:
    return all(r["kv_pages_used"] == 0 for r in stats["replicas"])


def close_processes(cluster) -> None:
    """Close a test cluster of separately started processes (its ``client`` and ``procs``, a
    ``local_cluster.Processes``): each must exit on SIGTERM, none may be left behind."""
    cluster.client.close()
    pids = [p.pid for p in cluster.procs.procs.values()]
    stubborn = cluster.procs.close()
    assert not stubborn, f"needed SIGKILL: {stubborn}"
    assert not [pid for pid in pids if process_alive(pid)]


def stream_and_migrate(client: Client, prompt: list[int], params: SamplingParams, *,
                       after: int = 12, destinations: tuple[int, ...] = (1, 2)
                       ) -> tuple[list[int], int]:
    """Stream ``prompt``; after ``after`` tokens ask the scheduler to move the request to the
    first of ``destinations`` it is not already on. Returns every token and the destination."""
    tokens: list[int] = []
    migrated: list[int] = []
    for chunk in client.stream(prompt, params):
        if chunk.token_id >= 0:
            tokens.append(chunk.token_id)
        if len(tokens) == after and not migrated:
            for dst in destinations:  # whichever decode replica it is not on
                started, reason = client.migrate(chunk.request_id, dst)
                if started:
                    migrated.append(dst)
                    break
            assert migrated, reason
    return tokens, migrated[0]
