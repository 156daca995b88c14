"""Load a Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``).

Supports Llama, Mistral and Qwen2 (QKV bias) causal LMs, single-file or sharded through
``model.safetensors.index.json``. Produces one host (numpy) copy of each weight in our layout
and the target dtype; ``sharding.place_weights`` then hands each device only its shard.

HF stores ``nn.Linear`` weights as [out, in]; we transpose to [in, out] and split the head
axis. HF's q/k projections are already in the "rotate_half" RoPE order our model uses, so,
unlike GGUF, no row permutation is needed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ares_jax.model.errors import (
    CheckpointError,
    CorruptFileError,
    MissingTensorError,
    TensorShapeError,
    UnsupportedArchitectureError,
)
from ares_jax.model.model import Config, LayerWeights, RopeScaling, Weights
from ares_jax.model.safetensors_io import SafetensorsFile
from ares_jax.model.tokenizer import Tokenizer, from_hf_dir

# HF ``architectures`` entry -> our ``Config.architecture`` (same names as the GGUF loader).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "llama3")
INDEX_FILE = "model.safetensors.index.json"


def load_hf_dir(path: str | Path, dtype: str | None = None
                ) -> tuple[Config, Weights, Tokenizer | None]:
    """Read an HF checkpoint directory into (config, host weights, tokenizer or None).

    ``dtype`` ("float32" / "bfloat16" / None for the backend default) is the dtype the host
    arrays are converted to, so a bf16 target never holds an f32 copy of the model.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"HF checkpoint directory not found: {path}")
    hf = _read_json(path / "config.json", what="model config")
    cfg = config_from_hf(hf, dtype=dtype, source=str(path / "config.json"))
    cfg = dataclasses.replace(cfg, eos_token_ids=_merge_ids(cfg.eos_token_ids,
                                                            _generation_eos(path)))
    with _open_tensors(path) as tensors:
        weights = _convert(tensors, cfg)
    tokenizer = None
    if (path / "tokenizer.json").exists():
        tokenizer = from_hf_dir(path, eos_token_ids=cfg.eos_token_ids)
        cfg = dataclasses.replace(cfg, eos_token_ids=tokenizer.eos_token_ids)
        if cfg.bos_token_id is None and tokenizer.bos_token_id is not None:
            cfg = dataclasses.replace(cfg, bos_token_id=tokenizer.bos_token_id)
    return cfg, weights, tokenizer


