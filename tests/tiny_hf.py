"""Tiny random Hugging Face checkpoints, written with transformers, for loader tests.

Every parameter (norm scales and QKV biases included) is randomised: transformers initialises
norms to 1 and biases to 0, which would hide a mis-mapped norm or bias.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

TINY: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
    rms_norm_eps=1e-6,
)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # Small, so that the test sequence lengths fall in all three frequency bands.
               "original_max_position_embeddings": 32}


def build(arch: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM``."""
    import transformers

    kwargs = {**TINY, **overrides}
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    model_cls = getattr(transformers, arch)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def write(model: torch.nn.Module, path: Path, **save_kwargs: Any) -> Path:
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    return path


def torch_logits(model: torch.nn.Module, tokens: Any) -> Any:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def write_tokenizer(path: Path, vocab_size: int = 256) -> None:
    """A word-level tokenizer.json + tokenizer_config.json (chat template, bos/eos tokens)."""
    words = ["<unk>", "<s>", "</s>", "hello", "world", "ares", "jax"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(words), vocab_size)})
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}",
    }))
