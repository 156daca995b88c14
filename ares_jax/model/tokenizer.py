"""Tokenizer and chat template, built from GGUF metadata or an HF ``tokenizer.json``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# GPT-2's split pattern; llama.cpp's "smollm"/"starcoder" pre-tokenizers add single-digit splits.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL_TOKEN_TYPE = 3


@dataclasses.dataclass
class Tokenizer:
    """Text <-> token ids, plus the model's chat template and stop tokens."""

    backend: HFTokenizer
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    # HF tokenizer.json post-processors add BOS themselves; GGUF-built ones do not.
    backend_adds_special: bool = False

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=self.backend_adds_special).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass plain prompts to generate()")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg: str) -> None:
            raise jinja2.TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.bos_token_id),
            eos_token=self._token_text(self.eos_token_ids[0] if self.eos_token_ids else None),
        )

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")


def from_gguf_metadata(meta: dict) -> Tokenizer:
    """Build a byte-level BPE tokenizer from ``tokenizer.ggml.*`` metadata (``gpt2`` model)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE "
                         "'gpt2', used by Llama-3, Qwen2 and SmolLM2)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == _CONTROL_TOKEN_TYPE]
    tok.add_special_tokens(special)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [int(eos)] if eos is not None else []
    # Chat models end turns with a marker that is not the declared EOS in some conversions.
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>"):
        if marker in vocab and vocab[marker] not in eos_ids and marker != "<|endoftext|>":
            eos_ids.append(vocab[marker])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return Tokenizer(
        backend=tok,
        eos_token_ids=tuple(eos_ids),
        bos_token_id=None if bos is None else int(bos),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("llama3", "llama-bpe", "llama-v3"):
        pattern = _LLAMA3_SPLIT
    elif pre in ("qwen2",):
        pattern = _QWEN2_SPLIT
    else:
        pattern = _GPT2_SPLIT
    steps: list[pre_tokenizers.PreTokenizer] = []
    if pre in ("smollm", "starcoder", "refact"):
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps += [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level]
    return pre_tokenizers.Sequence(steps)


def from_hf_dir(path: str | Path, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
    """Load ``tokenizer.json`` (+ ``tokenizer_config.json`` chat template) from an HF dir."""
    import json

    path = Path(path)
    tj = path / "tokenizer.json"
    if not tj.exists():
        raise FileNotFoundError(f"{tj} not found: the checkpoint directory has no tokenizer")
    backend = HFTokenizer.from_file(str(tj))
    cfg_path = path / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    eos_ids = list(eos_token_ids)
    eos_tok = tcfg.get("eos_token")
    if isinstance(eos_tok, dict):
        eos_tok = eos_tok.get("content")
    if eos_tok and backend.token_to_id(eos_tok) is not None:
        eid = backend.token_to_id(eos_tok)
        if eid not in eos_ids:
            eos_ids.append(eid)
    bos_tok = tcfg.get("bos_token")
    if isinstance(bos_tok, dict):
        bos_tok = bos_tok.get("content")
    return Tokenizer(
        backend=backend,
        eos_token_ids=tuple(eos_ids),
        bos_token_id=backend.token_to_id(bos_tok) if bos_tok else None,
        chat_template=template,
        backend_adds_special=True,
    )