# ----------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], dtype: str | None = None, source: str = "config.json"
                   ) -> Config:
    """Map an HF ``config.json`` dict onto our ``Config``, refusing what the model lacks."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedArchitectureError(
            f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; supported: "
            f"{sorted(SUPPORTED_ARCHITECTURES)}")

    def need(key: str) -> Any:
        if hf.get(key) is None:
            raise CheckpointError(f"{source}: required field {key!r} is missing")
        return hf[key]

    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedArchitectureError(f"{source}: hidden_act {act!r} is not supported "
                                           "(only silu / SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
        # Qwen2's QKV bias is implied by the architecture; Llama's attention_bias also biases
        # o_proj, which the model does not have.
        if arch != "Qwen2ForCausalLM" and hf.get(flag):
            raise UnsupportedArchitectureError(f"{source}: {flag}=true is not supported")

    d_model, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    rope_theta, rope_scaling = _rope(hf, source)
    eos = hf.get("eos_token_id")
    bos = hf.get("bos_token_id")
    return Config(
        vocab_size=int(need("vocab_size")),
        d_model=d_model,
        n_layers=int(need("num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads),
        ffn_dim=int(need("intermediate_size")),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        # Llama, Mistral and Qwen2 configs all default to untied when the key is absent.
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM",
        max_seq_len=_max_seq_len(hf),
        dtype=dtype,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=_merge_ids((), eos),
        architecture=SUPPORTED_ARCHITECTURES[arch],
    )


def _rope(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    # transformers < 5 writes ``rope_theta`` + ``rope_scaling``; 5.x folds both into
    # ``rope_parameters``. Accept either.
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedArchitectureError(
            f"{source}: rope_type {rope_type!r} is not supported; supported: "
            f"{list(SUPPORTED_ROPE_TYPES)}")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )


def _max_seq_len(hf: dict[str, Any]) -> int:
    limit = int(hf.get("max_position_embeddings") or 4096)
    # The model has no sliding-window attention; within the window full attention is the same
    # computation, so cap the context there instead of silently diverging past it.
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", True)  # Mistral has no flag: a window is used
    if window and uses_window:
        limit = min(limit, int(window))
    return limit


def _merge_ids(base: tuple[int, ...], extra: Any) -> tuple[int, ...]:
    if extra is None:
        return base
    extra_ids = [extra] if isinstance(extra, int) else list(extra)
    return tuple(dict.fromkeys([*base, *(int(i) for i in extra_ids)]))


def _generation_eos(path: Path) -> Any:
    """Instruct checkpoints often list their end-of-turn tokens only in generation_config."""
    gen = path / "generation_config.json"
    if not gen.exists():
        return None
    return _read_json(gen, what="generation config").get("eos_token_id")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path}: expected a JSON object")
    return data


# ----------------------------------------------------------------------------- tensors


class TensorSource:
    """Tensor name -> shape-checked numpy array, across the files of one checkpoint."""

    def __init__(self, directory: Path, name_to_file: dict[str, str]) -> None:
        self.directory = directory
        self._name_to_file = name_to_file
        self._files: dict[str, SafetensorsFile] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._name_to_file

    def get(self, name: str, expected: tuple[int, ...], why: str) -> np.ndarray:
        fname = self._name_to_file.get(name)
        if fname is None:
            raise MissingTensorError(f"{self.directory}: tensor {name!r} is missing from the "
                                     "checkpoint")
        f = self._file(fname)
        if name not in f:
            raise MissingTensorError(f"{f.path}: tensor {name!r} is listed in {INDEX_FILE} but "
                                     "absent from the file")
        shape = f.shape(name)
        if shape != expected:
            raise TensorShapeError(f"{f.path}: tensor {name!r} has shape {shape} but config.json "
                                   f"implies {expected} ({why})")
        return f.get(name)

    def _file(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(self.directory / fname)
        return self._files[fname]

    def close(self) -> None:
        for f in self._files.values():
            f.close()


@contextmanager
def _open_tensors(path: Path) -> Iterator[TensorSource]:
    index = path / INDEX_FILE
    if index.exists():
        weight_map = _read_json(index, what="safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CorruptFileError(f"{index}: no 'weight_map' object")
        for fname in sorted(set(weight_map.values())):
            if not (path / fname).is_file():
                raise FileNotFoundError(f"{path / fname} (listed in {INDEX_FILE}) not found")
        name_to_file = dict(weight_map)
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files (and no {INDEX_FILE}); "
                                    "PyTorch .bin checkpoints are not supported")
        name_to_file = {}
        for f in files:
            for name in SafetensorsFile(f).names():
                name_to_file.setdefault(name, f.name)
    source = TensorSource(path, name_to_file)
    try:
        yield source
    finally:
        source.close()


def _convert(src: TensorSource, cfg: Config) -> Weights:
    L, D, H, KVH, K, F, V = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads,
                             cfg.head_dim, cfg.ffn_dim, cfg.vocab_size)
    dtype = np.dtype(cfg.jnp_dtype)
    q_why = "num_attention_heads * head_dim, hidden_size"
    kv_why = "num_key_value_heads * head_dim, hidden_size"

    def stacked(shape: tuple[int, ...], name: str, expected: tuple[int, ...], why: str,
                to_ours: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        # Fill a preallocated [L, ...] array so that at most one layer's source tensor is
        # materialised beside it; assignment does the cast and the transpose in one pass.
        out = np.empty((L, *shape), dtype)
        for i in range(L):
            out[i] = to_ours(src.get(f"model.layers.{i}.{name}", expected, why))
        return out

    same = lambda a: a  # noqa: E731
    bias = cfg.qkv_bias
    layers = LayerWeights(
        attn_norm=stacked((D,), "input_layernorm.weight", (D,), "hidden_size", same),
        wq=stacked((D, H, K), "self_attn.q_proj.weight", (H * K, D), q_why,
                   lambda a: a.T.reshape(D, H, K)),
        wk=stacked((D, KVH, K), "self_attn.k_proj.weight", (KVH * K, D), kv_why,
                   lambda a: a.T.reshape(D, KVH, K)),
        wv=stacked((D, KVH, K), "self_attn.v_proj.weight", (KVH * K, D), kv_why,
                   lambda a: a.T.reshape(D, KVH, K)),
        wo=stacked((H, K, D), "self_attn.o_proj.weight", (D, H * K),
                   "hidden_size, num_attention_heads * head_dim", lambda a: a.T.reshape(H, K, D)),
        bq=stacked((H, K), "self_attn.q_proj.bias", (H * K,), "num_attention_heads * head_dim",
                   lambda a: a.reshape(H, K)) if bias else None,
        bk=stacked((KVH, K), "self_attn.k_proj.bias", (KVH * K,),
                   "num_key_value_heads * head_dim", lambda a: a.reshape(KVH, K)) if bias else None,
        bv=stacked((KVH, K), "self_attn.v_proj.bias", (KVH * K,),
                   "num_key_value_heads * head_dim", lambda a: a.reshape(KVH, K)) if bias else None,
        mlp_norm=stacked((D,), "post_attention_layernorm.weight", (D,), "hidden_size", same),
        w_gate=stacked((D, F), "mlp.gate_proj.weight", (F, D), "intermediate_size, hidden_size",
                       lambda a: a.T),
        w_up=stacked((D, F), "mlp.up_proj.weight", (F, D), "intermediate_size, hidden_size",
                     lambda a: a.T),
        w_down=stacked((F, D), "mlp.down_proj.weight", (D, F), "hidden_size, intermediate_size",
                       lambda a: a.T),
    )
    embed = src.get("model.embed_tokens.weight", (V, D), "vocab_size, hidden_size").astype(dtype)
    final_norm = src.get("model.norm.weight", (D,), "hidden_size").astype(dtype)
    lm_head = None
    if not cfg.tie_embeddings:
        lm_head = np.empty((D, V), dtype)
        lm_head[...] = src.get("lm_head.weight", (V, D), "vocab_size, hidden_size").T
    return Weights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)
