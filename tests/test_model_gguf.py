"""The embedded SmolLM2 (GGUF) against transformers loading the same file."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ares_jax import SamplingParams  # noqa: E402
from ares_jax.model import forward  # noqa: E402
from ares_jax.model.gguf_loader import embedded_model_path, load_gguf  # noqa: E402

CHATS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "How do I reverse a list in Python?",
]


@pytest.fixture(scope="module")
def hf():
    path = embedded_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok


def test_config_read_from_gguf(embedded_model):
    cfg = embedded_model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == \
        (30, 576, 9, 3, 1536)
    assert cfg.rope_theta == 1e5 and cfg.tie_embeddings and cfg.vocab_size == 49152


def test_tokenizer_matches_transformers(embedded_model, hf):
    _, hf_tok = hf
    tok = embedded_model.tokenizer
    texts = ["Hello world! 12345 numbers", "def f(x):\n    return x**2  # sq\n\n",
             "  spaces   and\ttabs, unicode: café 你好 🙂", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_last_position_logits_match(embedded_model, hf):
    model, _ = hf
    tok = embedded_model.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
               for q in CHATS]
    # One batch, right-padded: attention is causal, so the padding cannot reach the logits
    # at each prompt's own last position (and one forward pass is one compilation).
    width = max(len(ids) for ids in prompts)
    batch = np.zeros((len(prompts), width), np.int32)
    for i, ids in enumerate(prompts):
        batch[i, :len(ids)] = ids
    ours = np.asarray(forward(embedded_model.weights, embedded_model.cfg, batch))
    for q, ids, row in zip(CHATS, prompts, ours):
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].numpy()
        rel = np.abs(row[len(ids) - 1] - ref).max() / np.abs(ref).max()
        assert rel < 1e-3, (q, rel)


def test_greedy_continuation_matches_transformers(embedded_llm, hf):
    model, _ = hf
    llm = embedded_llm
    tok = llm.tokenizer
    convs = [[{"role": "user", "content": q}] for q in CHATS]
    outs = llm.chat(convs, SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32))
    for conv, out in zip(convs, outs):
        ids = tok.encode(tok.apply_chat_template(conv))
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 min_new_tokens=32)
        assert out.token_ids == ref[0, len(ids):].tolist(), conv[0]["content"]
    llm.loop.check_no_leaks()


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf(tmp_path / "nope.gguf")


def test_truncated_gguf_is_refused(tmp_path):
    data = embedded_model_path().read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated"):
        load_gguf(bad)


def test_unsupported_architecture_is_named():
    from ares_jax.model.gguf_loader import config_from_gguf

    with pytest.raises(ValueError, match="'gpt2'.*supported"):
        config_from_gguf({"general.architecture": "gpt2"})
