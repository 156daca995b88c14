"""Shared by the multi-process tests: what the same model produces in this process."""

from __future__ import annotations

import time

from ares_jax.client import Client
from ares_jax.cluster import ServingLoop
from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig, Request


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
