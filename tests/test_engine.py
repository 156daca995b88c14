"""Engine behaviour on a tiny random model: pages, admission, compilation, sampling, preemption."""

import numpy as np
import pytest

from ares_jax.cluster import ServingLoop
from ares_jax.engine import decode as decode_mod
from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig, Request

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def make_loop(model, **overrides) -> ServingLoop:
    ecfg = EngineConfig(**{"page_size": 8, "num_pages": 128, "max_num_seqs": 16,
                           "max_model_len": 256, **overrides})
    return ServingLoop(PrefillEngine(model, ecfg), [DecodeEngine(model, ecfg)], None)


def prompt(i: int, n: int) -> list[int]:
    rng = np.random.default_rng(i)
    return rng.integers(4, 500, size=n).tolist()


def run(loop: ServingLoop, reqs: list[Request]) -> dict[str, list[int]]:
    for r in reqs:
        loop.add_request(r)
    while loop.has_work:
        loop.step()
    return {rid: loop.finished[rid].token_ids for rid in (r.request_id for r in reqs)}


def req(i: int, n: int = 10, params: SamplingParams = GREEDY) -> Request:
    return Request(request_id=f"r{i}", prompt_ids=prompt(i, n), params=params, index=i)


def assert_all_pages_free(loop: ServingLoop) -> None:
    for d in loop.decoders:
        assert d.num_free_pages == d.capacity_pages, d.page_owners()
        assert not d.num_active


def test_pages_never_leak_after_finish_cancel_and_failure(tiny_model):
    loop = make_loop(tiny_model)
    for i in range(20):
        loop.add_request(req(i, n=3 + i, params=SamplingParams(
            temperature=0.0, max_tokens=5 + i % 7, ignore_eos=True)))
    steps = 0
    while loop.has_work:
        loop.step()
        steps += 1
        if steps == 3:
            loop.abort("r4")  # cancel while decoding
            loop.abort("r19")  # cancel while still queued
    assert {loop.finished[f"r{i}"].finish_reason for i in (4, 19)} == {"abort"}
    # A failure inside insert (wrong KV shape) must hand the pages back.
    engine = loop.decoders[0]
    res = loop.prefill_engine.prefill([req(99)])[0]
    res.k = res.k[:, :, :4]
    with pytest.raises(Exception):  # noqa: B017 - any failure, as long as nothing leaks
        engine.insert(res)
    assert_all_pages_free(loop)
    loop.check_no_leaks()


def test_admission_errors_name_the_problem(tiny_model):
    loop = make_loop(tiny_model, num_pages=16)
    with pytest.raises(ValueError, match="max_model_len is 256"):
        loop.add_request(req(0, n=300))
    with pytest.raises(ValueError, match=r"max_tokens \(250\)"):
        loop.add_request(req(1, n=10, params=SamplingParams(max_tokens=250)))
    with pytest.raises(ValueError, match="KV pages; the pool holds 15"):
        loop.add_request(req(2, n=100, params=SamplingParams(max_tokens=100)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        loop.add_request(Request(request_id="x", prompt_ids=[1, 9999], params=GREEDY))
    with pytest.raises(ValueError, match="empty"):
        loop.add_request(Request(request_id="y", prompt_ids=[], params=GREEDY))
    with pytest.raises(ValueError, match="stop_token_ids"):
        loop.add_request(req(3, params=SamplingParams(stop_token_ids=(10**6,))))
    assert not loop.has_work


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"top_k": 0}, "top_k"), ({"logprobs": 99}, "logprobs"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"), ({"stop": ("",)}, "stop"),
])
def test_invalid_sampling_params_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name}"):
        SamplingParams(**kwargs)


def test_steady_state_serving_does_not_recompile(tiny_model):
    loop = make_loop(tiny_model)

    def wave(seed: int) -> None:
        rng = np.random.default_rng(seed)
        reqs = [req(1000 * seed + i, n=int(rng.integers(3, 30)),
                    params=SamplingParams(temperature=0.0, max_tokens=int(rng.integers(2, 30))))
                for i in range(12)]
        run(loop, reqs)

    wave(1)
    wave(2)
    warmed = decode_mod.compiled_step_count()
    for seed in range(3, 6):
        wave(seed)
    assert decode_mod.compiled_step_count() == warmed


