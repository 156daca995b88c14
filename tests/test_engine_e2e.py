"""End to end on the embedded SmolLM2: batch invariance, page reuse, streaming, stop strings."""

import pytest

from ares_jax import SamplingParams
from ares_jax.engine.types import Request

QUESTIONS = [
    "What is the capital of France?", "Name three colours.", "What is 7 times 8?",
    "Write one sentence about dogs.", "Who wrote Hamlet?", "What does a CPU do?",
    "Give a synonym for happy.", "What is the boiling point of water?",
]


@pytest.fixture(scope="module")
def llm(embedded_llm):
    return embedded_llm


def chat_ids(llm, q: str) -> list[int]:
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user",
                                                                    "content": q}]))


def test_batch_invariance_with_requests_joining_and_leaving(llm):
    probe = chat_ids(llm, "Explain what a hash map is.")
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    alone = llm.generate([probe], params)[0].token_ids
    loop = llm.loop
    loop.add_request(Request(request_id="probe", prompt_ids=probe, params=params))
    step = 0
    added = 0
    while loop.has_work:
        # Others join every other step, with lengths that make them leave at different times.
        if step % 2 == 0 and added < llm.engine_config.max_num_seqs - 1:
            q = QUESTIONS[added % len(QUESTIONS)]
            loop.add_request(Request(request_id=f"other{added}", prompt_ids=chat_ids(llm, q),
                                     params=SamplingParams(temperature=0.0,
                                                           max_tokens=3 + 5 * (added % 9))))
            added += 1
        loop.step()
        step += 1
    batched = loop.finished.pop("probe").token_ids
    for i in range(added):
        loop.finished.pop(f"other{i}")
    assert batched == alone
    loop.check_no_leaks()


def test_outputs_identical_after_pool_wraparound(llm):
    """Freed pages go back on top of the free list, so the churn below writes its KV over the
    pages the first round used, and the last round reads pages full of stale KV: the tokens
    must not change."""
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS[:4]]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    engine = llm.decode_engine
    first = [o.token_ids for o in llm.chat(convs, params)]
    for _ in range(3):  # churn the pool so later requests get recycled pages
        llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS[4:]], params)
    again = [o.token_ids for o in llm.chat(convs, params)]
    assert again == first
    assert engine.num_free_pages == engine.capacity_pages


def test_stream_matches_generate_and_stop_strings(llm):
    conv = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    params = SamplingParams(temperature=0.0, max_tokens=40)
    out = llm.chat(conv, params)[0]
    prompt = llm.tokenizer.apply_chat_template(conv)
    chunks = list(llm.stream(prompt, params))
    assert [c.token_id for c in chunks] == out.token_ids
    assert "".join(c.text_delta for c in chunks) == out.text
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
    stopped = llm.chat(conv, SamplingParams(temperature=0.0, max_tokens=40, stop=["5"]))[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == "5"
    assert "5" not in stopped.text and out.text.startswith(stopped.text)


def test_metrics_and_errors(llm):
    out = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=8,
                                                         ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 8
    m = out.metrics
    assert m.ttft > 0 and len(m.tpot_per_token) == 7 and m.tpot > 0
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate("word " * 600)
    assert not llm.loop.has_work
