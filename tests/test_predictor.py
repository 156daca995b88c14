"""The length predictor: data format, learning a planted signal, checkpoints, fused inference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ares_jax.predictor import data as fmt
from ares_jax.predictor.baselines import MedianBaseline, SurvivalTable
from ares_jax.predictor.checkpoint import load_head, read_meta, save_head
from ares_jax.predictor.config import HeadConfig, TrainConfig
from ares_jax.predictor.heads import LengthHead
from ares_jax.predictor.train import Points, member_predictions, predict_points, train_head


def _record(index, out_len, cap, d, rng, finish="stop"):
    ts = list(range(0, out_len, 16))
    return fmt.RequestRecord(
        index=index, source="synthetic", prompt_ids=list(rng.integers(0, 100, 5 + index)),
        output_ids=list(rng.integers(0, 100, out_len)), finish_reason=finish, max_tokens=cap,
        t=ts, hidden=[rng.normal(size=d) for _ in ts], hidden_tap=[rng.normal(size=d) for _ in ts])


def test_shards_round_trip_with_capped_labels(tmp_path):
    rng = np.random.default_rng(0)
    cap, d = 64, 8
    recs = [_record(0, 20, cap, d, rng), _record(1, cap, cap, d, rng, "length"),
            _record(2, 33, cap, d, rng)]
    fmt.write_shard(tmp_path / "a.npz", recs[:2], d)
    fmt.write_shard(tmp_path / "b.npz", recs[2:], d)
    fmt.write_manifest(tmp_path, {"shards": [{"file": "a.npz"}, {"file": "b.npz"}]})
    ds = fmt.load_dataset(tmp_path)
    assert ds.num_requests == 3 and list(ds.index) == [0, 1, 2]
    assert list(ds.finished_by_cap) == [False, True, False]
    assert [list(p) for p in ds.prompt_ids] == [r.prompt_ids for r in recs]
    capped = ds.sample_request == 1
    # A capped request's label is cap - t: fully observed under the serving cap.
    np.testing.assert_array_equal(ds.remaining[capped], cap - ds.t[capped])
    np.testing.assert_array_equal(ds.t[ds.sample_request == 2], [0, 16, 32])
    np.testing.assert_array_equal(ds.remaining[ds.sample_request == 2], [33, 17, 1])
    np.testing.assert_allclose(ds.hidden[0], recs[0].hidden[0].astype(np.float16))
    sub = ds.select_requests(np.array([2]))
    assert sub.num_requests == 1 and list(sub.remaining) == [33, 17, 1]
    a, b, c = fmt.split_by_request(np.arange(2000), seed=3)
    assert 1300 < len(a) < 1500 and 230 < len(b) < 370 and len(a) + len(b) + len(c) == 2000
    assert not set(a) & set(b) and not set(a) & set(c) and not set(b) & set(c)
    # Stable as a resumed collection grows: requests keep their side of the split.
    grown = fmt.split_by_request(np.arange(3000), seed=3)
    np.testing.assert_array_equal(grown[2][grown[2] < 2000], c)
    assert not np.array_equal(fmt.split_by_request(np.arange(2000), seed=4)[2], c)


def _planted(num_requests=300, d=16, cap=256, seed=0):
    """Hidden states that carry log(remaining) along one direction, buried in noise."""
    rng = np.random.default_rng(seed)
    out_len = rng.integers(8, cap + 1, num_requests)
    direction = rng.normal(size=d)
    req, ts, hid = [], [], []
    for r in range(num_requests):
        for t in range(0, out_len[r], 16):
            req.append(r)
            ts.append(t)
            hid.append(rng.normal(size=d) + direction * (np.log1p(out_len[r] - t) - 4.0))
    hid = np.asarray(hid, np.float16)
    return fmt.Dataset(
        index=np.arange(num_requests), source=np.array(["x"] * num_requests),
        prompt_len=np.full(num_requests, 4, np.int32), output_len=out_len.astype(np.int32),
        finished_by_cap=out_len == cap, max_tokens=np.full(num_requests, cap, np.int32),
        prompt_ids=[np.arange(4)] * num_requests, sample_request=np.asarray(req),
        t=np.asarray(ts, np.int32), hidden=hid, hidden_tap=hid)


@pytest.mark.parametrize("members", [1, 3])
def test_head_learns_planted_signal_and_checkpoints_round_trip(tmp_path, members):
    ds = _planted()
    cfg = TrainConfig(head=HeadConfig(hidden_sizes=(32,), dropout=0.0, members=members),
                      batch_size=64, max_epochs=12, learning_rate=3e-3, warmup_steps=10)
    result = train_head(ds, cfg, tmp_path, progress=False)
    train_rows, val_rows, test_rows = fmt.split_by_request(ds.index, cfg.split_seed)
    train, test = ds.select_requests(train_rows), ds.select_requests(test_rows)
    head = load_head(tmp_path / "best")
    pts = Points.from_dataset(test)
    mae = np.abs(predict_points(head, pts) - pts.remaining).mean()
    median = np.abs(MedianBaseline.fit(train.remaining).predict(pts.t, pts.max_tokens)
                    - pts.remaining).mean()
    table = np.abs(SurvivalTable.fit(train.t, train.remaining).predict(pts.t, pts.max_tokens)
                   - pts.remaining).mean()
    # The signal is in the hidden state, so the head must beat both t-only baselines clearly.
    assert mae < 0.5 * median and mae < 0.6 * table, (mae, median, table, result)
    assert (tmp_path / "latest" / "head.json").exists()
    # Orbax round trip: same config, same numbers.
    save_head(tmp_path / "copy", head)
    again = load_head(tmp_path / "copy")
    assert again.cfg == head.cfg
    np.testing.assert_array_equal(predict_points(again, pts), predict_points(head, pts))
    # The best checkpoint stacks each member's own best epoch; its recorded validation MAE is
    # the members' mean prediction, which is what predict() serves.
    meta = read_meta(tmp_path / "best")
    assert len(meta["member_epochs"]) == members == head.layers[0].kernel.shape[1]
    val = Points.from_dataset(ds.select_requests(val_rows))
    per_member = member_predictions(head, val)
    np.testing.assert_allclose(predict_points(head, val), per_member.mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.abs(per_member.mean(0) - val.remaining).mean(),
                               meta["val_mae"], rtol=1e-4)
    if members > 1:  # independently initialised: the members disagree
        assert np.abs(per_member[0] - per_member[1]).mean() > 0.1


def _random_head(d, layer="tap", loss="log_l1", seed=0, members=1):
    head = LengthHead(HeadConfig(hidden_sizes=(16,), layer=layer, loss=loss, members=members), d,
                      rngs=nnx.Rngs(seed))
    head.in_mean.set_value(jnp.full(d, 0.1))
    head.in_scale.set_value(jnp.full(d, 0.05))  # the state moves the estimate, the bias sets it
    head.out.bias.set_value(jnp.full((1, members, 1), 3.0))  # ~20 tokens, inside the clip range
    return head


def test_predictions_are_clipped_to_budget():
    head = _random_head(8, loss="l1")
    head.out.bias.set_value(jnp.full((1, 1, 1), 50.0))  # 5,000 tokens before clipping
    x = jnp.ones((3, 8))
    pred = head.predict(x, x, jnp.array([0, 10, 70]), jnp.array([64, 64, 64]))
    np.testing.assert_allclose(np.asarray(pred), [64, 54, 0])


def test_fused_head_in_prefill_and_decode_matches_standalone(tiny_model):
    from ares_jax.engine.decode import DecodeEngine
    from ares_jax.engine.prefill import PrefillEngine
    from ares_jax.engine.sampling import SamplingParams
    from ares_jax.engine.types import EngineConfig, Request
    from ares_jax.predictor.serving import engine_head

    head = _random_head(tiny_model.cfg.d_model, members=2)  # an ensemble, as shipped
    fused = engine_head(head, tiny_model.mesh)
    ecfg = EngineConfig(num_pages=64, max_num_seqs=4, max_model_len=256)
    pre = PrefillEngine(tiny_model, ecfg, head=fused)
    dec = DecodeEngine(tiny_model, ecfg, head=fused)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    reqs = [Request(request_id=f"r{i}", prompt_ids=list(range(5, 12 + 3 * i)), params=params)
            for i in range(3)]
    for res in pre.prefill(reqs):
        assert 5 < res.predicted_remaining < 30, res.predicted_remaining
        z = jnp.zeros(1, jnp.int32)
        alone = head.predict(res.hidden[None], res.hidden_tap[None], z, z + 30)
        np.testing.assert_allclose(res.predicted_remaining, float(alone[0]), rtol=1e-5)
        dec.insert(res)
    for step in range(3):
        out = dec.step()
        n = len(out.request_ids)
        generated = jnp.full(n, step + 1, jnp.int32)  # tokens generated incl. the one fed
        alone = head.predict(out.hidden[:n], out.hidden_tap[:n], generated,
                             jnp.full(n, 30, jnp.int32))
        np.testing.assert_allclose(out.predicted_remaining, np.asarray(alone), rtol=1e-5)


def test_head_with_wrong_hidden_size_is_refused(tmp_path):
    from ares_jax.predictor.serving import load_engine_head

    save_head(tmp_path / "h", _random_head(32))
    with pytest.raises(ValueError, match="hidden size 32.*hidden size is 64"):
        load_engine_head(tmp_path / "h", 64)
    fn, params = load_engine_head(tmp_path / "h", 32)
    assert callable(fn) and params.state is not None


def test_collector_records_every_k_tokens(tiny_model, tmp_path):
    from ares_jax.predictor.collect import Collector
    from ares_jax.predictor.config import CollectConfig

    cfg = CollectConfig(max_tokens=40, record_every=16, max_num_seqs=4, num_pages=64,
                        requests_per_shard=2, temperature=0.0)
    prompts = [(i, "synthetic", list(range(5, 10 + i))) for i in range(3)]
    manifest = Collector(tiny_model, cfg, tmp_path).run(progress=False, prompts=prompts)
    assert manifest["stats"]["requests"] == 3 and len(manifest["shards"]) == 2
    ds = fmt.load_dataset(tmp_path)
    for r in range(ds.num_requests):
        ts = ds.t[ds.sample_request == r]
        assert ts[0] == 0 and all(t % 16 == 0 for t in ts) and ts.max() < ds.output_len[r]
        assert len(ts) == len(range(0, int(ds.output_len[r]), 16))
    # Resuming finds everything done and adds nothing.
    again = Collector(tiny_model, cfg, tmp_path).run(progress=False, prompts=prompts)
    assert len(again["shards"]) == 2


@pytest.mark.slow
def test_llm_refuses_a_head_for_another_hidden_size(tmp_path):
    from ares_jax import LLM

    save_head(tmp_path / "h", _random_head(32))
    with pytest.raises(ValueError, match="hidden size 32.*hidden size is 576"):
        LLM(predictor=tmp_path / "h", num_pages=64, max_model_len=256)


@pytest.mark.parametrize("blocks", [0, 1])
def test_prompt_only_baseline_trains_and_round_trips(tiny_model, tmp_path, blocks):
    from ares_jax.predictor.prompt_only import (
        PromptOnlyConfig,
        PromptOnlyPredictor,
        t0_hidden,
        train_prompt_only,
    )

    ds = _planted(num_requests=40, d=tiny_model.cfg.d_model)
    rng = np.random.default_rng(1)
    ds.prompt_ids = [rng.integers(4, 500, int(rng.integers(3, 20))) for _ in range(40)]
    ds.prompt_len = np.array([p.size for p in ds.prompt_ids], np.int32)
    cfg = PromptOnlyConfig(trainable_blocks=blocks, epochs=2, batch_size=8)
    result = train_prompt_only(ds, cfg, tmp_path, progress=False, model=tiny_model)
    weights = sum(int(x.size) for x in jax.tree.leaves(tiny_model.weights))
    assert result["params"] == weights + tiny_model.cfg.d_model * 8 + 8  # the whole model
    loaded = PromptOnlyPredictor.load(tmp_path / "best", model=tiny_model)
    totals = loaded.predict_totals(ds.prompt_ids[:5])
    assert totals.shape == (5,) and set(totals) <= set(loaded.bucket_values)
    if blocks == 0:  # the recorded t = 0 states stand in for the prompt pass
        np.testing.assert_array_equal(
            loaded.predict_totals([], last_hidden=t0_hidden(ds)[:5]).shape, (5,))
