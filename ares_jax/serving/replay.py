"""Replay a request stream against a running cluster and summarise what clients saw.

The stream is ShareGPT first turns with the chat template (``cluster.stream.sharegpt_stream``),
each request seeded, sent at Poisson arrival times by one thread per request. Sampling is
seeded per request and the engine is batch invariant, so every policy produces the same tokens:
only where and when they run differs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from ares_jax.client import Client
from ares_jax.cluster.stream import Arrival
from ares_jax.engine.outputs import RequestOutput


def replay(client: Client, arrivals: Sequence[Arrival], *, seconds_per_iter: float,
           desc: str = "replay") -> tuple[dict, dict[str, list[int]]]:
    """Send ``arrivals`` (their ``iteration`` scaled to seconds) and wait for all of them;
    returns (summary, tokens by request id)."""
    before = client.stats()["counters"]
    outputs: dict[str, RequestOutput] = {}
    errors: list[str] = []
    bar = tqdm(total=len(arrivals), desc=desc, unit="req", leave=False)
    lock = threading.Lock()

    def one(a: Arrival) -> None:
        try:
            out = client.generate([a.request.prompt_ids], a.request.params)[0]
        except Exception as err:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(f"{a.request.request_id}: {err}")
        else:
            with lock:
                outputs[a.request.request_id] = out
        bar.update(1)

    started = time.perf_counter()
    threads = []
    for a in sorted(arrivals, key=lambda a: a.iteration):
        wait = started + a.iteration * seconds_per_iter - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t = threading.Thread(target=one, args=(a,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    bar.close()
    wall = time.perf_counter() - started
    after = client.stats()["counters"]
    return summarize(list(outputs.values()), wall, before, after, errors), \
        {rid: o.token_ids for rid, o in outputs.items()}


def _pct(values: Sequence[float], q: float) -> float:
    return round(1e3 * float(np.percentile(values, q)), 2) if len(values) else float("nan")


def summarize(outputs: list[RequestOutput], wall_s: float, before: dict, after: dict,
              errors: list[str]) -> dict:
    ttft = [o.metrics.ttft for o in outputs if o.metrics.ttft is not None]
    tpot = [o.metrics.tpot for o in outputs if o.metrics.tpot is not None]
    tokens = sum(len(o.token_ids) for o in outputs)
    delta = lambda k: int(after.get(k, 0)) - int(before.get(k, 0))  # noqa: E731
    return {
        "requests": len(outputs), "failed": len(errors), "errors": errors[:5],
        "output_tokens": tokens,
        "tpot_ms_p50": _pct(tpot, 50), "tpot_ms_p99": _pct(tpot, 99),
        "ttft_ms_p50": _pct(ttft, 50), "ttft_ms_p99": _pct(ttft, 99),
        "throughput_tok_s": round(tokens / wall_s, 1), "wall_s": round(wall_s, 1),
        "preemptions": delta("preemptions"),
        "migrations_committed": delta("migrations_committed"),
        "migrations_aborted": delta("migrations_aborted"),
        "migration_bytes": delta("migration_bytes"),
        "fallback_dispatches": delta("fallback_dispatches"),
    }
