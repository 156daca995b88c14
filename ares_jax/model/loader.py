"""``load_model``: one entry point for every checkpoint format ares-jax reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from ares_jax.model.model import Config, Weights
from ares_jax.model.sharding import DEFAULT_RULES, ShardingRules, make_mesh, place_weights
from ares_jax.model.tokenizer import Tokenizer


@dataclasses.dataclass
class LoadedModel:
    cfg: Config
    weights: Weights
    tokenizer: Tokenizer | None
    mesh: Mesh
    rules: ShardingRules
    source: str
    # Derived arrays made once per model and shared by every engine on it (e.g. the weights
    # packed for the CPU decode kernels); ``cached`` fills it.
    derived: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per model and key; later calls return the same object."""
        if key not in self.derived:
            self.derived[key] = make()
        return self.derived[key]


def load_model(
    model: str | Path | None = None,
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
) -> LoadedModel:
    """Load weights straight into their target sharding on ``mesh``.

    ``model`` is None (the embedded SmolLM2-135M-Instruct), a ``.gguf`` file, a Hugging Face
    checkpoint directory (``config.json`` + ``*.safetensors``), or a directory written by
    ``ares_jax.model.checkpoint.save`` (orbax, fast restart).
    """
    from ares_jax.model import gguf_loader

    mesh = mesh if mesh is not None else make_mesh(jax.devices()[:1])
    path = gguf_loader.embedded_model_path() if model is None else Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    if path.is_dir():
        from ares_jax.model import checkpoint, hf_loader
    if path.is_dir() and checkpoint.is_checkpoint(path):
        cfg, weights, tok = checkpoint.restore(path, mesh=mesh, rules=rules, dtype=dtype)
        return LoadedModel(cfg, weights, tok, mesh, rules, str(path))
    if path.is_dir():
        cfg, host, tok = hf_loader.load_hf_dir(path, dtype=dtype)
    elif path.suffix == ".gguf":
        cfg, host, tok = gguf_loader.load_gguf(path, dtype=dtype)
    else:
        raise ValueError(f"{path}: not a .gguf file, an HF checkpoint directory or an ares-jax "
                         "checkpoint")
    weights = place_weights(host, cfg, mesh, rules)
    return LoadedModel(cfg, weights, tok, mesh, rules, str(path))


def on_mesh(model: LoadedModel, mesh: Mesh) -> LoadedModel:
    """The same weights placed on another mesh (device to device: the file is not re-read)."""
    from ares_jax.model.sharding import weight_shardings

    weights = jax.device_put(model.weights, weight_shardings(model.cfg, mesh, model.rules))
    return dataclasses.replace(model, weights=weights, mesh=mesh, derived={})
