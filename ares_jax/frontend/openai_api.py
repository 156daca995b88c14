"""POST /v1/completions and /v1/chat/completions.

Each handler: validate the body (protocol.py) -> tokenize (chat: apply the model's template) ->
one ``Choice`` per prompt -> ``start_all`` (first chunks; refusals become 4xx) -> answer either
as one JSON body (collected) or as SSE chunks ending with ``data: [DONE]``.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ares_jax.engine.outputs import StreamChunk
from ares_jax.frontend.backend import GenerationBackend
from ares_jax.frontend.errors import APIError, InvalidRequest, ModelNotFound
from ares_jax.frontend.metrics import ServerMetrics
from ares_jax.frontend.protocol import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    resolve_max_tokens,
    sampling_params,
)
from ares_jax.frontend.streams import (
    Choice,
    ChoiceStream,
    ClientGone,
    close_all,
    merged,
    start_all,
    until_disconnect,
)

# Answer for a client that left before its non-streaming answer was ready (nginx's 499).
CLIENT_CLOSED = 499


@dataclasses.dataclass(frozen=True, kw_only=True)
class Context:
    backend: GenerationBackend
    metrics: ServerMetrics
    served_model_name: str


# ============================================================================ completions

async def completions(ctx: Context, body: CompletionRequest, request: Request) -> Response:
    deadline = _deadline(body.timeout)
    body.check_supported()
    _check_model(ctx, body.model)
    rid = f"cmpl-{uuid.uuid4().hex}"
    tok = ctx.backend.tokenizer
    choices = []
    for i, prompt in enumerate(body.prompts()):
        if isinstance(prompt, str):
            if tok is None:
                raise InvalidRequest("this model has no tokenizer: send the prompt as token ids",
                                     "prompt")
            ids, text = tok.encode(prompt), prompt
        else:
            ids, text = [int(t) for t in prompt], None
        max_tokens = resolve_max_tokens(
            body.max_tokens, "max_tokens", prompt_tokens=len(ids),
            max_model_len=ctx.backend.max_model_len, default=COMPLETION_DEFAULT_MAX_TOKENS,
            prompt_field="prompt")
        params = sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs,
                                 logprobs_field="logprobs")
        choices.append(Choice(index=i, request_id=f"{rid}-{i}", prompt_ids=ids,
                              prompt_text=text, params=params, deadline=deadline))
    fmt = _CompletionFormat(rid=rid, model=_model(ctx, body.model), tok=tok,
                            logprobs=body.logprobs is not None)
    return await _answer(ctx, request, choices, "prompt", body.stream, body.include_usage, fmt)


# ============================================================================ chat

async def chat_completions(ctx: Context, body: ChatCompletionRequest,
                           request: Request) -> Response:
    deadline = _deadline(body.timeout)
    body.check_supported()
    _check_model(ctx, body.model)
    tok = ctx.backend.tokenizer
    if tok is None or not tok.chat_template:
        raise InvalidRequest("this model has no chat template: use /v1/completions", "messages")
    try:
        text = tok.apply_chat_template(body.conversation())
    except (ValueError, jinja2.TemplateError) as exc:
        raise InvalidRequest(f"the chat template rejected the messages: {exc}",
                             "messages") from exc
    ids = tok.encode(text)
    requested, field = ((body.max_completion_tokens, "max_completion_tokens")
                        if body.max_completion_tokens is not None
                        else (body.max_tokens, "max_tokens"))
    max_tokens = resolve_max_tokens(requested, field, prompt_tokens=len(ids),
                                    max_model_len=ctx.backend.max_model_len, default=None,
                                    prompt_field="messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens=max_tokens, logprobs=logprobs,
                             logprobs_field="top_logprobs")
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    choices = [Choice(index=0, request_id=rid, prompt_ids=ids, prompt_text=text,
                      params=params, deadline=deadline)]
    fmt = _ChatFormat(rid=rid, model=_model(ctx, body.model), tok=tok, logprobs=body.logprobs,
                      top=body.top_logprobs or 0)
    return await _answer(ctx, request, choices, "messages", body.stream, body.include_usage, fmt)


# ============================================================================ shared flow

async def _answer(ctx: Context, request: Request, choices: Sequence[Choice], prompt_field: str,
                  stream: bool, include_usage: bool, fmt: _Format) -> Response:
    try:
        if not stream:
            return await until_disconnect(request, _collect(ctx, choices, prompt_field, fmt))
        streams = await until_disconnect(
            request, start_all(ctx.backend, ctx.metrics, choices, prompt_field))
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    return _ClosingStreamingResponse(_sse(streams, fmt, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})


async def _collect(ctx: Context, choices: Sequence[Choice], prompt_field: str,
                   fmt: _Format) -> JSONResponse:
    streams = await start_all(ctx.backend, ctx.metrics, choices, prompt_field)
    try:
        for s in streams:  # all run concurrently in the backend; collecting in order is fine
            await s.collect()
    finally:
        await close_all(streams)
    return JSONResponse(fmt.full(streams, _usage(streams)))


async def _sse(streams: Sequence[ChoiceStream], fmt: _Format,
               include_usage: bool) -> AsyncIterator[str]:
    """SSE events; in ``finally`` (finish, disconnect, error) every unfinished request is
    aborted."""
    extra = {"usage": None} if include_usage else {}
    try:
        for s in streams:
            for event in fmt.opening(s):
                yield _event({**event, **extra})
        async for s, chunk in merged(streams):
            text = s.stream_text(chunk)
            if text or chunk.finished or chunk.logprob is not None:
                yield _event({**fmt.delta(s, chunk, text), **extra})
            # else: an incomplete UTF-8 sequence; its text comes with the next token
        if include_usage:
            yield _event(fmt.usage_chunk(_usage(streams)))
    except APIError as exc:  # mid-stream failures can no longer change the status code
        yield _event(exc.body())
    except Exception as exc:  # noqa: BLE001 - e.g. BackendClosed at shutdown
        yield _event({"error": {"message": str(exc), "type": "server_error", "param": None,
                                "code": None}})
    finally:
        await close_all(streams)
    yield "data: [DONE]\n\n"


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator even when the response task was cancelled while it was
    suspended (client gone mid-``send``), so the backend requests are aborted now rather
    than whenever the generator is garbage-collected."""

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(streams: Sequence[ChoiceStream]) -> dict:
    prompt = sum(len(s.choice.prompt_ids) for s in streams)
    done = sum(len(s.output.token_ids) if s.output is not None else len(s.tokens)
               for s in streams)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _deadline(timeout: float | None) -> float | None:
    """The request's ``timeout`` as a deadline on the backend's clock, from its arrival."""
    return None if timeout is None else time.perf_counter() + timeout


