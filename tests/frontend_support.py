"""Helpers shared by the frontend tests: a byte-level tokenizer that fits the tiny random model,
serving loops over it, and a server fixture helper."""

from __future__ import annotations

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ares_jax.engine.types import EngineConfig
from ares_jax.model.tokenizer import Tokenizer

# One engine config for every tiny-model frontend test, so they share compiled steps.
ECFG = EngineConfig(page_size=8, num_pages=128, max_num_seqs=8, max_model_len=256)

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


def with_tokenizer(model):
    """The tiny random model with the byte tokenizer attached."""
    import dataclasses

    return dataclasses.replace(model, tokenizer=byte_tokenizer(model.cfg.vocab_size))


def openai_client(url: str):
    import openai

    # No retries: a 429 or 5xx must reach the test as it is.
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def idle(state: dict) -> bool:
    """No request anywhere and every KV page free."""
    return state.get("running") == 0 and state.get("waiting") == 0 and all(
        r["kv_pages_used"] == 0 for r in state.get("replicas", ()))


def metric(text: str, sample: str, **labels: str) -> float:
    """The value of one sample in a /metrics page (summed over unlisted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                found = True
    if not found:
        raise KeyError(f"{sample} {labels} is not in the metrics page")
    return total


# What the engine streams for "Hello world\n\nBye" with stop="\n\n": the tokens before the stop
# string is complete are streamed as they come; the last token's delta is empty (the text is cut).
STOP_DELTAS = ["Hello", " wor", "ld\n", ""]


class ScriptedBackend:
    """A GenerationBackend without a model: prompt ids pick the behaviour, so the server's
    mapping of every backend outcome can be tested without compiling anything.

    prompt [1, ...]: n tokens then finish; [2]: ValueError; [3]: Overloaded; [4]: one token
    then BackendClosed mid-stream; [5]: endless (until aborted); [6]: the text deltas of
    ``STOP_DELTAS`` then a finish at the stop string "\n\n", as the engine reports it."""

    model_name = "scripted"
    max_model_len = 64
    tokenizer = None
    vocab_size = 100

    def __init__(self) -> None:
        self.healthy = True
        self.aborted: list[str] = []
        self.state = {"time": 0.0, "policy": "ares", "waiting": 0, "running": 0,
                      "replicas": [], "migrations": [], "counters": {}}

    async def generate(self, request_id, prompt_ids, params, prompt_text=None):
        import asyncio

        from ares_jax.engine.outputs import RequestMetrics, RequestOutput, StreamChunk
        from ares_jax.frontend import BackendClosed, Overloaded

        kind = prompt_ids[0]
        if kind == 2:
            raise ValueError("SamplingParams.top_k is not what this backend wants")
        if kind == 3:
            raise Overloaded("queue full", retry_after_s=2.5)
        if kind == 6:
            text = ""
            for i, delta in enumerate(STOP_DELTAS):
                text += delta
                done = i == len(STOP_DELTAS) - 1
                out = RequestOutput(request_id=request_id, prompt=None,
                                    prompt_token_ids=list(prompt_ids),
                                    text=text[: text.find("\n\n")], token_ids=list(range(i + 1)),
                                    logprobs=None, finish_reason="stop",
                                    metrics=RequestMetrics(arrival_time=0.0),
                                    stop_reason="\n\n") if done else None
                yield StreamChunk(request_id=request_id, index=0, token_id=i, text_delta=delta,
                                  finished=done, finish_reason="stop" if done else None,
                                  output=out)
            return
        n = params.max_tokens
        metrics = RequestMetrics(arrival_time=0.0, first_token_time=0.5, finish_time=2.0,
                                 scheduled_time=0.25,
                                 token_times=[0.5 + 0.1 * i for i in range(n)],
                                 predictions=[(1, 9.0), (5, 2.0)])
        for i in range(10**9 if kind == 5 else n):
            if kind == 4 and i == 1:
                raise BackendClosed("the scheduler went away")
            done = kind != 5 and i == n - 1
            out = RequestOutput(request_id=request_id, prompt=prompt_text,
                                prompt_token_ids=list(prompt_ids), text="x" * n,
                                token_ids=list(range(n)), logprobs=None,
                                finish_reason="length", metrics=metrics) if done else None
            yield StreamChunk(request_id=request_id, index=0, token_id=i, text_delta="x",
                              finished=done, finish_reason="length" if done else None,
                              output=out)
            await asyncio.sleep(0.01)

    async def abort(self, request_id):
        self.aborted.append(request_id)

    def health(self):
        return self.healthy, {"replicas": len(self.state["replicas"])}

    def cluster_state(self):
        return self.state
