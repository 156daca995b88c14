"""What the client saw of one request, and the per-request latencies derived from it."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(slots=True, kw_only=True)
class RequestRecord:
    """Times are seconds from the start of the run (one monotonic clock for all requests).

    ``chunk_times_s`` holds the arrival of every streamed chunk that carried output (text or
    reasoning), ``chunk_tokens`` the tokens in each (from logprobs or per-chunk usage when the
    server sends them, else 1). ``prompt_tokens``/``completion_tokens`` are the server's
    ``usage`` numbers, None when it sent none.
    """

    index: int
    prompt_len: int  # the local tokenizer's count, used only without usage
    max_tokens: int
    scheduled_s: float = 0.0  # when the arrival process released it
    send_s: float = 0.0  # when it was sent (after waiting for a --max-concurrency slot)
    first_token_s: float | None = None
    end_s: float | None = None
    chunk_times_s: list[float] = dataclasses.field(default_factory=list)
    chunk_tokens: list[int] = dataclasses.field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    output_text: str = ""
    success: bool = False
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.send_s

    @property
    def e2el_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.send_s

    @property
    def output_tokens(self) -> int:
        """The server's completion_tokens, else the streamed token count."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return sum(self.chunk_tokens)

    @property
    def input_tokens(self) -> int:
        return self.prompt_tokens if self.prompt_tokens is not None else self.prompt_len

    @property
    def tpot_s(self) -> float | None:
        """(E2EL - TTFT) / (output tokens - 1); None with fewer than 2 output tokens."""
        n = self.output_tokens
        if not self.success or n < 2 or self.ttft_s is None or self.e2el_s is None:
            return None
        return (self.e2el_s - self.ttft_s) / (n - 1)

    @property
    def itls_s(self) -> list[float]:
        """Gaps between consecutive output chunks (vLLM's ITL: one entry per chunk, not per
        token, so a chunk of k tokens is one gap)."""
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:])]

    def to_json(self) -> dict[str, Any]:
        """The record plus its derived latencies, for ``--save-result``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(ttft_s=self.ttft_s, tpot_s=self.tpot_s, e2el_s=self.e2el_s,
                   output_tokens=self.output_tokens, input_tokens=self.input_tokens)
        return out
