"""What a serving process loads: a model spec (a path, the embedded model, or a seeded random
model for tests and benchmarks), its predictor head, and engines on each mesh."""

from __future__ import annotations

from pathlib import Path

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ares_jax.engine.types import EngineConfig
from ares_jax.model.loader import LoadedModel, load_model, on_mesh
from ares_jax.model.sharding import DEFAULT_RULES, make_mesh

# Seeded random models by name: every process that loads one gets identical weights, so a
# multi-process test can compare against an in-process reference without any checkpoint.
RANDOM_PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 ffn_dim=128, max_seq_len=512, eos_token_ids=(3,)),
    "small": dict(vocab_size=2048, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4,
                  head_dim=32, ffn_dim=768, max_seq_len=2048, eos_token_ids=(3,)),
}
EMBEDDED = "embedded"
DEFAULT_PREDICTOR = "default"  # the packaged length head, for the embedded model only


def load_serving_model(spec: str | None, *, dtype: str | None = None,
                       mesh: Mesh | None = None) -> LoadedModel:
    """``spec``: None or "embedded" (SmolLM2-135M-Instruct), a checkpoint path, or
    ``random:<preset>`` (``RANDOM_PRESETS``; seed 0)."""
    mesh = mesh if mesh is not None else make_mesh(jax.devices()[:1])
    if spec and spec.startswith("random:"):
        from ares_jax.model.model import Config, init_random_weights

        name = spec.split(":", 1)[1]
        if name not in RANDOM_PRESETS:
            raise ValueError(f"unknown random model {name!r}; one of {sorted(RANDOM_PRESETS)}")
        cfg = Config(**RANDOM_PRESETS[name], dtype=dtype or "float32")
        weights = init_random_weights(cfg, jax.random.key(0), scale=0.2)
        from ares_jax.model.sharding import place_weights

        weights = place_weights(weights, cfg, mesh, DEFAULT_RULES)
        return LoadedModel(cfg, weights, None, mesh, DEFAULT_RULES, spec)
    path = None if spec in (None, "", EMBEDDED) else Path(spec)
    return load_model(path, dtype=dtype, mesh=mesh)


def model_name(spec: str | None, model: LoadedModel) -> str:
    if spec in (None, "", EMBEDDED):
        return "SmolLM2-135M-Instruct"
    return Path(spec).name if not spec.startswith("random:") else spec


def resolve_head(model: LoadedModel, predictor: str | Path | None, *, embedded: bool,
                 engine: EngineConfig):
    """The fused length head: ``"default"`` (the packaged head, embedded model only), None
    (off), or a head checkpoint directory."""
    from ares_jax.predictor.serving import DEFAULT_HEAD_DIR, load_engine_head

    if predictor is None:
        return None
    if predictor == DEFAULT_PREDICTOR:
        if not embedded or not DEFAULT_HEAD_DIR.is_dir():
            return None
        predictor = DEFAULT_HEAD_DIR
    cfg = model.cfg
    return load_engine_head(predictor, cfg.d_model, n_layers=cfg.n_layers,
                            tap_layer=engine.tap_layer or cfg.default_tap_layer,
                            mesh=model.mesh)


def head_on(head, mesh: Mesh):
    """The head's parameters replicated onto ``mesh`` (jit needs them co-located)."""
    if head is None:
        return None
    fn, params = head
    return fn, jax.device_put(params, NamedSharding(mesh, PartitionSpec()))


def model_on(model: LoadedModel, mesh: Mesh) -> LoadedModel:
    return model if model.mesh == mesh else on_mesh(model, mesh)



def load_tokenizer(spec: str | None):
    """The tokenizer alone, for the scheduler process (no weights are loaded)."""
    from ares_jax.model import gguf_loader

    if spec and spec.startswith("random:"):
        return None
    path = gguf_loader.embedded_model_path() if spec in (None, "", EMBEDDED) else Path(spec)
    if path.suffix == ".gguf":
        return gguf_loader.load_gguf_tokenizer(path)
    if path.is_dir() and (path / "tokenizer.json").exists():
        from ares_jax.model.tokenizer import from_hf_dir

        return from_hf_dir(path)
    return load_model(path, dtype="float32").tokenizer
