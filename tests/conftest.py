"""Test-wide setup: 8 virtual CPU devices, set before JAX initialises."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2-135M-Instruct, loaded once per test session (f32, one device)."""
    from ares_jax.model import load_model

    return load_model(dtype="float32")


@pytest.fixture(scope="session")
def embedded_llm():
    """One ``LLM`` on the embedded model (f32, the packaged length head) for every end-to-end
    module: its jitted prefill and decode steps compile once per session, not once per module.
    Tests leave it idle and leak-free."""
    from ares_jax import LLM

    return LLM(dtype="float32", max_model_len=512, max_num_seqs=16, num_pages=512,
               page_size=16)


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny random Llama (2 layers) with a known config, for fast engine tests."""
    import jax

    from ares_jax.model import Config, make_mesh
    from ares_jax.model.loader import LoadedModel
    from ares_jax.model.model import init_random_weights
    from ares_jax.model.sharding import DEFAULT_RULES

    cfg = Config(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 ffn_dim=128, max_seq_len=512, dtype="float32", eos_token_ids=(3,))
    weights = init_random_weights(cfg, jax.random.key(0), scale=0.2)
    mesh = make_mesh(jax.devices()[:1])
    return LoadedModel(cfg, weights, None, mesh, DEFAULT_RULES, "random")
