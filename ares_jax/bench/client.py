"""The HTTP side: find the model behind ``GET /v1/models`` and stream one completion (or chat
completion) into a ``RequestRecord``. Every per-request problem (HTTP 4xx/5xx, a broken or
non-OpenAI stream, a timeout, a dropped connection) ends up in ``record.error``; only problems
that make the whole run meaningless raise ``BenchError``."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from ares_jax.bench.config import BenchConfig, BenchError
from ares_jax.bench.datasets import SampleRequest
from ares_jax.bench.records import RequestRecord

_BODY_PREVIEW = 300


def error_message(body: bytes | str) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}``), FastAPI's
    ``{"detail": ...}``, or the start of whatever else came back."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        obj = json.loads(text)
    except ValueError:
        return text.strip()[:_BODY_PREVIEW] or "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("error", "detail", "message"):
            if obj.get(key):
                value = obj[key]
                return value if isinstance(value, str) else json.dumps(value)[:_BODY_PREVIEW]
    return text.strip()[:_BODY_PREVIEW]


async def resolve_model(client: httpx.AsyncClient, base_url: str, cfg: BenchConfig,
                        headers: Mapping[str, str]) -> tuple[str, list[str]]:
    """(model id, notes). Probes ``GET /v1/models`` even when ``--model`` is given, so that an
    unreachable server or a non-OpenAI one fails here with one clear message instead of as N
    failed requests."""
    url = base_url + "/v1/models"
    try:
        resp = await client.get(url, headers=dict(headers))
    except httpx.ConnectError as err:
        raise BenchError(f"cannot reach the server at {base_url} ({err}); is it running, and "
                         "is --base-url right?") from err
    except httpx.HTTPError as err:
        raise BenchError(f"GET {url} failed: {type(err).__name__}: {err}") from err
    notes: list[str] = []
    if resp.status_code != 200:
        msg = f"GET {url} returned HTTP {resp.status_code}: {error_message(resp.content)}"
        if cfg.model is None:
            raise BenchError(msg + "; pass --model to skip the lookup")
        notes.append(msg + f"; using --model {cfg.model}")
        return cfg.model, notes
    try:
        data = resp.json()["data"]
        ids = [str(m["id"]) for m in data]
    except (ValueError, KeyError, TypeError):
        raise BenchError(
            f"{base_url} is not an OpenAI-compatible server: GET /v1/models returned "
            f"{resp.headers.get('content-type', 'no content-type')}: "
            f"{resp.text[:_BODY_PREVIEW]!r}") from None
    if cfg.model is not None:
        if cfg.model not in ids:
            notes.append(f"--model {cfg.model!r} is not among the server's models {ids}")
        return cfg.model, notes
    if not ids:
        raise BenchError(f"GET {url} lists no models; pass --model")
    return ids[0], notes


def request_body(cfg: BenchConfig, model: str, req: SampleRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.output_len,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # a vLLM/SGLang extension; sent only when asked for
    if cfg.extra_body:
        body.update(cfg.extra_body)
    return body


class _StreamError(Exception):
    pass


class _StreamState:
    """Applies SSE events of one response to its record."""

    def __init__(self, rec: RequestRecord, chat: bool) -> None:
        self.rec = rec
        self.chat = chat
        self.saw_choices = False
        self.done = False
        self._parts: list[str] = []

    def on_event(self, data: str, now: float) -> None:
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(data)
        except ValueError:
            raise _StreamError(f"not an OpenAI stream: chunk is not JSON: "
                               f"{data[:_BODY_PREVIEW]!r}") from None
        if not isinstance(obj, dict):
            raise _StreamError(f"not an OpenAI stream: chunk {data[:_BODY_PREVIEW]!r}")
        if obj.get("error"):
            raise _StreamError("error in stream: " + error_message(json.dumps(obj)))
        rec = self.rec
        prev_completion = rec.completion_tokens
        usage = obj.get("usage")
        if isinstance(usage, dict):
            if usage.get("prompt_tokens") is not None:
                rec.prompt_tokens = int(usage["prompt_tokens"])
            if usage.get("completion_tokens") is not None:
                rec.completion_tokens = int(usage["completion_tokens"])
        choices = obj.get("choices")
        if not choices:
            return
        if not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise _StreamError(f"not an OpenAI stream: bad choices in {data[:_BODY_PREVIEW]!r}")
        self.saw_choices = True
        choice = choices[0]
        if self.chat:
            delta = choice.get("delta") or {}
            text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        else:
            text = choice.get("text") or ""
        if choice.get("finish_reason"):
            rec.finish_reason = str(choice["finish_reason"])
        if not text:
            return  # role-only or finish-only chunks carry no token
        if rec.first_token_s is None:
            rec.first_token_s = now
        rec.chunk_times_s.append(now)
        rec.chunk_tokens.append(self._tokens_in(choice, usage, prev_completion))
        self._parts.append(text)

    def _tokens_in(self, choice: dict, usage: Any, prev_completion: int | None) -> int:
        # Exact counts when the server gives them (logprobs, or vLLM's continuous usage stats);
        # one token per chunk otherwise, which is what servers stream by default.
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            toks = logprobs.get("content") if self.chat else logprobs.get("tokens")
            if isinstance(toks, list) and toks:
                return len(toks)
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            return max(int(usage["completion_tokens"]) - (prev_completion or 0), 1)
        return 1

    @property
    def text(self) -> str:
        return "".join(self._parts)


async def stream_request(client: httpx.AsyncClient, url: str, body: Mapping[str, Any],
                         headers: Mapping[str, str], rec: RequestRecord,
                         clock: Callable[[], float]) -> None:
    """POST one streamed request and fill ``rec`` (never raises for request-level problems)."""
    state = _StreamState(rec, chat=url.endswith("/chat/completions"))
    rec.send_s = clock()
    try:
        async with client.stream("POST", url, json=dict(body), headers=dict(headers)) as resp:
            if resp.status_code != 200:
                raise _StreamError(f"HTTP {resp.status_code}: "
                                   f"{error_message(await resp.aread())}")
            ctype = resp.headers.get("content-type", "")
            if "text/event-stream" not in ctype:
                raise _StreamError(
                    f"not an OpenAI stream: content-type {ctype or 'missing'!r}, body "
                    f"{(await resp.aread())[:_BODY_PREVIEW].decode('utf-8', 'replace')!r}")
            data: list[str] = []
            event_time = 0.0
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    if not data:
                        event_time = clock()
                    data.append(line[5:].removeprefix(" "))
                elif not line.strip() and data:
                    state.on_event("\n".join(data), event_time)
                    data = []
                    if state.done and rec.end_s is None:
                        # The response is over at [DONE]; the rest is read (not cut) so the
                        # connection goes back to the pool.
                        rec.end_s = event_time
            if data and not state.done:  # a last event without its blank line
                state.on_event("\n".join(data), event_time)
        if rec.end_s is None:
            rec.end_s = clock()
        if not state.saw_choices:
            raise _StreamError("the stream ended without any choices")
        if not state.done and rec.finish_reason is None:
            raise _StreamError("the stream closed before the response finished (no finish_reason"
                               " and no [DONE])")
        rec.success = True
    except _StreamError as err:
        rec.error = str(err)
    except httpx.TimeoutException as err:
        rec.error = f"timeout ({type(err).__name__}): {err}"
    except httpx.HTTPError as err:
        rec.error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    finally:
        rec.output_text = state.text
        if rec.end_s is None:
            rec.end_s = clock()
