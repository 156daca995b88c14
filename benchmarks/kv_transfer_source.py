"""The source process for ``benchmarks/transfer_throughput.py``'s cross-process pulls.

Offers K/V page blocks with ``KVTransferServer.offer`` on demand. Commands, one per stdin line:

- ``offer PAGES COUNT SEED``: build K and V blocks ``[L, PAGES, S, KVH, K]`` (float32, random
  normal from ``SEED``) on a 2-device mesh in the KV pool's sharding, offer them ``COUNT`` times
  (one uuid per pull), and print one JSON line: ``{"tickets": [...], "k_sum": .., "v_sum": ..}``
  (float64 sums for the receiver's integrity check).
- ``drop``: forget the blocks (after the receiver pulled them all); prints ``{"dropped": true}``.
- ``quit``: exit.

Run by the benchmark (``--shape L,S,KVH,K``), not by hand. Importing this module does not touch
JAX's configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import jax
    import numpy as np

    from ares_jax.model.sharding import kv_pool_sharding, make_mesh
    from ares_jax.transfer.remote import KVTransferServer

    p = argparse.ArgumentParser()
    p.add_argument("--shape", required=True, help="L,S,KVH,K of one page block")
    a = p.parse_args(argv)
    layers, page_size, kv_heads, head_dim = (int(x) for x in a.shape.split(","))
    server = KVTransferServer()
    mesh = make_mesh(jax.devices()[:2])
    held: list[jax.Array] = []
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        if words[0] == "drop":
            held.clear()
            print(json.dumps({"dropped": True}), flush=True)
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
        tickets = [server.offer(k, v).to_json() for _ in range(count)]
        held += [k, v]
        print(json.dumps({"tickets": tickets, "k_sum": float(k_host.sum(dtype=np.float64)),
                          "v_sum": float(v_host.sum(dtype=np.float64))}), flush=True)


if __name__ == "__main__":
    main()
