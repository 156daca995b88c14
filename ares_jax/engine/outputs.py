"""Per-request output tracking: stop conditions, text, timing metrics, and the public records."""

from __future__ import annotations

import dataclasses
import time

from ares_jax.engine.types import Request, TokenInfo
from ares_jax.model.tokenizer import Tokenizer


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    num_preemptions: int = 0
    # When the request first left the waiting queue for a prefill (queue time = this - arrival).
    scheduled_time: float | None = None
    num_migrations: int = 0
    # (tokens generated when predicted, predicted remaining tokens): every prediction received,
    # so the predictor's error can be measured once the true length is known.
    predictions: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    @property
    def queue_time(self) -> float | None:
        return None if self.scheduled_time is None else self.scheduled_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot_per_token(self) -> list[float]:
        """Gaps between consecutive output tokens (inter-token latency), seconds."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        gaps = self.tpot_per_token
        return sum(gaps) / len(gaps) if gaps else None


@dataclasses.dataclass
class RequestOutput:
    """What ``LLM.generate`` returns per prompt (the fields vLLM users expect)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    metrics: RequestMetrics
    stop_reason: int | str | None = None
    # Latest predicted remaining output length (tokens), when a predictor is loaded.
    predicted_remaining: float | None = None
    error: str | None = None  # set with finish_reason "error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class StreamChunk:
    request_id: str
    index: int  # position of the prompt in the call
    token_id: int
    text_delta: str
    finished: bool
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    predicted_remaining: float | None = None
    # The whole record, on the last chunk of a request only.
    output: RequestOutput | None = None


class RequestTracker:
    """Follows one request from arrival to finish and decides when it stops."""

    def __init__(self, request: Request, tokenizer: Tokenizer | None,
                 prompt_text: str | None = None) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.prompt_text = prompt_text
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = \
            [] if request.params.logprobs is not None else None
        self.metrics = RequestMetrics(arrival_time=request.arrival_time)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""
        self.predicted_remaining: float | None = None
        self.error: str | None = None  # why the request failed, when it did
        self._streamed_text = ""

    def add(self, info: TokenInfo, now: float | None = None, finish_reason: str | None = None,
            stop_reason: int | None = None) -> bool:
        """Record a new token with the replica's verdict on it (token-level stops are checked
        where the token was sampled, ``engine/stops.py``); stop strings are checked here, on the
        text. Returns True when the request is now finished."""
        now = time.perf_counter() if now is None else now
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.metrics.token_times.append(now)
        self.token_ids.append(info.token_id)
        if self.logprobs is not None:
            entry = dict(info.top_logprobs or {})
            entry[info.token_id] = info.logprob if info.logprob is not None else float("nan")
            self.logprobs.append(entry)
        if finish_reason is not None:
            self.finish_reason, self.stop_reason = finish_reason, stop_reason
        else:
            self._check_stop_strings()
        if self.finish_reason is not None:
            self.metrics.finish_time = now
        return self.finish_reason is not None

    def _check_stop_strings(self) -> None:
        p = self.request.params
        if not p.stop or self.tokenizer is None or len(self.token_ids) < p.min_tokens:
            return
        text = self.tokenizer.decode(self.token_ids)
        for s in p.stop:
            at = text.find(s)
            if at >= 0:
                self.text = text[:at]
                self.finish_reason, self.stop_reason = "stop", s
                return

    def predict(self, remaining: float) -> None:
        """Record the length head's latest remaining-length prediction."""
        self.predicted_remaining = float(remaining)
        self.metrics.predictions.append((len(self.token_ids), self.predicted_remaining))

    def chunk(self, info: TokenInfo) -> StreamChunk:
        """The stream event for the token just added (the last one carries the whole output)."""
        done = self.finish_reason is not None
        return StreamChunk(request_id=self.request.request_id, index=self.request.index,
                           token_id=info.token_id, text_delta=self.text_delta(), finished=done,
                           finish_reason=self.finish_reason, logprob=info.logprob,
                           top_logprobs=info.top_logprobs,
                           predicted_remaining=self.predicted_remaining,
                           output=self.output() if done else None)

    def abort(self, reason: str = "abort") -> None:
        self.finish_reason = reason
        self.metrics.finish_time = time.perf_counter()

    def output(self) -> RequestOutput:
        if self.finish_reason is not None and not (self.finish_reason == "stop" and
                                                   isinstance(self.stop_reason, str)):
            self.text = self.tokenizer.decode(self.token_ids) if self.tokenizer else ""
        return RequestOutput(
            request_id=self.request.request_id, prompt=self.prompt_text,
            prompt_token_ids=list(self.request.prompt_ids), text=self.text,
            token_ids=list(self.token_ids), logprobs=self.logprobs,
            finish_reason=self.finish_reason, metrics=self.metrics,
            stop_reason=self.stop_reason, predicted_remaining=self.predicted_remaining,
            error=self.error)

    def text_delta(self) -> str:
        """New text since the last call (whole characters only, for streaming)."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.token_ids)
        if self.finish_reason == "stop" and isinstance(self.stop_reason, str):
            text = self.text
        if text.endswith("\ufffd") and self.finish_reason is None:
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        delta = text[len(self._streamed_text):]
        self._streamed_text = text
        return delta
