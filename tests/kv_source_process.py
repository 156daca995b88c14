"""A KV source in its own process, for the cross-process transfer test.

Offers a deterministic page block, prints its ticket as one JSON line, then waits for "quit".
Importing this module (for ``SHAPE``/``block``) must not touch JAX's configuration.
"""

import os
import sys

import numpy as np

SHAPE = (2, 4, 8, 2, 16)  # [layers, pages, page_size, kv_heads, head_dim]


def block(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(SHAPE).astype(np.float32),
            rng.standard_normal(SHAPE).astype(np.float32))


def main() -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from ares_jax.transfer.remote import KVTransferServer

    server = KVTransferServer()
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("data", "model"))
    sharding = NamedSharding(mesh, PartitionSpec(None, None, None, "model", None))
    k, v = block(int(sys.argv[1]))
    ticket = server.offer(jax.device_put(k, sharding), jax.device_put(v, sharding))
    print(ticket.to_json(), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break


if __name__ == "__main__":
    main()
