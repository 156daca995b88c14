"""OpenAI request bodies (pydantic) and their translation into SamplingParams.

Field names and defaults follow OpenAI's API; ``top_k``, ``min_tokens``, ``ignore_eos`` and
``stop_token_ids`` are vLLM's extensions. Unknown fields are ignored (as OpenAI and vLLM do);
known fields this server cannot honour are refused with a 400 that names them, never ignored.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ares_jax.engine.sampling import MAX_LOGPROBS, SamplingParams
from ares_jax.frontend.errors import InvalidRequest

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default
MAX_TIMEOUT_S = 86_400.0  # a request's ``timeout`` may be at most a day


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Seconds the server works on the request before giving up (an ares-jax extension,
    # ``extra_body={"timeout": 5}`` from the openai client): past it the request is freed
    # everywhere and answered 504 (or, mid-stream, an error event). Closing the connection,
    # which the openai client's own ``timeout=`` does, aborts it too.
    timeout: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)

    def check_supported(self) -> None:
        """Refuse what the engine does not implement, naming the field."""
        if self.n is not None and self.n != 1:
            raise InvalidRequest(f"n={self.n} is not supported: this server returns one choice "
                                 "per prompt (n=1); send several requests instead", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value not in (None, 0, 0.0):
                raise InvalidRequest(f"{name} is not supported (only 0)", name)
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true",
                                 "stream_options")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidRequest("echo is not supported", "echo")
        if self.suffix:
            raise InvalidRequest("suffix is not supported", "suffix")
        if self.best_of not in (None, 1):
            raise InvalidRequest(f"best_of={self.best_of} is not supported (only 1)", "best_of")

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: a string, or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            out: list[str | list[int]] = [p]
        elif p and all(isinstance(x, int) for x in p):
            out = [list(p)]  # type: ignore[arg-type]
        else:
            out = list(p)  # type: ignore[arg-type]
        if not out or any(len(x) == 0 for x in out):
            raise InvalidRequest("prompt must not be empty", "prompt")
        return out


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise InvalidRequest("tools are not supported by this server", "tools")
        if self.tool_choice not in (None, "none"):
            raise InvalidRequest("tool_choice is not supported by this server", "tool_choice")
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise InvalidRequest(f"response_format {kind!r} is not supported (only 'text')",
                                 "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", "top_logprobs")

    def conversation(self) -> list[dict[str, str]]:
        """Messages as the chat template wants them: text content only."""
        out = []
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                texts = []
                for part in m.content:
                    if part.type != "text" or part.text is None:
                        raise InvalidRequest(f"messages[{i}].content: only text parts are "
                                             f"supported, got {part.type!r}", "messages")
                    texts.append(part.text)
                content = "\n".join(texts)
            else:
                content = m.content or ""
            out.append({"role": m.role, "content": content})
        return out


# -------------------------------------------------------------------- sampling parameters

_PARAM_RE = re.compile(r"SamplingParams\.(\w+)")


def sampling_params(req: _SamplingFields, *, max_tokens: int, logprobs: int | None,
                    logprobs_field: str) -> SamplingParams:
    """Build (and validate) SamplingParams; a ValueError becomes a 400 naming the field."""
    top_k = req.top_k if req.top_k not in (None, 0) else -1  # vLLM: 0 and -1 both disable
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise InvalidRequest(f"{logprobs_field} must be in [0, {MAX_LOGPROBS}], got {logprobs}",
                             logprobs_field)
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k, seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens,
            stop=_stops(req.stop), stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos, logprobs=logprobs)
    except ValueError as exc:
        match = _PARAM_RE.search(str(exc))
        name = match.group(1) if match else None
        field = logprobs_field if name == "logprobs" else name
        message = str(exc).replace(f"SamplingParams.{name}", field or "") if name else str(exc)
        raise InvalidRequest(message, field) from exc


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def resolve_max_tokens(requested: int | None, field: str, *, prompt_tokens: int,
                       max_model_len: int, default: int | None,
                       prompt_field: str) -> int:
    """Check the prompt against the context and pick max_tokens (default: what fits)."""
    if prompt_tokens >= max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"{prompt_field} has {prompt_tokens} tokens; it must be shorter than the context "
            f"to leave room for output.", prompt_field, code="context_length_exceeded")
    room = max_model_len - prompt_tokens
    if requested is None:
        return room if default is None else min(default, room)
    if requested < 1:
        raise InvalidRequest(f"{field} must be >= 1, got {requested}", field)
    if requested > room:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the "
            f"{prompt_field}, {requested} in the completion). Please reduce the length of the "
            f"{prompt_field} or {field}.", field, code="context_length_exceeded")
    return requested

