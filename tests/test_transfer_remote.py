"""The KvTransport seam: cross-process pulls over jax.experimental.transfer with a real second
process on localhost, and LocalTransport between two meshes of this process."""

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ares_jax.transfer.errors import TransferShapeMismatch, TransferTimeout
from ares_jax.transfer.kv_transport import KvTicket, KvTransport
from ares_jax.transfer.local_transport import LocalTransport
from ares_jax.transfer.remote import JaxTransferTransport

sys.path.insert(0, str(Path(__file__).parent))
from kv_source_process import SHAPE, SourceProcess, block  # noqa: E402

HEADS = PartitionSpec(None, None, None, "model", None)


@pytest.fixture(scope="module")
def source():
    src = SourceProcess()
    try:
        yield src
    finally:
        src.close()


@pytest.fixture(scope="module")
def receiver():
    return JaxTransferTransport()


def wait_for_expiry(source: SourceProcess, uuid: int, within_s: float = 10.0) -> None:
    """Until the source's on_expire callback has fired for ``uuid`` (it runs right after the
    offer leaves the pending count)."""
    deadline = time.monotonic() + within_s
    while uuid not in source.ask("status")["expired"]:
        assert time.monotonic() < deadline, f"offer {uuid} did not expire"
        time.sleep(0.05)


def target_sharding() -> NamedSharding:
    mesh = Mesh(np.array(jax.devices()[4:8]).reshape(2, 2), ("data", "model"))
    return NamedSharding(mesh, HEADS)


def test_pull_reshards_exact_data_and_ack_frees_the_offer(source, receiver):
    assert isinstance(receiver, KvTransport)
    ticket = source.offer(seed=11)
    # The ticket rides in a protobuf bytes field.
    ticket = KvTicket.from_bytes(ticket.to_bytes())
    assert ticket.shards == (((0, 2), (0, 4), (0, 8), (0, 1), (0, 16)),
                             ((0, 2), (0, 4), (0, 8), (1, 2), (0, 16)))
    assert source.ask("status")["pending"] == 1
    target = target_sharding()
    k, v = receiver.pull(ticket, shape=SHAPE, dtype="float32", target=target, timeout_s=20)
    want_k, want_v = block(11)
    assert k.sharding == target and v.sharding == target
    np.testing.assert_array_equal(np.asarray(k), want_k)
    np.testing.assert_array_equal(np.asarray(v), want_v)
    # The source keeps the offer until the receiver acknowledges it.
    assert source.ask("status")["pending"] == 1
    assert source.ask(f"ack {ticket.uuid}") == {"ok": True, "pending": 0}
    assert source.ask(f"ack {ticket.uuid}")["ok"] is False


def test_pull_onto_a_differently_split_target_reassembles_then_reshards(source, receiver):
    ticket = source.offer(seed=19)  # split over KV heads at the source
    mesh = Mesh(np.array(jax.devices()[4:8]).reshape(2, 2), ("data", "model"))
    by_layer = NamedSharding(mesh, PartitionSpec("model", None, None, None, None))
    k, v = receiver.pull(ticket, target=by_layer, timeout_s=20)
    assert k.sharding == by_layer
    np.testing.assert_array_equal(np.asarray(k), block(19)[0])
    np.testing.assert_array_equal(np.asarray(v), block(19)[1])
    assert source.ask(f"ack {ticket.uuid}")["ok"] is True


def test_replicated_block_travels_once_and_lands_in_the_source_layout(source, receiver):
    ticket = source.offer(seed=12, replicated=True)
    assert len(ticket.shards) == 1  # one copy on the wire, not one per replica
    k, v = receiver.pull(ticket, timeout_s=20)  # no target: the source's layout, here
    assert k.sharding.spec == PartitionSpec() and len(k.sharding.device_set) == 2
    want_k, want_v = block(12)
    for shard in k.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), want_k)
    np.testing.assert_array_equal(np.asarray(v), want_v)
    assert source.ask(f"ack {ticket.uuid}")["ok"] is True


def test_mismatched_pull_is_refused_before_any_byte_moves(source, receiver):
    ticket = source.offer(seed=13)
    with pytest.raises(TransferShapeMismatch, match="shape"):
        receiver.pull(ticket, shape=(2, 4, 8, 3, 16))
    with pytest.raises(TransferShapeMismatch, match="dtype"):
        receiver.pull(ticket, dtype="bfloat16")
    # Still offered and intact: the refused pulls did not consume it.
    k, _ = receiver.pull(ticket, shape=SHAPE, dtype="float32", timeout_s=20)
    np.testing.assert_array_equal(np.asarray(k), block(13)[0])
    assert source.ask(f"release {ticket.uuid}")["ok"] is True


