"""The embedded SmolLM2-135M-Instruct behind the HTTP server: greedy text over HTTP is exactly
``LLM``'s text, and the packaged length head feeds the predictor metrics."""

import httpx
import pytest
from frontend_support import metric, openai_client

from ares_jax import SamplingParams
from ares_jax.frontend import HTTPServerThread, LoopBackend

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
# 33-64 tokens, like the chat prompt above (37 with the template): one prefill bucket to compile.
PROMPT = ("Here is a short list of facts about the planets of the solar system, written for a "
          "curious child who loves astronomy and wants to learn more about space. The first "
          "fact is that")


@pytest.fixture(scope="module")
def llm(embedded_llm):
    return embedded_llm


def test_http_greedy_text_equals_llm_and_predictor_metrics(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    ref_chat = llm.chat(MESSAGES, greedy)[0]
    ref_text = llm.generate(PROMPT, greedy)[0]
    assert ref_chat.text and ref_text.text
    with LoopBackend.from_llm(llm) as backend, HTTPServerThread(backend) as server:
        client = openai_client(server.url)
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
        chat = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES,
                                              temperature=0, max_tokens=16)
        assert chat.choices[0].message.content == ref_chat.text
        assert chat.choices[0].finish_reason == ref_chat.finish_reason
        assert chat.usage.completion_tokens == len(ref_chat.token_ids)
        assert chat.usage.prompt_tokens == len(ref_chat.prompt_token_ids)
        stream = client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT,
                                           temperature=0, max_tokens=16, stream=True)
        assert "".join(c.choices[0].text for c in stream) == ref_text.text
        text = httpx.get(server.url + "/metrics").text
    # every finished request contributed its predictions (one per generated token, about)
    assert metric(text, "ares:predicted_remaining_tokens_count") >= 16
    assert metric(text, "ares:predictor_abs_error_tokens_count") == \
        metric(text, "ares:predicted_remaining_tokens_count")
    assert metric(text, "ares:generation_tokens_total") == \
        len(ref_chat.token_ids) + len(ref_text.token_ids)
    # the loop is the LLM's again once the backend is closed
    assert llm.generate(PROMPT, greedy)[0].text == ref_text.text
