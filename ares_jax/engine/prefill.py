"""The prefill engine: bucketed batches of prompts -> first tokens, KV pages, hidden taps."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ares_jax.engine import sampling
from ares_jax.engine.kv_pool import bucket, pages_for
from ares_jax.engine.stops import token_stop
from ares_jax.engine.types import EngineConfig, PrefillResult, Request
from ares_jax.model import model as llama
from ares_jax.model.loader import LoadedModel
from ares_jax.model.sharding import named

# A fused head, as in decode: (params, hidden, hidden_tap, generated, max_tokens) -> [B].
HeadFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class PrefillEngine:
    """Runs prompts through the model on its own mesh. The results' KV stays on this mesh until
    a decode engine inserts it (``jax.device_put`` to the decode sharding).

    With a ``head``, each result carries the first remaining-length prediction (from the last
    prompt token, computed in the same jitted call)."""

    def __init__(self, model: LoadedModel, config: EngineConfig,
                 head: tuple[HeadFn, Any] | None = None) -> None:
        self.model = model
        self.cfg = model.cfg
        self.config = config
        self.head = head
        self.max_model_len = resolve_max_model_len(model, config)
        self._replicated = NamedSharding(model.mesh, PartitionSpec())
        self._eos = frozenset(self.cfg.eos_token_ids)

    @property
    def tap_layer(self) -> int:
        return self.config.tap_layer or self.cfg.default_tap_layer

    def prefill(self, requests: Sequence[Request]) -> list[PrefillResult]:
        """Prefill ``requests`` in as few bucketed batches as ``max_prefill_tokens`` allows."""
        results: dict[str, PrefillResult] = {}
        for group in self._groups(requests):
            for r in self._run(group):
                results[r.request.request_id] = r
        return [results[r.request_id] for r in requests]

    def _groups(self, requests: Sequence[Request]) -> list[list[Request]]:
        order = sorted(requests, key=lambda r: len(r.context_ids))
        groups: list[list[Request]] = []
        for r in order:
            n = len(r.context_ids)
            if n < 1 or n >= self.max_model_len:
                raise ValueError(f"request {r.request_id}: prompt has {n} tokens; it must have "
                                 f"1 to {self.max_model_len - 1} (max_model_len)")
            if groups:
                g = groups[-1]
                t = self._len_bucket(n)
                if t * bucket(len(g) + 1) <= max(self.config.max_prefill_tokens, t):
                    g.append(r)
                    continue
            groups.append([r])
        return groups

    def _len_bucket(self, n: int) -> int:
        return bucket(n, max(self.config.min_prefill_bucket, self.config.page_size))

    def _run(self, group: list[Request]) -> list[PrefillResult]:
        lengths = [len(r.context_ids) for r in group]
        t, b = self._len_bucket(max(lengths)), bucket(len(group))
        tokens = np.zeros((b, t), np.int32)
        for i, r in enumerate(group):
            tokens[i, : lengths[i]] = r.context_ids
        lens = np.ones(b, np.int32)
        lens[: len(group)] = lengths
        params = [r.params for r in group]
        s = sampling.sampler_inputs_for(params, [r.index for r in group],
                                        [len(r.resumed_ids) for r in group],
                                        [len(r.resumed_ids) for r in group], b)
        greedy_only, num_logprobs = sampling.batch_mode(params)
        tok_sharding = named(self.model.mesh, ("batch", "seq"), (b, t), self.model.rules)
        # Head inputs: tokens generated before this pass (0, or the resumed ones) and the cap.
        generated, max_tokens = np.zeros(b, np.int32), np.ones(b, np.int32)
        for i, r in enumerate(group):
            generated[i], max_tokens[i] = len(r.resumed_ids), r.params.max_tokens
        head_fn, head_params = self.head if self.head is not None else (None, None)
        picked, hidden, tap, k, v, pred = _prefill_jit(
            self.model.weights, jax.device_put(tokens, tok_sharding),
            jax.device_put(lens, self._replicated), jax.device_put(s, self._replicated),
            head_params, jax.device_put((generated, max_tokens), self._replicated),
            cfg=self.cfg, ecfg=self.config, head_fn=head_fn, greedy_only=greedy_only,
            num_logprobs=num_logprobs)
        infos = sampling.to_token_infos(jax.device_get(picked), params)
        pred_host = None if pred is None else np.asarray(jax.device_get(pred))
        out = []
        for i, r in enumerate(group):
            # Bucketed page count keeps the slice's compiled shapes few; pages past
            # pages_for(num_tokens) are padding that insert() sends to the scratch page.
            n_pages = bucket(pages_for(lengths[i], self.config.page_size))
            kr, vr = _slice_request(k, v, jnp.int32(i), n_pages)
            finish, stop = token_stop(infos[i].token_id, len(r.resumed_ids) + 1,
                                      len(r.prompt_ids), r.params, self._eos, self.max_model_len)
            out.append(PrefillResult(request=r, first=infos[i], k=kr, v=vr,
                                     num_tokens=lengths[i], hidden=hidden[i],
                                     hidden_tap=tap[i],
                                     predicted_remaining=None if pred_host is None
                                     else float(pred_host[i]),
                                     finish_reason=finish, stop_reason=stop))
        return out


def _prefill(weights, tokens, lengths, s, head_params, head_inputs, *, cfg, ecfg: EngineConfig,
             head_fn, greedy_only, num_logprobs):
    out = llama.prefill(weights, cfg, tokens, lengths, ecfg.tap_layer)
    picked = sampling.sample(out["logits"], s, eos_ids=cfg.eos_token_ids, greedy_only=greedy_only,
                             num_logprobs=num_logprobs, candidates=ecfg.sampling_candidates)
    n_layers, b, t, kvh, hd = out["k"].shape
    ps = ecfg.page_size
    paged = lambda x: x.reshape(n_layers, b, t // ps, ps, kvh, hd)  # noqa: E731
    pred = None
    if head_fn is not None:
        generated, max_tokens = head_inputs
        pred = head_fn(head_params, out["hidden"], out["hidden_tap"], generated, max_tokens)
    return picked, out["hidden"], out["hidden_tap"], paged(out["k"]), paged(out["v"]), pred


_prefill_jit = jax.jit(_prefill, static_argnames=("cfg", "ecfg", "head_fn", "greedy_only",
                                                  "num_logprobs"))


@functools.partial(jax.jit, static_argnums=(3,))
def _slice_request(k: jax.Array, v: jax.Array, row: jax.Array, n_pages: int):
    return k[:, row, :n_pages], v[:, row, :n_pages]


def resolve_max_model_len(model: LoadedModel, config: EngineConfig) -> int:
    limit = config.max_model_len or min(model.cfg.max_seq_len, 4096)
    if limit > model.cfg.max_seq_len:
        raise ValueError(f"EngineConfig.max_model_len={limit} exceeds the model's context "
                         f"length {model.cfg.max_seq_len}")
    return limit


__all__ = ["PrefillEngine", "resolve_max_model_len"]