def test_preemption_recomputes_and_matches_unconstrained(tiny_model):
    reqs = lambda: [req(i, n=12, params=SamplingParams(temperature=0.0, max_tokens=40,  # noqa
                                                       ignore_eos=True)) for i in range(6)]
    roomy = run(make_loop(tiny_model), reqs())
    tight_loop = make_loop(tiny_model, num_pages=20)  # 19 usable pages for 6 x 7 pages of need
    tight = run(tight_loop, reqs())
    assert tight == roomy
    assert sum(t.metrics.num_preemptions for t in tight_loop.finished.values()) > 0
    assert_all_pages_free(tight_loop)


def test_export_import_pages_bit_exact(tiny_model):
    loop = make_loop(tiny_model)
    src = loop.decoders[0]
    dst = DecodeEngine(tiny_model, src.config)
    loop.add_request(req(7, n=37, params=SamplingParams(temperature=0.0, max_tokens=50)))
    for _ in range(4):
        loop.step()
    n = src.pages_held("r7")
    k, v = src.export_pages("r7", 0, n)
    dst.reserve("r7", n)
    dst.import_pages("r7", 0, k, v, n)
    k2, v2 = dst.export_pages("r7", 0, n)
    np.testing.assert_array_equal(np.asarray(k)[:, :n], np.asarray(k2)[:, :n])
    np.testing.assert_array_equal(np.asarray(v)[:, :n], np.asarray(v2)[:, :n])
    with pytest.raises(IndexError, match="outside its"):
        src.export_pages("r7", 0, n + 1)
    with pytest.raises(IndexError, match="reserved"):
        dst.import_pages("r7", n - 1, k, v, 2)
    dst.release("r7")
    assert dst.num_free_pages == dst.capacity_pages


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tiny_model):
    loop = make_loop(tiny_model)
    p = lambda **kw: SamplingParams(max_tokens=20, ignore_eos=True, **kw)  # noqa: E731
    a = run(loop, [req(1, params=p(temperature=1.0, seed=123))])["r1"]
    b = run(make_loop(tiny_model), [req(1, params=p(temperature=1.0, seed=123))])["r1"]
    c = run(make_loop(tiny_model), [req(1, params=p(temperature=1.0, seed=7))])["r1"]
    g = run(make_loop(tiny_model), [req(1, params=p(temperature=0.0))])["r1"]
    k1 = run(make_loop(tiny_model), [req(1, params=p(temperature=1.0, top_k=1, seed=5))])["r1"]
    assert a == b and a != c and k1 == g


def test_stop_token_ids_min_tokens_and_logprobs(tiny_model):
    base = run(make_loop(tiny_model), [req(3, params=SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True))])["r3"]
    stop_tok = base[5]
    first = base.index(stop_tok)
    loop = make_loop(tiny_model)
    out = run(loop, [req(3, params=SamplingParams(temperature=0.0, max_tokens=20,
                                                   stop_token_ids=(stop_tok,), logprobs=3))])
    assert out["r3"] == base[: first + 1]
    tr = loop.finished["r3"]
    assert tr.finish_reason == "stop" and tr.stop_reason == stop_tok
    for chosen, lp in zip(tr.token_ids, tr.logprobs):
        assert chosen in lp and len(lp) >= 3
        top = sorted(lp.values(), reverse=True)
        assert lp[chosen] == pytest.approx(top[0], abs=1e-5)  # greedy picks the top token
    # min_tokens bans EOS: the model's EOS (3) cannot appear before 15 tokens.
    eos_loop = make_loop(tiny_model)
    out = run(eos_loop, [req(i, params=SamplingParams(temperature=1.0, seed=i, max_tokens=30,
                                                      min_tokens=15)) for i in range(8)])
    for ids in out.values():
        assert 3 not in ids[:14] and len(ids) >= 15


def test_first_argmax_matches_argmax_including_ties():
    import jax.numpy as jnp

    from ares_jax.engine.sampling import first_argmax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(33, 1000)).astype(np.float32)
    x[3, [10, 500, 999]] = 9.0  # a tie: the first maximum wins, as in argmax
    x[4, :] = -np.inf
    x[5, [0, 7]] = [-np.inf, 50.0]
    got = np.asarray(first_argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got[3] == 10 and got.dtype == np.int32
    x[6, 20] = np.nan  # no maximum to match: the id stays in range
    assert 0 <= int(first_argmax(jnp.asarray(x))[6]) < 1000
