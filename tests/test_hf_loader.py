"""HF checkpoint loading, checked against transformers; prefill/decode and sharded parity."""

from __future__ import annotations

import copy
import functools
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import tiny_hf
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ares_jax.kernels import build as cpu_kernels
from ares_jax.model import decode_step, forward, load_model, make_mesh, prefill
from ares_jax.model.errors import (
    CorruptFileError,
    MissingTensorError,
    TensorShapeError,
    UnsupportedArchitectureError,
)
from ares_jax.model.hf_loader import load_hf_dir
from ares_jax.model.model import pack_for_cpu_kernels

TOKENS = np.random.RandomState(0).randint(0, 256, (2, 40)).astype(np.int32)
jit_forward = jax.jit(forward, static_argnums=1)

# name -> (architecture, config overrides, save_pretrained kwargs)
VARIANTS = {
    # Llama-3 rope scaling, split into many shards through model.safetensors.index.json.
    "llama3_sharded": ("LlamaForCausalLM",
                       dict(rope_parameters=tiny_hf.LLAMA3_ROPE, eos_token_id=[2, 7]),
                       dict(max_shard_size="40KB")),
    "llama_tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True), {}),
    # 8 heads / 4 KV heads, so both shard 4 ways in the sharded test.
    "qwen2": ("Qwen2ForCausalLM", dict(num_attention_heads=8, num_key_value_heads=4), {}),
    "qwen2_tied": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True), {}),
    # head_dim set explicitly, and != hidden_size / num_attention_heads.
    "mistral": ("MistralForCausalLM", dict(head_dim=32, sliding_window=256), {}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for seed, (name, (arch, overrides, save_kwargs)) in enumerate(VARIANTS.items()):
        model = tiny_hf.build(arch, seed=seed, **overrides)
        out[name] = (tiny_hf.write(model, root / name, **save_kwargs), model)
    tiny_hf.write_tokenizer(root / "llama3_sharded")
    # bf16 on disk: the reference runs in f32 on the same bf16-rounded weights. (Round the
    # parameters only: casting the whole module would also round RoPE's inv_freq buffer.)
    model = tiny_hf.build("LlamaForCausalLM", seed=99)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    path = tiny_hf.write(copy.deepcopy(model).to(torch.bfloat16), root / "llama_bf16")
    out["llama_bf16"] = (path, model)
    return out


@pytest.mark.parametrize("variant", [*VARIANTS, "llama_bf16"])
def test_logits_match_transformers(checkpoints, variant):
    path, ref = checkpoints[variant]
    loaded = load_model(path, dtype="float32")
    ours = np.asarray(jit_forward(loaded.weights, loaded.cfg, TOKENS))
    np.testing.assert_allclose(ours, tiny_hf.torch_logits(ref, TOKENS), rtol=1e-4, atol=1e-4)


def test_config_mapping(checkpoints):
    path = checkpoints["llama3_sharded"][0]
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 2
    cfg, weights, tok = load_hf_dir(path, dtype="float32")
    assert cfg.architecture == "llama" and not cfg.qkv_bias and not cfg.tie_embeddings
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim) == (4, 2, 16, 128)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling is not None and cfg.rope_scaling.original_max_position == 32
    assert cfg.rope_scaling.factor == 8.0
    assert cfg.eos_token_ids == (2, 7) and cfg.bos_token_id is not None
    assert weights.layers.wq.shape == (2, 64, 4, 16) and weights.lm_head.shape == (64, 256)
    assert weights.embed.dtype == np.float32

    assert tok is not None and tok.eos_token_ids == (2, 7)
    assert tok.encode("hello world") == [3, 4]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "user: hi\n"

    cfg, weights, tok = load_hf_dir(checkpoints["mistral"][0])
    assert cfg.head_dim == 32 and cfg.max_seq_len == 256 and tok is None
    cfg, weights, _ = load_hf_dir(checkpoints["qwen2_tied"][0])
    assert cfg.qkv_bias and cfg.tie_embeddings and weights.lm_head is None
    assert weights.layers.bk.shape == (2, 2, 16)


def test_bf16_target_dtype(checkpoints):
    _, weights, _ = load_hf_dir(checkpoints["llama_bf16"][0], dtype="bfloat16")
    assert weights.layers.wq.dtype == np.dtype(jax.numpy.bfloat16)


def test_prefill_taps_match_transformers_hidden_states(checkpoints):
    path, ref = checkpoints["llama3_sharded"]
    loaded = load_model(path, dtype="float32")
    out = jax.jit(prefill, static_argnums=(1, 4))(
        loaded.weights, loaded.cfg, TOKENS, np.array([40, 40], np.int32), 1)
    with torch.no_grad():
        hs = ref(torch.as_tensor(TOKENS), output_hidden_states=True).hidden_states
    # hidden_states[i] is the output of i blocks; the last one has the final norm applied.
    np.testing.assert_allclose(out["hidden_tap"], hs[1][:, -1].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["hidden"], hs[-1][:, -1].numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["xla", "cpu_kernel"])
