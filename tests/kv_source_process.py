"""A KV source in its own process, for the cross-process transfer tests.

Commands, one per stdin line; every answer is one JSON line on stdout:

- ``offer SEED TTL_S``: offer the deterministic block of ``SEED`` (2-device mesh, heads sharded
  over ``model``) for ``TTL_S`` seconds; answers ``{"ticket": "<KvTicket JSON>"}``.
- ``offer_replicated SEED TTL_S``: the same, replicated on both devices.
- ``ack UUID`` / ``release UUID``: answers ``{"ok": bool, "pending": n}``.
- ``offer_big MIB TTL_S``: offer K and V of ``MIB`` MiB each (ones, one device), keeping no
  reference of our own; answers ``{"ticket": ..}``.
- ``rss``: ``{"rss_mib": resident set size}``.
- ``status``: ``{"pending": n, "expired": [uuids whose on_expire fired]}``.
- ``quit``: exit.

``shm`` as the first argument offers through ``ShmTransport`` (``/dev/shm``) instead of
``JaxTransferTransport``.

Importing this module (for ``SHAPE``/``block``) must not touch JAX's configuration.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SHAPE = (2, 4, 8, 2, 16)  # [layers, pages, page_size, kv_heads, head_dim]


def block(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(SHAPE).astype(np.float32),
            rng.standard_normal(SHAPE).astype(np.float32))


class SourceProcess:
    """This module run as the offering process (``*args``: ``shm`` or nothing), driven line by
    line over its stdin/stdout."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the source process died (exit {self.proc.poll()})")
        return json.loads(line)

    def offer(self, seed: int, ttl_s: float = 30.0, replicated: bool = False):  # noqa: ANN201
        from ares_jax.transfer.kv_transport import KvTicket

        cmd = "offer_replicated" if replicated else "offer"
        return KvTicket.from_json(self.ask(f"{cmd} {seed} {ttl_s}")["ticket"])

    def offer_big(self, mib: int, ttl_s: float):  # noqa: ANN201
        from ares_jax.transfer.kv_transport import KvTicket

        return KvTicket.from_json(self.ask(f"offer_big {mib} {ttl_s}")["ticket"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=20)


def main() -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # This checkout's package, not whichever one the environment has installed.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if sys.argv[1:] == ["shm"]:
        from ares_jax.transfer.shm import ShmTransport

        transport = ShmTransport()
    else:
        from ares_jax.transfer.remote import JaxTransferTransport

        transport = JaxTransferTransport()
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("data", "model"))
    sharded = NamedSharding(mesh, PartitionSpec(None, None, None, "model", None))
    replicated = NamedSharding(mesh, PartitionSpec())
    expired: list[int] = []

    def answer(obj: object) -> None:
        print(json.dumps(obj), flush=True)

    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd = words[0]
        if cmd == "quit":
            break
        if cmd in ("offer", "offer_replicated"):
            sharding = sharded if cmd == "offer" else replicated
            k, v = block(int(words[1]))
            ticket = transport.offer(jax.device_put(k, sharding), jax.device_put(v, sharding),
                                     ttl_s=float(words[2]), on_expire=expired.append)
            answer({"ticket": ticket.to_json()})
        elif cmd == "offer_big":
            n = int(words[1]) * 2**20 // 4
            single = NamedSharding(Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                                        ("data", "model")), PartitionSpec())
            # Made on the device, not device_put from numpy: on CPU that aliases the numpy
            # buffer, whose release jaxlib defers to a later garbage collection.
            ones = jax.jit(lambda: jax.numpy.ones((1, 1, 1, 1, n), np.float32),  # noqa: B023
                           out_shardings=single)
            k, v = jax.block_until_ready((ones(), ones()))
            ticket = transport.offer(k, v, ttl_s=float(words[2]), on_expire=expired.append)
            del k, v  # from here on only the transfer server holds the buffers
            answer({"ticket": ticket.to_json()})
        elif cmd == "rss":
            with open("/proc/self/statm") as f:
                answer({"rss_mib": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20})
        elif cmd in ("ack", "release"):
            ok = getattr(transport, cmd)(int(words[1]))
            answer({"ok": ok, "pending": transport.pending_offers()})
        elif cmd == "status":
            answer({"pending": transport.pending_offers(), "expired": list(expired)})
        else:
            answer({"error": f"unknown command {line.strip()!r}"})


if __name__ == "__main__":
    main()
