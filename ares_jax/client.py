"""A Python client for a running cluster, shaped like ``LLM``:

    from ares_jax.client import Client
    client = Client("127.0.0.1:50051")
    out = client.generate(["Hello"], SamplingParams(max_tokens=32))[0]

It returns the same ``RequestOutput`` and ``StreamChunk`` records as ``LLM``, and turns gRPC
statuses back into the exceptions ``LLM`` raises: ``ValueError`` for a bad request
(INVALID_ARGUMENT), ``Overloaded`` when the server is full (RESOURCE_EXHAUSTED, with its
retry-after), ``TimeoutError`` when the call's deadline (``timeout_s``) passed
(DEADLINE_EXCEEDED: the server has freed the request everywhere), ``ConnectionError`` when
the cluster cannot be reached or is not ready.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from ares_jax.engine.outputs import RequestMetrics, RequestOutput, StreamChunk
from ares_jax.engine.sampling import SamplingParams
from ares_jax.serving import ares_pb2 as pb
from ares_jax.serving import ares_pb2_grpc as pb_grpc
from ares_jax.serving import codec
from ares_jax.serving.replica_server import GRPC_OPTIONS
from ares_jax.serving.runner import Overloaded

Prompt = str | Sequence[int]
Messages = Sequence[dict[str, str]]


def _raise_for(err: grpc.RpcError) -> None:
    code, details = err.code(), err.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        raise ValueError(details) from None
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        meta = dict(err.trailing_metadata() or ())
        raise Overloaded(details, float(meta.get("retry-after", 1))) from None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise TimeoutError(f"{code.name}: {details}") from None
    if code == grpc.StatusCode.UNAVAILABLE:
        raise ConnectionError(f"{code.name}: {details}") from None
    raise RuntimeError(f"{code.name}: {details}") from None


class Client:
    def __init__(self, address: str = "127.0.0.1:50051", *, timeout_s: float | None = None,
                 max_parallel: int = 64) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self._stub = pb_grpc.SchedulerStub(self._channel)
        self._pool = ThreadPoolExecutor(max_parallel, thread_name_prefix="ares-client")
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ requests

    def _request(self, prompt: Prompt | None, params: SamplingParams, index: int,
                 messages: Messages | None = None) -> pb.GenerateRequest:
        msg = pb.GenerateRequest(params=codec.params_to_pb(params), index=index)
        if messages is not None:
            msg.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"])
                                for m in messages)
        elif isinstance(prompt, str):
            msg.prompt = prompt
        else:
            msg.prompt_ids.extend(int(t) for t in prompt)  # type: ignore[union-attr]
        return msg

    def _run(self, msg: pb.GenerateRequest, prompt_text: str | None) -> RequestOutput:
        tokens: list[int] = []
        logprobs: list[dict[int, float]] | None = \
            [] if msg.params.HasField("logprobs") else None
        last = None
        prompt_ids: list[int] = []
        try:
            for r in self._stub.Generate(msg, timeout=self.timeout_s):
                if r.prompt_token_ids:
                    prompt_ids = list(r.prompt_token_ids)
                for t in _token_messages(r):
                    if t.token_id < 0:
                        continue
                    tokens.append(t.token_id)
                    if logprobs is not None:
                        entry = dict(t.top_logprobs)
                        entry[t.token_id] = t.logprob
                        logprobs.append(entry)
                last = r
        except grpc.RpcError as err:
            _raise_for(err)
        if last is None:
            raise RuntimeError("the stream ended without any token")
        return _output(last, prompt_ids, tokens, logprobs, prompt_text)

    def _submit(self, prompts, params, messages=None) -> list[RequestOutput]:
        if messages is None:
            if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
                prompts = [prompts]
            items = [(p, None) for p in prompts]
        else:
            items = [(None, m) for m in messages]
        plist = _params_list(params, len(items))
        msgs = [self._request(p, sp, i, m) for i, ((p, m), sp) in enumerate(zip(items, plist))]
        futs = [self._pool.submit(self._run, msg, p if isinstance(p, str) else None)
                for msg, (p, _) in zip(msgs, items)]
        return [f.result() for f in futs]

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Serve every prompt concurrently; outputs come back in prompt order."""
        return self._submit(prompts, sampling_params)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
             ) -> list[RequestOutput]:
        """One conversation or a list of them; the server applies the chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self._submit(None, sampling_params, messages=convs)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None
               ) -> Iterator[StreamChunk]:
        """Yield one prompt's tokens as they are produced; closing the iterator (or breaking
        out of the loop) cancels the request on the cluster."""
        msg = self._request(prompt, sampling_params or SamplingParams(), 0)
        call = self._stub.Generate(msg, timeout=self.timeout_s)
        tokens: list[int] = []
        prompt_ids: list[int] = []
        try:
            for r in call:
                if r.prompt_token_ids:
                    prompt_ids = list(r.prompt_token_ids)
                for ch in _stream_chunks(r):  # one per token, though a message may carry more
                    if ch.token_id >= 0:
                        tokens.append(ch.token_id)
                    if ch.finished:
                        ch.output = _output(r, prompt_ids, tokens, None,
                                            prompt if isinstance(prompt, str) else None)
                    yield ch
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                _raise_for(err)
        finally:
            call.cancel()

    def abort(self, request_id: str) -> bool:
        return self._stub.Abort(pb.AbortRequest(request_id=request_id), timeout=10).found

    def migrate(self, request_id: str, dst: int) -> tuple[bool, str]:
        """Ask the scheduler to move a running request to decode replica ``dst`` now."""
        r = self._stub.Migrate(pb.MigrateRequest(request_id=request_id, dst=dst), timeout=30)
        return r.started, r.reason

    def configure(self, policy: str, dispatch_policy: str | None = None) -> None:
        """Switch the scheduling policy of an idle cluster; raises ValueError if refused."""
        r = self._stub.Configure(pb.ConfigureRequest(policy=policy,
                                                     dispatch_policy=dispatch_policy or ""),
                                 timeout=30)
        if not r.ok:
            raise ValueError(r.error)

    def stats(self) -> dict:
        """The cluster's replicas, loads, recent migrations and counters."""
        try:
            return json.loads(self._stub.Stats(pb.StatsRequest(), timeout=30).json)
        except grpc.RpcError as err:
            _raise_for(err)
            raise

    def wait_ready(self, timeout_s: float = 300.0,
                   check: Callable[[], None] | None = None) -> None:
        """Block until every replica has registered. ``check`` runs before each poll and may
        raise to stop waiting (e.g. a replica process that launched this cluster exited)."""
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check is not None:
                check()
            try:
                if self.stats().get("ready"):
                    return
            except (ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the cluster at {self.address} was not ready in {timeout_s} s")


def _params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        params = SamplingParams()
    plist = [params] * n if isinstance(params, SamplingParams) else list(params)
    if len(plist) != n:
        raise ValueError(f"got {n} prompts but {len(plist)} SamplingParams")
    return plist


def _token_messages(r: pb.GenerateResponse) -> Sequence[pb.TokenInfo]:
    """The tokens one message carries: several (``tokens``), one (``token``) or none."""
    if r.tokens:
        return r.tokens
    return (r.token,) if r.HasField("token") else ()


def _stream_chunks(r: pb.GenerateResponse) -> list[StreamChunk]:
    """One ``StreamChunk`` per token of a message (the finish, if any, on the last one;
    ``output`` is left for the caller, which knows the tokens so far)."""
    if not r.tokens:
        return [StreamChunk(
            request_id=r.request_id, index=0,
            token_id=r.token.token_id if r.HasField("token") else -1,
            text_delta=r.text_delta, finished=r.finished,
            finish_reason=r.finish_reason or None,
            logprob=r.token.logprob if r.token.HasField("logprob") else None,
            top_logprobs=dict(r.token.top_logprobs) or None,
            predicted_remaining=r.predicted_remaining
            if r.HasField("predicted_remaining") else None)]
    out = []
    last = len(r.tokens) - 1
    for i, t in enumerate(r.tokens):
        pr = r.predicted_remainings[i] if i < len(r.predicted_remainings) else None
        out.append(StreamChunk(
            request_id=r.request_id, index=0, token_id=t.token_id,
            text_delta=r.text_deltas[i] if i < len(r.text_deltas) else "",
            finished=r.finished and i == last,
            finish_reason=(r.finish_reason or None) if i == last else None,
            logprob=t.logprob if t.HasField("logprob") else None,
            top_logprobs=dict(t.top_logprobs) or None,
            predicted_remaining=None if pr is None or pr != pr else pr))
    return out


def _output(last: pb.GenerateResponse, prompt_ids: list[int], tokens: list[int],
            logprobs, prompt_text: str | None) -> RequestOutput:
    m = last.metrics
    metrics = RequestMetrics(
        arrival_time=m.arrival_time, first_token_time=m.first_token_time or None,
        finish_time=m.finish_time or None, token_times=list(m.token_times),
        num_preemptions=m.num_preemptions, scheduled_time=m.scheduled_time or None,
        num_migrations=m.num_migrations,
        predictions=list(zip(m.prediction_generated, m.prediction_remaining)))
    stop: int | str | None = last.stop_reason or None
    if isinstance(stop, str) and stop.lstrip("-").isdigit() and last.finish_reason == "stop":
        stop = int(stop)  # a stop token id travels as text
    return RequestOutput(
        request_id=last.request_id, prompt=prompt_text, prompt_token_ids=prompt_ids,
        text=last.text, token_ids=tokens, logprobs=logprobs,
        finish_reason=last.finish_reason or None, metrics=metrics, stop_reason=stop,
        predicted_remaining=last.predicted_remaining
        if last.HasField("predicted_remaining") else None, error=last.error or None)
