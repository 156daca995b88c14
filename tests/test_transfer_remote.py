"""Cross-process KV pull with jax.experimental.transfer: two real processes on localhost."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ares_jax.transfer import TransferShapeMismatch
from ares_jax.transfer.errors import TransferTimeout
from ares_jax.transfer.remote import KVTransferServer, PageTicket

sys.path.insert(0, str(Path(__file__).parent))
from kv_source_process import SHAPE, block  # noqa: E402

SEED = 1234


@pytest.fixture(scope="module")
def source():
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "kv_source_process.py"),
                             str(SEED)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"the source process produced no ticket (exit {proc.poll()})")
        yield PageTicket.from_json(line)
    finally:
        if proc.poll() is None:
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait(timeout=20)


def test_pull_matches_source_bit_for_bit_and_reshards(source):
    server = KVTransferServer()
    # A mismatched request is refused before any byte moves.
    with pytest.raises(TransferShapeMismatch, match="shape"):
        server.pull(source, shape=(2, 4, 8, 3, 16))
    with pytest.raises(TransferShapeMismatch, match="dtype"):
        server.pull(source, dtype="bfloat16")
    target_mesh = Mesh(np.array(jax.devices()[4:8]).reshape(2, 2), ("data", "model"))
    target = NamedSharding(target_mesh, PartitionSpec(None, None, None, "model", None))
    k, v = server.pull(source, shape=SHAPE, dtype="float32", target=target)
    want_k, want_v = block(SEED)
    assert k.sharding == target
    np.testing.assert_array_equal(np.asarray(k), want_k)
    np.testing.assert_array_equal(np.asarray(v), want_v)


def test_pull_of_unknown_block_fails_within_its_timeout(source):
    server = KVTransferServer()
    bogus = PageTicket(uuid=987654, address=source.address, shape=source.shape,
                       dtype=source.dtype, mesh_shape=source.mesh_shape,
                       mesh_axes=source.mesh_axes, spec=source.spec)
    with pytest.raises(TransferTimeout, match="timed out after 1.0 s"):
        server.pull(bogus, timeout_s=1.0)
