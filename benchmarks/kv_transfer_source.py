"""The source process for ``benchmarks/transfer_throughput.py``'s cross-process pulls.

Holds two transfer servers side by side: the tuned ``JaxTransferTransport`` and, for the
comparison, the pre-seam configuration (``legacy``: one bulk socket, 256 MiB chunks, staging
copies, every replica of a replicated block offered). Commands, one per stdin line:

- ``offer PAGES COUNT SEED``: build K and V blocks ``[L, PAGES, S, KVH, K]`` (float32, random
  normal from ``SEED``) on a 2-device mesh in the KV pool's sharding; offer them ``COUNT`` times
  on each server (one uuid per pull), and print one JSON line:
  ``{"tickets": [...], "legacy": {"address": .., "uuids": [...]}, "k_sum": .., "v_sum": ..}``
  (float64 sums for the receiver's integrity check).
- ``shm_offer``: offer the last block once more through ``ShmTransport`` (a copy into a
  ``/dev/shm`` segment), timed here: ``{"ticket": .., "offer_s": wall, "offer_cpu_s": CPU}``.
- ``shm_ack UUID``: acknowledge that shm offer (unlinks its segment): ``{"ok": bool}``.
- ``drop``: ack every tuned and shm offer still pending and forget the blocks; prints
  ``{"dropped": true, "pending": n}`` (both transports' pending offers).
- ``quit``: exit.

Run by the benchmark (``--shape L,S,KVH,K``), not by hand. Importing this module does not touch
JAX's configuration.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

LEGACY = {"bulk_connections": 1, "transfer_size": 256 << 20, "use_raw_buffers": False}


def main(argv: list[str] | None = None) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import jax
    import numpy as np
    from jax.experimental import transfer as jax_transfer

    from ares_jax.model.sharding import kv_pool_sharding, make_mesh
    from ares_jax.transfer.remote import JaxTransferTransport
    from ares_jax.transfer.shm import ShmTransport

    p = argparse.ArgumentParser()
    p.add_argument("--shape", required=True, help="L,S,KVH,K of one page block")
    a = p.parse_args(argv)
    layers, page_size, kv_heads, head_dim = (int(x) for x in a.shape.split(","))
    transport = JaxTransferTransport()
    shm = ShmTransport()
    legacy = jax_transfer.start_transfer_server(
        jax.devices()[0].client, "127.0.0.1:0", ["127.0.0.1:0"] * LEGACY["bulk_connections"],
        transfer_size=LEGACY["transfer_size"], use_raw_buffers=LEGACY["use_raw_buffers"])
    legacy_uuids = itertools.count(1)
    mesh = make_mesh(jax.devices()[:2])
    held: list[jax.Array] = []
    pending: list[int] = []
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        if words[0] == "drop":
            for uuid in pending:
                transport.ack(uuid)
            pending.clear()
            held.clear()
            print(json.dumps({"dropped": True, "pending": transport.pending_offers()
                              + shm.pending_offers()}), flush=True)
            continue
        if words[0] == "shm_offer":
            wall, cpu = time.perf_counter(), time.process_time()
            ticket = shm.offer(held[-2], held[-1], ttl_s=600.0)
            print(json.dumps({"ticket": ticket.to_json(), "offer_s": time.perf_counter() - wall,
                              "offer_cpu_s": time.process_time() - cpu}), flush=True)
            continue
        if words[0] == "shm_ack":
            print(json.dumps({"ok": shm.ack(int(words[1]))}), flush=True)
            continue
        if words[0] != "offer":
            print(json.dumps({"error": f"unknown command {line.strip()!r}"}), flush=True)
            continue
        pages, count, seed = (int(x) for x in words[1:4])
        shape = (layers, pages, page_size, kv_heads, head_dim)
        rng = np.random.default_rng(seed)
        k_host = rng.standard_normal(shape, np.float32)
        v_host = rng.standard_normal(shape, np.float32)
        sharding = kv_pool_sharding(shape, mesh)
        k, v = jax.block_until_ready(jax.device_put((k_host, v_host), sharding))
        tickets = [transport.offer(k, v, ttl_s=600.0) for _ in range(count)]
        pending += [t.uuid for t in tickets]
        uuids = [next(legacy_uuids) for _ in range(count)]
        for uuid in uuids:
            legacy.await_pull(uuid, [k, v])
        held += [k, v]
        print(json.dumps({"tickets": [t.to_json() for t in tickets],
                          "legacy": {"address": legacy.address(), "uuids": uuids},
                          "k_sum": float(k_host.sum(dtype=np.float64)),
                          "v_sum": float(v_host.sum(dtype=np.float64))}), flush=True)


if __name__ == "__main__":
    main()
