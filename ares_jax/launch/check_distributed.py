"""Self-check of a multi-controller group: run it on every host of a would-be replica.

    # host 0 and host 1 (or two shells on one machine):
    python -m ares_jax.launch.check_distributed --coordinator host0:8476 --num-processes 2 \
        --process-id 0
    python -m ares_jax.launch.check_distributed --coordinator host0:8476 --num-processes 2 \
        --process-id 1

Every process joins the group, places a small random Llama over the *global* mesh (tensor
parallel over all processes' devices, so the step crosses processes), runs its forward pass and
compares the logits with the same forward on one local device. The leader also broadcasts a
command to the followers, as a replica's leader does. Prints one JSON line per process
(``--out FILE`` writes it there too); exit status 0 when the group computed the right numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ares_jax.launch import distributed

if TYPE_CHECKING:
    import numpy as np

TOKENS_SEED = 7
WEIGHTS_SEED = 3


def tiny_config():
    """Small enough for CPU, with heads, KV heads, FFN and vocab that divide 8 devices."""
    from ares_jax.model.model import Config

    return Config(vocab_size=512, d_model=128, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=16,
                  ffn_dim=256, max_seq_len=256, dtype="float32")


def reference_logits(tokens: np.ndarray) -> np.ndarray:
    """The forward pass on one device, no sharding."""
    import jax
    import numpy as np

    from ares_jax.model.model import forward, init_random_weights

    cfg = tiny_config()
    dev = jax.local_devices()[0]
    weights = jax.device_put(init_random_weights(cfg, WEIGHTS_SEED, scale=0.1), dev)
    out = jax.jit(forward, static_argnums=1)(weights, cfg, jax.device_put(tokens, dev))
    return np.asarray(out)


def sharded_logits(tokens: np.ndarray) -> tuple[np.ndarray, dict]:
    """The forward pass with weights placed over every device of every process."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from ares_jax.model.model import forward, init_random_weights
    from ares_jax.model.sharding import make_mesh, place_weights

    cfg = tiny_config()
    mesh = make_mesh(jax.devices())  # global: all on the "model" axis
    host = jax.tree.map(np.asarray, init_random_weights(cfg, WEIGHTS_SEED, scale=0.1))
    weights = place_weights(host, cfg, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    toks = jax.make_array_from_callback(tokens.shape, replicated, lambda idx: tokens[idx])
    step = jax.jit(forward, static_argnums=1, out_shardings=replicated)
    out = step(weights, cfg, toks)
    shard = weights.layers.wq.sharding.shard_shape(weights.layers.wq.shape)
    info = {"mesh_shape": dict(mesh.shape), "wq_shard_shape": list(shard)}
    return np.asarray(out.addressable_data(0)), info


def run(spec: distributed.DistributedSpec | None) -> dict:
    import jax
    import numpy as np

    t0 = time.perf_counter()
    if spec is not None:
        distributed.initialize(spec, timeout_s=120)
    report: dict = {"process_id": jax.process_index(), "process_count": jax.process_count(),
                    "global_devices": jax.device_count(),
                    "local_devices": jax.local_device_count(), "jax": jax.__version__,
                    "platform": jax.devices()[0].platform}
    tokens = np.random.default_rng(TOKENS_SEED).integers(0, 512, (2, 16)).astype(np.int32)
    got, info = sharded_logits(tokens)
    want = reference_logits(tokens)
    report.update(info)
    report["max_abs_diff"] = float(np.max(np.abs(got - want)))
    report["logits_checksum"] = float(np.sum(got.astype(np.float64)))
    command = json.dumps({"op": "step", "n": 3}).encode() if jax.process_index() == 0 else None
    report["broadcast"] = json.loads(distributed.broadcast_bytes(command))
    report["ok"] = report["max_abs_diff"] < 1e-4 and report["broadcast"] == {"op": "step", "n": 3}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    if spec is not None:
        distributed.shutdown()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    distributed.add_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    report = run(distributed.resolve_from_args(args))
    text = json.dumps(report)
    print(text, flush=True)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
