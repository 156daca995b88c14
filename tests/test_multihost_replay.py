"""The replay seam of a multi-controller replica, in one process: a ``GroupLeader`` and a
follower ``ReplicaProcess`` (each with its own KV pools), joined by an in-memory channel in place of
``broadcast_bytes`` (the collective itself is tested by tests/test_multihost.py). The follower
must end in the leader's exact host state, nested calls must not be sent twice, and a failed
broadcast must stop the leader."""

from __future__ import annotations

import dataclasses
import queue
import threading

import jax
import pytest

from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig, Request
from ares_jax.launch.distributed import DistributedSpec
from ares_jax.replica.types import KvBlock
from ares_jax.serving import multihost
from ares_jax.serving.replica_server import ReplicaProcess

ECFG = EngineConfig(page_size=8, num_pages=32, max_num_seqs=4, max_model_len=128)
SPEC = DistributedSpec(coordinator="127.0.0.1:1", num_processes=2, process_id=0)
ROLES = ["prefill", "decode", "decode"]


class Channel:
    """What ``broadcast_bytes`` is to the group: the leader's bytes, in order, to the follower."""

    def __init__(self) -> None:
        self.q: queue.Queue[bytes] = queue.Queue()
        self.calls: list[str] = []

    def send(self, payload: bytes | None) -> bytes:
        assert payload is not None
        self.calls.append(multihost.pickle.loads(payload).method)
        self.q.put(payload)
        return payload

    def receive(self, payload: bytes | None) -> bytes:
        assert payload is None
        return self.q.get(timeout=60)


def state(proc: ReplicaProcess) -> list:
    """Every mesh's host state that must agree across the group."""
    out = []
    for r in proc.replicas:
        if r.info.role == "prefill":
            out.append(("prefill", sorted(r.held_block_ids())))
        else:
            load = r.load()
            out.append(("decode", r.info.replica_id, r.slots.page_owners(),
                        r.slots.num_free_pages, load.generated.tolist(),
                        [(rid, r.slots.pages_held(rid), r.slots.num_cached(rid))
                         for rid in r.slots.running_ids()]))
    return out


@pytest.fixture(scope="module")
def pair(tiny_model):
    # The same devices for both (separate pools): they share compiled steps, as the processes
    # of a real group share nothing but run the same programs.
    devs = jax.devices()
    channel = Channel()
    leader = multihost.GroupLeader(tiny_model, ROLES, 1, ECFG, devices=devs[:3], group=SPEC,
                                   send=channel.send)
    follower = ReplicaProcess(tiny_model, ROLES, 1, ECFG, devices=devs[:3])
    follower.group = SPEC
    return leader, follower, channel


def test_the_follower_replays_the_leaders_calls_into_the_same_state(pair):
    leader, follower, channel = pair
    result: dict[str, int] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("code", multihost.follow(follower, channel.receive)))
    thread.start()
    leader.assign_ids([10, 11, 12], process="p", address="p")
    pre, dec1, dec2 = leader.replicas
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    reqs = [Request(request_id=f"r{i}", prompt_ids=list(range(5 + i, 25 + 3 * i)),
                    params=params, index=i) for i in range(2)]
    with leader.lock:
        pre.prefill(reqs)
        done = pre.poll()
        for req, ev in zip(reqs, done):
            # As the Insert RPC does: the sibling block is read inside the replayed insert.
            dec1.insert(req, dataclasses.replace(ev, kv=leader.resolved(
                dataclasses.replace(ev.kv, arrays=None))))
            pre.drop_kv(req.request_id)
        for _ in range(3):
            dec1.advance()
        # A same-process migration of r1: the export inside the import is not sent again.
        assert dec2.reserve("r1", dec1.slots.pages_held("r1"))
        # What Export(same_process) answers: a reference the destination reads itself.
        block = KvBlock(source=11, request_id="r1", pages=dec1.slots.pages_held("r1"), nbytes=0)
        dec2.import_kv("r1", 0, leader.resolved(block))
        dec1.advance()
        assert [type(e).__name__ for e in dec2.poll()] == ["ImportDone"]
    leader.mirror.stop()
    thread.join(timeout=60)
    assert result == {"code": 0}
    assert channel.calls == ["assign_ids", "prefill", "insert", "drop_kv", "insert", "drop_kv",
                             "advance", "advance", "advance", "reserve", "import_kv",
                             "advance", "stop"]
    assert state(follower) == state(leader)
    assert dec1.slots.running_ids() == ["r0", "r1"] and dec1.load().generated.tolist() == [5, 5]
    assert dec2.slots.pages_held("r1") == dec1.slots.pages_held("r1") > 0


def test_a_failed_broadcast_stops_the_leader(tiny_model):
    def broken(payload: bytes | None) -> bytes:
        raise RuntimeError("gloo: connection reset by peer")

    leader = multihost.GroupLeader(tiny_model, ["decode"], 1, ECFG, devices=jax.devices()[1:2],
                                   group=SPEC, send=broken)
    with pytest.raises(multihost.GroupBroken, match="connection reset"):
        leader.replicas[0].release("nobody")
    assert leader.stopped.is_set() and "connection reset" in leader.mirror.broken
    with pytest.raises(multihost.GroupBroken):  # nothing runs on a broken group
        leader.replicas[0].reserve("r", 1)
    assert leader.replicas[0].slots.page_owners() == []
