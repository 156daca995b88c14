"""The shared-memory KvTransport: a real source process offers blocks as /dev/shm segments and
this process pulls them; every way an offer ends unlinks its segment, and segments of a
SIGKILLed process are swept by the next transport, those of running processes left alone."""

import dataclasses
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ares_jax.serving.local_cluster import process_alive
from ares_jax.transfer.errors import TransferError, TransferShapeMismatch
from ares_jax.transfer.kv_transport import KvTicket, KvTransport
from ares_jax.transfer.shm import DEFAULT_DIR, PREFIX, ShmTransport, process_start, sweep_stale

sys.path.insert(0, str(Path(__file__).parent))
from kv_source_process import SHAPE, SourceProcess, block  # noqa: E402

HEADS = PartitionSpec(None, None, None, "model", None)


def segments(pid: int) -> list[str]:
    return sorted(n for n in os.listdir(DEFAULT_DIR) if n.startswith(f"{PREFIX}{pid}-"))


@pytest.fixture(scope="module")
def source():
    src = SourceProcess("shm")
    try:
        yield src
    finally:
        src.close()
    # A source that quits cleanly leaves no segment and no process behind.
    assert segments(src.proc.pid) == []
    assert not process_alive(src.proc.pid)


@pytest.fixture(scope="module")
def receiver():
    t = ShmTransport()
    yield t
    t.close()
    assert segments(os.getpid()) == []


def path_of(receiver: ShmTransport, ticket: KvTicket) -> str:
    return receiver.segment_path(ticket)


def test_cross_process_pull_gives_identical_arrays_and_ack_unlinks(source, receiver):
    assert isinstance(receiver, KvTransport)
    ticket = KvTicket.from_bytes(source.offer(seed=11).to_bytes())  # as over gRPC
    assert ticket.kind == "shm" and f"{PREFIX}{source.proc.pid}-" in ticket.address
    path = path_of(receiver, ticket)
    assert os.path.exists(path)
    mesh = Mesh(np.array(jax.devices()[4:8]).reshape(2, 2), ("data", "model"))
    target = NamedSharding(mesh, HEADS)
    k, v = receiver.pull(ticket, shape=SHAPE, dtype="float32", target=target, timeout_s=20)
    want_k, want_v = block(11)
    assert k.sharding == target and v.sharding == target
    np.testing.assert_array_equal(np.asarray(k), want_k)
    np.testing.assert_array_equal(np.asarray(v), want_v)
    # Without a target: the source's layout (2 devices, heads split) on our first devices.
    k2, _ = receiver.pull(ticket, timeout_s=20)
    assert k2.sharding.spec == HEADS and k2.sharding.mesh.devices.shape == (1, 2)
    np.testing.assert_array_equal(np.asarray(k2), want_k)
    assert source.ask(f"ack {ticket.uuid}") == {"ok": True, "pending": 0}
    assert not os.path.exists(path)
    # What we pulled stays valid after the source unlinked the segment.
    np.testing.assert_array_equal(np.asarray(v), want_v)
    assert source.ask(f"ack {ticket.uuid}")["ok"] is False
    with pytest.raises(TransferError, match="is gone"):
        receiver.pull(ticket, timeout_s=5)


def test_unpulled_offer_expires_calls_back_and_unlinks(source, receiver):
    ticket = source.offer(seed=3, ttl_s=0.3)
    path = path_of(receiver, ticket)
    assert os.path.exists(path)
    deadline = time.monotonic() + 10
    while ticket.uuid not in source.ask("status")["expired"]:
        assert time.monotonic() < deadline, "the offer did not expire"
        time.sleep(0.05)
    assert not os.path.exists(path)
    with pytest.raises(TransferError, match="acknowledged, released or expired"):
        receiver.pull(ticket, timeout_s=5)


