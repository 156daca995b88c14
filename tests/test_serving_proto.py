"""The committed gRPC modules are generated from the one proto, and records survive the wire."""

import numpy as np

from ares_jax.engine.sampling import SamplingParams, TokenInfo
from ares_jax.engine.slots import DecodeLoad
from ares_jax.engine.types import Request
from ares_jax.replica.types import KvBlock, Prefilled, Stepped
from ares_jax.serving import codec, codegen


def test_committed_modules_match_the_proto(tmp_path):
    for generated in codegen.generate(tmp_path):
        committed = codegen.HERE / generated.name
        assert committed.read_text() == generated.read_text(), \
            f"{committed.name} is stale: run python -m ares_jax.serving.codegen"


def test_records_round_trip():
    params = SamplingParams(temperature=0.5, top_p=0.9, top_k=7, seed=3, max_tokens=9,
                            min_tokens=2, stop=("x",), stop_token_ids=(4,), logprobs=2)
    req = Request(request_id="r", prompt_ids=[1, 2, 3], params=params, index=4,
                  resumed_ids=[9])
    back = codec.request_from_pb(codec.request_to_pb(req))
    assert back == req
    p = Prefilled(replica_id=1, request_id="r", first=TokenInfo(5, -0.5, {5: -0.5, 6: -1.0}),
                  num_tokens=3, predicted_remaining=12.0, finish_reason=None, stop_reason=None,
                  kv=KvBlock(source=1, request_id="r", pages=1, nbytes=64, tickets=(b"t",),
                             chunk_pages=(1,)))
    assert codec.prefilled_from_pb(codec.prefilled_to_pb(p)) == p
    load = DecodeLoad(free_pages=3, used_pages=2, capacity_pages=5, reserved_pages=1,
                      free_slots=6, request_ids=("a",), kv_tokens=np.array([7]),
                      generated=np.array([2]), max_tokens=np.array([9]),
                      predicted_remaining=np.array([np.nan]))
    ev = Stepped(replica_id=2, request_ids=("a",), tokens=(TokenInfo(8),),
                 finish_reasons=("length",), stop_reasons=(None,),
                 predicted_remaining=np.array([1.5]), preempted=("b",), elapsed_s=0.01,
                 kv_tokens=7)
    ev2, load2 = codec.event_from_pb(codec.event_to_pb(ev, load))
    assert ev2.request_ids == ev.request_ids and ev2.tokens == ev.tokens
    assert ev2.finish_reasons == ev.finish_reasons and ev2.preempted == ev.preempted
    np.testing.assert_array_equal(ev2.predicted_remaining, ev.predicted_remaining)
    assert load2.request_ids == ("a",) and np.isnan(load2.predicted_remaining[0])
    assert int(load2.kv_tokens[0]) == 7 and load2.reserved_pages == 1