def _check_model(ctx: Context, model: str | None) -> None:
    if model is not None and model not in (ctx.served_model_name, ctx.backend.model_name):
        raise ModelNotFound(model, ctx.served_model_name)


def _model(ctx: Context, model: str | None) -> str:
    return model or ctx.served_model_name


def _token_text(tok, token_id: int) -> str:
    if tok is None:
        return f"token_id:{token_id}"
    return tok.decode([token_id], skip_special_tokens=False)


# ============================================================================ formats

@dataclasses.dataclass(frozen=True, kw_only=True)
class _Format:
    rid: str
    model: str
    tok: object
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def opening(self, s: ChoiceStream) -> list[dict]:
        return []

    def head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def full(self, streams: Sequence[ChoiceStream], usage: dict) -> dict:
        raise NotImplementedError

    def delta(self, s: ChoiceStream, chunk: StreamChunk, text: str) -> dict:
        raise NotImplementedError

    def usage_chunk(self, usage: dict) -> dict:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CompletionFormat(_Format):
    logprobs: bool

    def _logprobs(self, chunks: Sequence[StreamChunk], offset: int) -> dict | None:
        if not self.logprobs:
            return None
        tokens, lps, tops, offsets = [], [], [], []
        for c in chunks:
            text = _token_text(self.tok, c.token_id)
            tokens.append(text)
            lps.append(c.logprob)
            tops.append({_token_text(self.tok, t): lp for t, lp in
                         (c.top_logprobs or {}).items()} or None)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps,
                "top_logprobs": tops if any(t is not None for t in tops) else None,
                "text_offset": offsets}

    def full(self, streams: Sequence[ChoiceStream], usage: dict) -> dict:
        choices = [{"index": s.choice.index, "text": s.output.text if s.output else "",
                    "logprobs": self._logprobs(s.tokens, 0),
                    "finish_reason": s.output.finish_reason if s.output else None}
                   for s in streams]
        return {**self.head("text_completion"), "choices": choices, "usage": usage}

    def delta(self, s: ChoiceStream, chunk: StreamChunk, text: str) -> dict:
        logprobs = None
        if self.logprobs:
            logprobs = self._logprobs([chunk], s.text_offset)
            s.text_offset += len(logprobs["tokens"][0])
        choice = {"index": s.choice.index, "text": text, "logprobs": logprobs,
                  "finish_reason": chunk.finish_reason}
        return {**self.head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.head("text_completion"), "choices": [], "usage": usage}


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ChatFormat(_Format):
    logprobs: bool
    top: int

    def _entry(self, token_id: int, logprob: float | None) -> dict:
        text = _token_text(self.tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _content(self, chunks: Sequence[StreamChunk]) -> dict | None:
        if not self.logprobs:
            return None
        content = []
        for c in chunks:
            top = sorted((c.top_logprobs or {}).items(), key=lambda kv: -kv[1])[: self.top]
            content.append({**self._entry(c.token_id, c.logprob),
                            "top_logprobs": [self._entry(t, lp) for t, lp in top]})
        return {"content": content}

    def opening(self, s: ChoiceStream) -> list[dict]:
        choice = {"index": s.choice.index, "delta": {"role": "assistant", "content": ""},
                  "logprobs": None, "finish_reason": None}
        return [{**self.head("chat.completion.chunk"), "choices": [choice]}]

    def full(self, streams: Sequence[ChoiceStream], usage: dict) -> dict:
        choices = [{"index": s.choice.index,
                    "message": {"role": "assistant",
                                "content": s.output.text if s.output else ""},
                    "logprobs": self._content(s.tokens),
                    "finish_reason": s.output.finish_reason if s.output else None}
                   for s in streams]
        return {**self.head("chat.completion"), "choices": choices, "usage": usage}

    def delta(self, s: ChoiceStream, chunk: StreamChunk, text: str) -> dict:
        delta = {"content": text} if text or not chunk.finished else {}
        choice = {"index": s.choice.index, "delta": delta,
                  "logprobs": self._content([chunk]), "finish_reason": chunk.finish_reason}
        return {**self.head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.head("chat.completion.chunk"), "choices": [], "usage": usage}

