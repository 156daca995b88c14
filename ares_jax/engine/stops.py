"""Token-level stop conditions, checked inside the replica that sampled the token.

A remote decode replica decides on its own that a request is done (EOS, a stop token id,
``max_tokens``, the context limit), so the scheduler needs no round trip per token. Stop
*strings* need the detokenised text and are checked where the text is made, in the scheduler's
``RequestTracker`` (as vLLM's detokenizer does), which then releases the request.
"""

from __future__ import annotations

from ares_jax.engine.sampling import SamplingParams


def token_stop(token: int, num_generated: int, prompt_len: int, params: SamplingParams,
               eos_ids: tuple[int, ...] | frozenset[int], max_model_len: int
               ) -> tuple[str | None, int | None]:
    """(finish_reason, stop_reason) after ``token``, the ``num_generated``-th output token.

    ``finish_reason`` is "stop" (EOS or a stop token id; ``stop_reason`` is the stop token id,
    None for EOS), "length" (``max_tokens`` or the context is full), or None (go on).
    """
    if num_generated >= params.min_tokens:
        if not params.ignore_eos and token in eos_ids:
            return "stop", None
        if token in params.stop_token_ids:
            return "stop", token
    if num_generated >= params.max_tokens or prompt_len + num_generated >= max_model_len:
        return "length", None
    return None, None
