"""Helpers shared by the frontend tests: a byte-level tokenizer that fits the tiny random model,
serving loops over it, and a server fixture helper."""

from __future__ import annotations

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ares_jax.model.tokenizer import Tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Byte-level BPE with exactly ``vocab_size`` ids (bytes, letter pairs, two ChatML markers),
    so every id a random model samples decodes to text."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    letters = "etaoinshrdlucmfwypvbgkqjxz"
    merges = []
    for a in letters:
        for b in letters:
            if len(vocab) >= vocab_size - 2:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    specials = ["<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    assert backend.get_vocab_size(with_added_tokens=True) == vocab_size
    return Tokenizer(backend=backend, eos_token_ids=(vocab["<|im_end|>"],),
                     chat_template=CHATML)
