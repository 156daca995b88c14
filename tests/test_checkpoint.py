"""orbax save/restore of converted weights: round trips, target shardings, bad checkpoints."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ares_jax.model import Config, checkpoint, load_model, make_mesh
from ares_jax.model.errors import CorruptFileError, TensorShapeError
from ares_jax.model.model import is_shape_leaf, weight_shapes
from ares_jax.model.sharding import weight_shardings
from ares_jax.model.tokenizer import from_hf_dir

REPO = Path(__file__).resolve().parents[1]
# 8 heads / 4 KV heads / FFN 128 / vocab 256 all divide a 4-way model axis.
BIASED = Config(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
                ffn_dim=128, qkv_bias=True, tie_embeddings=False, dtype="float32",
                eos_token_ids=(2, 5), bos_token_id=1)
# Tied and bias-free: the absent lm_head and biases must survive as None.
TIED = dataclasses.replace(BIASED, qkv_bias=False, tie_embeddings=True, eos_token_ids=())


def _random_weights(cfg: Config, seed: int):
    # numpy, not model.init_random_weights: that compiles one op per leaf shape (seconds).
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda shape: jax.numpy.asarray(rng.normal(size=shape), cfg.jnp_dtype),
                        weight_shapes(cfg), is_leaf=is_shape_leaf)


def _leaves(weights) -> dict[str, jax.Array | None]:
    flat, _ = jax.tree_util.tree_flatten_with_path(weights, is_leaf=lambda x: x is None)
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import tiny_hf

    path = tmp_path_factory.mktemp("tok")
    tiny_hf.write_tokenizer(path)
    return from_hf_dir(path, eos_token_ids=(2, 5))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer) -> dict[str, tuple[Path, Config, object]]:
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, cfg, tok in (("biased", BIASED, tokenizer), ("tied", TIED, None)):
        weights = _random_weights(cfg, len(out))
        out[name] = (checkpoint.save(root / name, cfg, weights, tok), cfg, weights)
    return out


@pytest.mark.parametrize("name", ["biased", "tied"])
def test_round_trip_is_exact(saved, tokenizer, name):
    path, cfg, weights = saved[name]
    assert checkpoint.is_checkpoint(path)
    mesh = make_mesh(jax.devices()[:1])
    cfg2, weights2, tok2 = checkpoint.restore(path, mesh=mesh)
    assert cfg2 == cfg
    before, after = _leaves(weights), _leaves(weights2)
    assert before.keys() == after.keys()
    for key, leaf in before.items():
        if leaf is None:
            assert after[key] is None, key
        else:
            assert after[key].dtype == leaf.dtype, key
            np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(leaf), err_msg=key)
    if name == "tied":
        assert tok2 is None and weights2.lm_head is None and weights2.layers.bq is None
        return
    for field in ("eos_token_ids", "bos_token_id", "add_bos", "chat_template",
                  "backend_adds_special"):
        assert getattr(tok2, field) == getattr(tokenizer, field), field
    assert tok2.backend.to_str() == tokenizer.backend.to_str()
    assert tok2.encode("hello jax") == tokenizer.encode("hello jax")


def test_restore_into_sharded_mesh(saved):
    path, cfg, weights = saved["biased"]
    mesh = make_mesh(data=2, model=4)
    loaded = load_model(path, mesh=mesh)  # dispatches to checkpoint.restore
    assert loaded.cfg == cfg
    expected = _leaves(weight_shardings(cfg, mesh))
    for key, leaf in _leaves(loaded.weights).items():
        assert leaf.sharding.is_equivalent_to(expected[key], leaf.ndim), key
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(_leaves(weights)[key]))
    assert loaded.weights.layers.wq.sharding.spec[2] == "model"
    assert loaded.weights.layers.bk.sharding.spec[1] == "model"
    assert loaded.weights.lm_head.sharding.spec[1] == "model"
    assert {s.data.shape for s in loaded.weights.layers.w_up.addressable_shards} == {(2, 64, 32)}


def test_restore_with_dtype_override(saved):
    path, _, weights = saved["tied"]
    cfg, restored, _ = checkpoint.restore(path, mesh=make_mesh(jax.devices()[:1]),
                                          dtype="bfloat16")
    assert cfg.dtype == "bfloat16"
    assert restored.embed.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(restored.embed),
                                  np.asarray(weights.embed.astype(jax.numpy.bfloat16)))


def test_convert_script_hf_to_checkpoint(tmp_path):
    import tiny_hf

    src = tiny_hf.write(tiny_hf.build("Qwen2ForCausalLM"), tmp_path / "hf")
    tiny_hf.write_tokenizer(src)
    spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                                  REPO / "scripts" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(src), str(tmp_path / "out"), "--dtype", "float32"]) == 0

    direct = load_model(src, dtype="float32")
    restored = load_model(tmp_path / "out")
    assert restored.cfg == direct.cfg
    assert restored.tokenizer.encode("hello world") == direct.tokenizer.encode("hello world")
    for key, leaf in _leaves(direct.weights).items():
        other = _leaves(restored.weights)[key]
        if leaf is None:
            assert other is None, key
        else:
            np.testing.assert_array_equal(np.asarray(other), np.asarray(leaf), err_msg=key)


# ----------------------------------------------------------------------------- bad checkpoints


@pytest.fixture
def broken(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved["biased"][0], tmp_path / "ckpt"))


def _mesh():
    return make_mesh(jax.devices()[:1])


def test_missing_checkpoint(tmp_path):
    assert not checkpoint.is_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        checkpoint.restore(tmp_path / "nope", mesh=_mesh())
    with pytest.raises(FileNotFoundError, match="not an ares-jax checkpoint"):
        checkpoint.restore(tmp_path, mesh=_mesh())


def test_refuses_to_overwrite(saved, tmp_path):
    path, cfg, weights = saved["tied"]
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint.save(path, cfg, weights)
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an ares-jax checkpoint"):
        checkpoint.save(tmp_path, cfg, weights, overwrite=True)
    assert (tmp_path / "precious.txt").exists()


def test_save_rejects_weights_that_disagree_with_config(tmp_path):
    weights = _random_weights(TIED, 0)
    with pytest.raises(TensorShapeError, match="embed"):
        checkpoint.save(tmp_path / "x", dataclasses.replace(TIED, vocab_size=128), weights)


def test_corrupt_manifest(broken):
    (broken / checkpoint.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CorruptFileError, match=checkpoint.MANIFEST_FILE):
        checkpoint.restore(broken, mesh=_mesh())


def test_missing_weights_dir(broken):
    shutil.rmtree(broken / checkpoint.WEIGHTS_DIR)
    with pytest.raises(CorruptFileError, match="no weights/ directory"):
        load_model(broken)


def test_config_disagrees_with_weights(broken):
    manifest = json.loads((broken / checkpoint.MANIFEST_FILE).read_text())
    manifest["config"]["ffn_dim"] = 96
    (broken / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(TensorShapeError, match="w_gate.*96"):
        checkpoint.restore(broken, mesh=_mesh())


def test_truncated_array_data(broken):
    data_files = [p for p in (broken / checkpoint.WEIGHTS_DIR).rglob("*")
                  if p.is_file() and p.stat().st_size > 4096]
    assert data_files
    for p in data_files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    # In a child process: orbax abandons its other in-flight reads when one fails, and their
    # coroutines print "Event loop is closed" tracebacks when the interpreter exits.
    code = ("import sys, jax\n"
            "from ares_jax.model import checkpoint, make_mesh\n"
            "from ares_jax.model.errors import CorruptFileError\n"
            "try:\n"
            "    checkpoint.restore(sys.argv[1], mesh=make_mesh(jax.devices()[:1]))\n"
            "except CorruptFileError as err:\n"
            "    print('CAUGHT', err)\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code, str(broken)], capture_output=True,
                          text=True, env=env, timeout=120)
    caught = [line for line in proc.stdout.splitlines() if line.startswith("CAUGHT")]
    assert caught, proc.stdout + proc.stderr
    assert str(broken / checkpoint.WEIGHTS_DIR) in caught[0] and "corrupt" in caught[0]