def test_prefill_and_paged_decode_agree_with_forward(checkpoints, backend):
    if backend == "cpu_kernel" and cpu_kernels.find_compiler() is None:
        pytest.skip("no C++ compiler on this machine to build the CPU kernels")
    loaded = load_model(checkpoints["llama3_sharded"][0], dtype="float32")
    w, cfg = loaded.weights, loaded.cfg
    lengths = np.array([13, 21], np.int32)
    n_decode, page_size, pages_per_seq = 4, 4, 8
    full = TOKENS[:, : lengths.max() + n_decode].copy()
    # Each row continues its prompt with decode tokens; causality makes one padded forward
    # the reference for every step of both rows.
    for b, n in enumerate(lengths):
        full[b, n:n + n_decode] = TOKENS[1 - b, :n_decode]
    ref = np.asarray(jit_forward(w, cfg, full))

    prompts = np.where(np.arange(lengths.max()) < lengths[:, None], full[:, : lengths.max()], 0)
    pre = jax.jit(prefill, static_argnums=1)(w, cfg, prompts, lengths)
    np.testing.assert_allclose(pre["logits"], ref[[0, 1], lengths - 1], rtol=1e-4, atol=1e-4)

    # Pool pages in a scrambled order, so that the page table really is followed.
    n_pages = 2 * pages_per_seq + 3
    page_table = np.random.RandomState(1).permutation(n_pages)[: 2 * pages_per_seq]
    page_table = page_table.reshape(2, pages_per_seq).astype(np.int32)
    pool_shape = (cfg.n_layers, n_pages, page_size, cfg.n_kv_heads, cfg.head_dim)
    k_pages, v_pages = np.zeros(pool_shape, np.float32), np.zeros(pool_shape, np.float32)

    def write(b: int, pos: int, k: np.ndarray, v: np.ndarray) -> None:
        page, slot = page_table[b, pos // page_size], pos % page_size
        k_pages[:, page, slot], v_pages[:, page, slot] = k, v

    for b, n in enumerate(lengths):
        for t in range(n):
            write(b, t, np.asarray(pre["k"][:, b, t]), np.asarray(pre["v"][:, b, t]))

    packed = pack_for_cpu_kernels(w) if backend == "cpu_kernel" else None
    step = jax.jit(functools.partial(decode_step, backend=backend, packed=packed),
                   static_argnums=1)
    positions = lengths.copy()
    for _ in range(n_decode):
        tokens = full[[0, 1], positions]
        out = step(w, cfg, k_pages, v_pages, tokens, positions, page_table)
        np.testing.assert_allclose(out["logits"], ref[[0, 1], positions], rtol=1e-4, atol=1e-4)
        for b in range(2):
            write(b, positions[b], np.asarray(out["k"][:, b]), np.asarray(out["v"][:, b]))
        positions = positions + 1


def test_sharded_forward_matches_unsharded(checkpoints):
    path, ref = checkpoints["qwen2"]
    mesh = make_mesh(data=2, model=4)
    sharded = load_model(path, dtype="float32", mesh=mesh)
    layers = sharded.weights.layers
    assert layers.wq.sharding.spec == P(None, None, "model", None)
    assert layers.wk.sharding.spec == P(None, None, "model", None)
    assert layers.w_down.sharding.spec == P(None, "model", None)
    assert len(layers.wq.addressable_shards) == 8

    tokens = jax.device_put(TOKENS, NamedSharding(mesh, P("data", None)))
    sharded_forward = jax.jit(forward, static_argnums=1,
                              out_shardings=NamedSharding(mesh, P("data", None, None)))
    out = sharded_forward(sharded.weights, sharded.cfg, tokens)
    assert out.sharding.spec == P("data", None, None)

    single = load_model(path, dtype="float32")
    expected = np.asarray(jit_forward(single.weights, single.cfg, TOKENS))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), tiny_hf.torch_logits(ref, TOKENS),
                               rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def broken(checkpoints, tmp_path) -> Path:
    """A private copy of a single-file checkpoint, for a test to damage."""
    return Path(shutil.copytree(checkpoints["llama_tied"][0], tmp_path / "ckpt"))


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_model(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_hf_dir(tmp_path / "does-not-exist")


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(broken)


def test_missing_safetensors(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_hf_dir(broken)


def test_missing_shard_listed_in_index(checkpoints, tmp_path):
    path = Path(shutil.copytree(checkpoints["llama3_sharded"][0], tmp_path / "ckpt"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        load_hf_dir(path)


def test_unsupported_architecture(broken):
    _edit_config(broken, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel") as err:
        load_model(broken)
    assert "LlamaForCausalLM" in str(err.value) and "Qwen2ForCausalLM" in str(err.value)


def test_unsupported_rope_type(broken):
    _edit_config(broken, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(UnsupportedArchitectureError, match="yarn"):
        load_hf_dir(broken)


def test_tensor_shape_mismatch(broken):
    _edit_config(broken, intermediate_size=96)
    with pytest.raises(TensorShapeError, match="model.layers.0.mlp.gate_proj.weight") as err:
        load_model(broken)
    assert "(128, 64)" in str(err.value) and "(96, 64)" in str(err.value)


def test_truncated_safetensors(broken):
    file = broken / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match="model.safetensors.*truncated"):
        load_model(broken)


def test_truncated_safetensors_header(broken):
    file = broken / "model.safetensors"
    file.write_bytes(file.read_bytes()[:5])
    with pytest.raises(CorruptFileError, match="model.safetensors.*too short"):
        load_hf_dir(broken)


def test_missing_tensor(broken):
    from safetensors.numpy import load_file, save_file

    file = broken / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(MissingTensorError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(broken)


def test_untied_config_without_lm_head(broken):
    _edit_config(broken, tie_word_embeddings=False)
    with pytest.raises(MissingTensorError, match="lm_head.weight"):
        load_hf_dir(broken)
