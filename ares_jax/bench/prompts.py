"""Prompt text of a given token length, and token counts of given text.

The server's tokenizer is not reachable over HTTP, so lengths are targets measured with a local
tokenizer: the embedded model's (SmolLM2, read from its GGUF without loading weights), any
``tokenizer.json`` / HF directory / ``.gguf`` given by path, or plain words when none is
available. The report always counts the server's own ``usage`` numbers.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Protocol

import numpy as np

# Common short English words: almost every BPE vocabulary has each as one token (with its
# leading space), so n words is close to n tokens on most servers.
_WORDS_TEXT = """
the of and to in is was for on that with as by at from his her it an be are this which have
or had not but were they one all their been has more when will who would there can time so
what if about out up into them some could other than then now only its over also new two
may first after any these like our way well even back use good day most man make work people
year just know take state long great life world still own see name place city water part
"""
_WORDS = tuple(_WORDS_TEXT.split())


class PromptSource(Protocol):
    """Builds prompts of a target token length and counts tokens of text."""

    name: str

    def count(self, text: str) -> int: ...

    def text_of_length(self, n: int, rng: np.random.Generator) -> str: ...

    def texts_of_lengths(self, ns: list[int], rng: np.random.Generator) -> list[str]: ...


class WordPrompts:
    """No tokenizer: prompts are random common words (about one token each); text is counted as
    ``ceil(chars / 4)``, the usual rule of thumb and the simulator's ShareGPT estimate."""

    name = "words"

    def count(self, text: str) -> int:
        return max(1, math.ceil(len(text) / 4))

    def text_of_length(self, n: int, rng: np.random.Generator) -> str:
        return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=max(n, 1)))

    def texts_of_lengths(self, ns: list[int], rng: np.random.Generator) -> list[str]:
        return [self.text_of_length(n, rng) for n in ns]


class TokenizerPrompts:
    """Prompts of random tokens, decoded to text and re-encoded until the text is ``n`` tokens
    long (as vLLM's random dataset does), with a ``tokenizers.Tokenizer``.

    Only tokens that decode to printable ASCII are drawn: random byte-level pieces would decode
    to broken UTF-8, which no server tokenizes back to the same length.
    """

    def __init__(self, backend, name: str) -> None:  # backend: tokenizers.Tokenizer
        self.backend = backend
        self.name = name
        special = set(backend.get_added_tokens_decoder())
        ids = []
        vocab = backend.get_vocab_size(with_added_tokens=False)
        pieces = backend.decode_batch([[i] for i in range(vocab)])
        for i, piece in enumerate(pieces):
            if i not in special and piece.strip() and piece.isascii() and piece.isprintable():
                ids.append(i)
        if not ids:
            raise ValueError(f"tokenizer {name!r} has no printable ASCII tokens to build prompts")
        self._ids = np.array(ids)

    def count(self, text: str) -> int:
        return len(self.backend.encode(text, add_special_tokens=False).ids)

    def count_many(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def text_of_length(self, n: int, rng: np.random.Generator) -> str:
        return self.texts_of_lengths([n], rng)[0]

    def texts_of_lengths(self, ns: list[int], rng: np.random.Generator) -> list[str]:
        """One prompt per target length. Batched, because re-encoding a thousand 1k-token prompts
        one by one takes tens of seconds; the tokenizer's batch calls use every core."""
        ns = [max(int(n), 1) for n in ns]
        texts = self.backend.decode_batch(
            [self._ids[rng.integers(0, len(self._ids), size=n)].tolist() for n in ns])
        todo = list(range(len(ns)))
        # Decoding then encoding merges some neighbours; a few rounds of cut / top up settle it.
        for _ in range(6):
            if not todo:
                break
            encs = self.backend.encode_batch([texts[i] for i in todo], add_special_tokens=False)
            fix_idx, fix_ids = [], []
            for i, enc in zip(todo, encs):
                ids = enc.ids
                if len(ids) > ns[i]:
                    fix_idx.append(i)
                    fix_ids.append(ids[:ns[i]])
                elif len(ids) < ns[i]:
                    extra = self._ids[rng.integers(0, len(self._ids), size=ns[i] - len(ids))]
                    fix_idx.append(i)
                    fix_ids.append(ids + extra.tolist())
            for i, text in zip(fix_idx, self.backend.decode_batch(fix_ids)):
                texts[i] = text
            todo = fix_idx
        return texts


def load_prompt_source(spec: str) -> PromptSource:
    """``auto`` | ``embedded`` | ``words`` | a path (``.gguf``, ``tokenizer.json``, or an HF
    directory holding ``tokenizer.json``)."""
    if spec == "words":
        return WordPrompts()
    if spec in ("auto", "embedded"):
        try:
            from ares_jax.model.gguf_loader import embedded_model_path

            path = embedded_model_path()
        except (FileNotFoundError, ImportError):
            if spec == "embedded":
                raise
            return WordPrompts()
        return TokenizerPrompts(_gguf_backend(path), "embedded:" + path.stem)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {spec!r}: no such file or directory (use auto, "
                                "embedded, words, a .gguf, a tokenizer.json or an HF directory)")
    from tokenizers import Tokenizer

    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: the directory has no tokenizer.json")
        return TokenizerPrompts(Tokenizer.from_file(str(path)), spec)
    if path.suffix == ".gguf":
        return TokenizerPrompts(_gguf_backend(path), spec)
    return TokenizerPrompts(Tokenizer.from_file(str(path)), spec)


def _gguf_backend(path: Path):
    """The tokenizer of a GGUF file. Parsing the GGUF takes 5-15 s, so the result is cached as a
    ``tokenizer.json`` (0.2 s to load) under ``$ARES_JAX_CACHE_DIR`` (or ``~/.cache/ares_jax``),
    keyed by the file's path, size and mtime."""
    from tokenizers import Tokenizer

    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    cache_root = os.environ.get("ARES_JAX_CACHE_DIR") or Path.home() / ".cache" / "ares_jax"
    cached = Path(cache_root) / "bench_tokenizers" / f"{key[:16]}.json"
    if cached.exists():
        try:
            return Tokenizer.from_file(str(cached))
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt below
            pass
    # Only the metadata is used; the weights stay on disk.
    from ares_jax.model.gguf_loader import _metadata, _read
    from ares_jax.model.tokenizer import from_gguf_metadata

    backend = from_gguf_metadata(_metadata(_read(path))).backend
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(backend.to_str())
        tmp.replace(cached)  # atomic: concurrent runs never read half a file
    except OSError:
        pass  # a read-only home only costs the parse next time
    return backend
