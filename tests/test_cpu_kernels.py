"""The XLA:CPU kernels (paged attention, layer matmul) against XLA, their errors, and engine
selection."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ares_jax.engine.decode import DecodeEngine, resolve_decode_backend
from ares_jax.engine.types import EngineConfig
from ares_jax.kernels import build, matmul
from ares_jax.kernels import paged_attention as kernel
from ares_jax.model import Config, decode_step, make_mesh
from ares_jax.model.model import init_random_weights, pack_for_cpu_kernels, paged_attention_xla

# Only a missing compiler skips: with one, a kernel that fails to build must fail these tests
# (the engine alone would quietly fall back to XLA).
pytestmark = pytest.mark.skipif(build.find_compiler() is None,
                                reason="no C++ compiler on this machine to build the kernels")


def random_case(seed: int, *, batch: int, kv_heads: int, group: int, head_dim: int,
                page_size: int = 4, width: int = 5, layers: int = 3, pages: int = 41):
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    q = f(batch, kv_heads, group, head_dim)
    k_self, v_self = f(batch, kv_heads, head_dim), f(batch, kv_heads, head_dim)
    pool = (layers, pages, page_size, kv_heads, head_dim)
    k_pool, v_pool = f(*pool), f(*pool)
    # Scrambled page ids, so the page table is really followed; unused slots hold page 0.
    table = rng.permutation(pages)[: batch * width].reshape(batch, width).astype(np.int32)
    # Nothing cached, part of one page, a page boundary, part-way, and the whole table.
    choices = [0, 1, page_size, page_size * width // 2 + 1, page_size * width]
    positions = np.array([choices[i % len(choices)] for i in range(batch)], np.int32)
    for b, n in enumerate(positions):
        table[b, -(-n // page_size):] = 0
    return q, k_self, v_self, k_pool, v_pool, table, positions


@pytest.mark.parametrize("head_dim,group", [(16, 1), (64, 3), (24, 2)])  # 24: the scalar path
@pytest.mark.parametrize("layer", [0, 2])
def test_kernel_matches_xla_formulation(head_dim, group, layer):
    q, ks, vs, kp, vp, table, pos = random_case(head_dim + layer, batch=7, kv_heads=2,
                                                group=group, head_dim=head_dim)
    scale = 1 / math.sqrt(head_dim)
    want = paged_attention_xla(q, ks, vs, kp[layer], vp[layer], table, pos, scale)
    got = jax.jit(kernel.paged_attention, static_argnames="scale")(
        q, ks, vs, kp, vp, jnp.int32(layer), table, pos, scale=scale)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # A sequence with nothing cached attends only to itself: its output is its own value.
    np.testing.assert_allclose(got[0], np.broadcast_to(vs[0][:, None], got[0].shape), atol=1e-6)


def test_kernel_refuses_bad_page_ids_and_layers():
    q, ks, vs, kp, vp, table, pos = random_case(0, batch=2, kv_heads=1, group=1, head_dim=16)
    table[1, 0] = kp.shape[1]
    with pytest.raises(Exception, match="page id out of range"):
        kernel.paged_attention(q, ks, vs, kp, vp, jnp.int32(0), table, pos, scale=1.0)
    table[1, 0] = 0
    with pytest.raises(Exception, match="layer index out of range"):
        kernel.paged_attention(q, ks, vs, kp, vp, jnp.int32(kp.shape[0]), table, pos, scale=1.0)
    with pytest.raises(TypeError, match="float32"):
        kernel.paged_attention(q.astype(jnp.bfloat16), ks, vs, kp, vp, jnp.int32(0), table, pos,
                               scale=1.0)


def test_build_without_a_compiler_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("ARES_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(build.KernelUnavailable, match="no-such-compiler"):
        build.build()
    assert not list(tmp_path.glob("*.so*"))  # no partial library left behind


def test_build_is_cached_per_source_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("ARES_JAX_CACHE_DIR", str(tmp_path))
    first = build.build()
    stamp = first.stat().st_mtime_ns
    assert build.build() == first and first.stat().st_mtime_ns == stamp
    assert first.parent == tmp_path


def test_engine_picks_and_validates_the_attention_implementation(tiny_model):
    assert resolve_decode_backend("auto", tiny_model) == "cpu_kernel"
    assert resolve_decode_backend("xla", tiny_model) == "xla"
    with pytest.raises(ValueError, match="EngineConfig.decode_backend"):
        EngineConfig(decode_backend="flash")
    two = dataclasses.replace(tiny_model, mesh=make_mesh(jax.devices()[:2]))
    assert resolve_decode_backend("auto", two) == "xla"
    with pytest.raises(ValueError, match="one-device CPU mesh"):
        DecodeEngine(two, EngineConfig(decode_backend="cpu_kernel", num_pages=16))
    bf16 = dataclasses.replace(tiny_model, cfg=dataclasses.replace(tiny_model.cfg,
                                                                   dtype="bfloat16"))
    assert resolve_decode_backend("auto", bf16) == "xla"
    with pytest.raises(ValueError, match="float32 only"):
        resolve_decode_backend("cpu_kernel", bf16)


@pytest.mark.parametrize("rows", [1, 3, 8, 11, 20])
@pytest.mark.parametrize("cols", [64, 192])
def test_layer_matmul_matches_numpy(rows, cols):
    rng = np.random.default_rng(rows * cols)
    x = rng.standard_normal((rows, 24), dtype=np.float32)
    w = rng.standard_normal((3, 24, cols), dtype=np.float32)
    packed = matmul.pack(w)
    np.testing.assert_array_equal(packed[2, -1], w[2, :, -64:])  # last strip of layer 2
    got = jax.jit(matmul.layer_matmul)(x, packed, jnp.int32(2))
    np.testing.assert_allclose(got, x.astype(np.float64) @ w[2], rtol=1e-5, atol=1e-5)


def test_layer_matmul_refuses_what_it_cannot_do():
    x = np.ones((2, 8), np.float32)
    assert not matmul.supports(np.ones((2, 8, 80), np.float32))
    with pytest.raises(TypeError, match="packed w"):
        matmul.layer_matmul(x, np.ones((2, 8, 64), np.float32), jnp.int32(0))
    with pytest.raises(Exception, match="layer index out of range"):
        matmul.layer_matmul(x, matmul.pack(np.ones((2, 8, 64), np.float32)), jnp.int32(2))


def test_decode_step_kernels_match_xla_with_odd_sizes():
    """Projections whose width is not a multiple of 64 (d_model 40) keep XLA's dot, the others
    (ffn 128, the tied lm_head over a 64-token vocabulary) run as kernels; head_dim 20 takes the
    scalar attention path."""
    cfg = Config(vocab_size=64, d_model=40, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=20,
                 ffn_dim=128, dtype="float32")
    w = init_random_weights(cfg, jax.random.key(1), scale=0.3)
    q, ks, vs, kp, vp, table, pos = random_case(3, batch=5, kv_heads=1, group=2, head_dim=20,
                                                layers=2)
    tokens = jnp.arange(5, dtype=jnp.int32) + 7
    step = jax.jit(decode_step, static_argnames=("cfg", "backend"))
    want = step(w, cfg=cfg, k_pages=kp, v_pages=vp, tokens=tokens, positions=pos,
                page_table=table, backend="xla")
    packed = pack_for_cpu_kernels(w)
    assert sorted(packed) == ["lm_head", "w_gate", "w_up"]
    got = step(w, cfg=cfg, k_pages=kp, v_pages=vp, tokens=tokens, positions=pos,
               page_table=table, backend="cpu_kernel", packed=packed)
    for name in ("logits", "hidden", "hidden_tap", "k", "v"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)