def test_release_unlinks_and_a_released_or_unknown_ticket_fails_clearly(source, receiver):
    ticket = source.offer(seed=4)
    assert source.ask(f"release {ticket.uuid}") == {"ok": True, "pending": 0}
    assert not os.path.exists(path_of(receiver, ticket))
    with pytest.raises(TransferError, match=f"block {ticket.uuid}: shared-memory segment"):
        receiver.pull(ticket, timeout_s=5)
    never = dataclasses.replace(ticket, uuid=ticket.uuid + 1000)
    with pytest.raises(TransferError, match="is gone"):
        receiver.pull(never, timeout_s=5)


def test_mismatched_foreign_or_other_host_pulls_are_refused(source, receiver):
    ticket = source.offer(seed=5)
    with pytest.raises(TransferShapeMismatch, match="shape"):
        receiver.pull(ticket, shape=(2, 5, 8, 2, 16), timeout_s=5)
    with pytest.raises(TransferShapeMismatch, match="dtype"):
        receiver.pull(ticket, dtype="bfloat16", timeout_s=5)
    _, space, prefix = ticket.address.split(":", 2)
    elsewhere = dataclasses.replace(ticket, address=f"shm:another-boot.1:{prefix}")
    with pytest.raises(TransferError, match="another host"):
        receiver.pull(elsewhere, timeout_s=5)
    with pytest.raises(TransferError, match="cannot pull a 'jax-transfer' ticket"):
        receiver.pull(dataclasses.replace(ticket, kind="jax-transfer"), timeout_s=5)
    # A truncated segment is refused, not read past its end.
    os.truncate(path_of(receiver, ticket), 64)
    with pytest.raises(TransferError, match="holds 64 bytes"):
        receiver.pull(ticket, timeout_s=5)
    assert source.ask(f"release {ticket.uuid}")["ok"]


def test_in_process_offers_bfloat16_release_and_close_unlink(receiver):
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    one = NamedSharding(mesh, PartitionSpec())
    k, v = (jax.device_put(x.astype(jax.numpy.bfloat16), one) for x in block(6))
    t = ShmTransport()
    expired: list[int] = []
    tickets = [t.offer(k, v, ttl_s=60, on_expire=expired.append) for _ in range(3)]
    assert len(segments(os.getpid())) == 3 and t.pending_offers() == 3
    got_k, got_v = receiver.pull(tickets[0], shape=k.shape, dtype="bfloat16", timeout_s=5)
    np.testing.assert_array_equal(np.asarray(got_k), np.asarray(k))
    assert t.release(tickets[0].uuid) and not t.release(tickets[0].uuid)
    assert len(segments(os.getpid())) == 2
    t.close()  # drops the rest without callbacks
    assert segments(os.getpid()) == [] and t.pending_offers() == 0 and expired == []


def test_sweep_removes_a_killed_process_segments_only(receiver):
    killed = SourceProcess("shm")
    live_prefix = f"{PREFIX}{os.getpid()}-{process_start(os.getpid())}-0000-"
    recycled = f"{PREFIX}{os.getpid()}-1-0000-1"  # our pid with another start time
    not_ours = f"{PREFIX}notes"
    made = []
    try:
        tickets = [killed.offer(seed=s) for s in (7, 8)]
        assert len(segments(killed.proc.pid)) == 2
        killed.proc.kill()  # SIGKILL: no close, no finaliser
        killed.proc.wait(timeout=10)
        assert len(segments(killed.proc.pid)) == 2
        for name in (f"{live_prefix}1", recycled, not_ours):
            Path(DEFAULT_DIR, name).write_bytes(b"x")
            made.append(name)
        ShmTransport().close()  # a new transport sweeps at start
        assert segments(killed.proc.pid) == []
        assert os.path.exists(Path(DEFAULT_DIR, f"{live_prefix}1"))
        assert os.path.exists(Path(DEFAULT_DIR, not_ours))
        assert not os.path.exists(Path(DEFAULT_DIR, recycled))
        assert sweep_stale() == []
        with pytest.raises(TransferError, match="is gone"):
            receiver.pull(tickets[0], timeout_s=5)
    finally:
        for name in made:
            Path(DEFAULT_DIR, name).unlink(missing_ok=True)
        if killed.proc.poll() is None:
            killed.proc.kill()
            killed.proc.wait()