def test_unpulled_offer_expires_and_calls_back(source, receiver):
    ticket = source.offer(seed=14, ttl_s=0.3)
    wait_for_expiry(source, ticket.uuid)
    assert source.ask("status")["pending"] == 0
    assert source.ask(f"ack {ticket.uuid}")["ok"] is False  # too late: the handoff failed
    with pytest.raises(TransferTimeout):
        receiver.pull(ticket, timeout_s=0.5)


def test_pull_of_a_never_offered_block_times_out_within_its_timeout(source, receiver):
    real = source.offer(seed=15)
    bogus = KvTicket(**{**real.__dict__, "uuid": real.uuid + 10_000})
    start = time.monotonic()
    with pytest.raises(TransferTimeout, match="timed out after 1.0 s"):
        receiver.pull(bogus, timeout_s=1.0)
    assert time.monotonic() - start < 2.0
    # The connection still serves the real offer.
    k, _ = receiver.pull(real, timeout_s=20)
    np.testing.assert_array_equal(np.asarray(k), block(15)[0])
    assert source.ask(f"release {real.uuid}") == {"ok": True, "pending": 0}


def test_concurrent_pulls_share_one_connection(source, receiver):
    tickets = [source.offer(seed=seed) for seed in (16, 17, 18)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda t: receiver.pull(t, timeout_s=20), tickets))
    for seed, (k, v) in zip((16, 17, 18), results):
        np.testing.assert_array_equal(np.asarray(k), block(seed)[0])
        np.testing.assert_array_equal(np.asarray(v), block(seed)[1])
    for ticket in tickets:
        assert source.ask(f"ack {ticket.uuid}")["ok"] is True
    assert source.ask("status")["pending"] == 0


def test_release_and_expiry_free_the_runtime_buffers(source):
    # The transfer server holds an offered block's buffers until it is pulled or replaced;
    # dropping an offer must give the memory back, not just forget the uuid.
    def rss() -> float:
        return source.ask("rss")["rss_mib"]

    base = rss()
    ticket = source.offer_big(mib=48, ttl_s=30)
    held = rss()
    assert held > base + 80  # K and V, 48 MiB each, held by the runtime alone
    assert source.ask(f"release {ticket.uuid}")["ok"] is True
    assert rss() < held - 80
    expiring = source.offer_big(mib=48, ttl_s=0.3)
    held = rss()
    wait_for_expiry(source, expiring.uuid)
    assert rss() < held - 80


def test_local_transport_round_trip_across_two_meshes():
    devices = jax.devices()
    src_mesh = Mesh(np.array(devices[:2]).reshape(1, 2), ("data", "model"))
    src, dst = LocalTransport(), LocalTransport()
    assert isinstance(src, KvTransport)
    k_host, v_host = block(21)
    sharding = NamedSharding(src_mesh, HEADS)
    k, v = jax.device_put((k_host, v_host), sharding)
    expired: list[int] = []
    ticket = KvTicket.from_bytes(src.offer(k, v, ttl_s=30, on_expire=expired.append).to_bytes())
    with pytest.raises(TransferShapeMismatch):
        dst.pull(ticket, shape=(1, 2, 3, 4, 5))
    target = target_sharding()
    got_k, got_v = dst.pull(ticket, target=target, shape=SHAPE, dtype="float32", timeout_s=5)
    assert got_k.sharding == target
    np.testing.assert_array_equal(np.asarray(got_k), k_host)
    np.testing.assert_array_equal(np.asarray(got_v), v_host)
    assert src.pending_offers() == 1
    assert src.ack(ticket) is True and src.pending_offers() == 0
    # Expiry with the owner's callback; a pull of a dropped offer times out.
    short = src.offer(k, v, ttl_s=0.2, on_expire=expired.append)
    deadline = time.monotonic() + 5
    while not expired and time.monotonic() < deadline:
        time.sleep(0.05)
    assert expired == [short.uuid] and src.pending_offers() == 0
    start = time.monotonic()
    with pytest.raises(TransferTimeout):
        dst.pull(short, timeout_s=0.3)
    assert time.monotonic() - start < 1.5
    released = src.offer(k, v, ttl_s=30)
    assert src.release(released.uuid) is True and src.pending_offers() == 0
    src.close()
    dst.close()
