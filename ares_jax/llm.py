"""The Python inference API, shaped like vLLM's: ``LLM().generate(prompts, SamplingParams())``."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from ares_jax.cluster import ClusterConfig, ServingLoop, build_cluster
from ares_jax.config import from_dict, to_dict
from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.outputs import RequestOutput, StreamChunk
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig, Request
from ares_jax.model.loader import load_model

Prompt = str | Sequence[int]
Messages = Sequence[dict[str, str]]
# ``predictor="default"``: the length head shipped for the embedded model, when it is installed.
DEFAULT_PREDICTOR = "default"


class LLM:
    """Serve a Llama-family model: the embedded SmolLM2-135M-Instruct by default.

    ``model`` is None, a ``.gguf`` file, an HF checkpoint directory, or an ares-jax checkpoint.
    ``cluster`` serves disaggregated: one prefill mesh and N decode meshes on the local devices,
    with the named scheduling policy dispatching and migrating requests.
    ``predictor`` is the remaining-length head fused into prefill and decode: ``"default"`` (the
    packaged head, for the embedded model only), None (off), or a head checkpoint directory.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str | None = None,
        mesh: Mesh | None = None,
        max_num_seqs: int = 64,
        num_pages: int | None = None,
        page_size: int = 16,
        max_model_len: int | None = None,
        engine_config: EngineConfig | None = None,
        predictor: str | Path | None = DEFAULT_PREDICTOR,
        cluster: ClusterConfig | None = None,
    ) -> None:
        base = engine_config or EngineConfig()
        self.engine_config = from_dict(EngineConfig, {
            **to_dict(base), "max_num_seqs": max_num_seqs, "page_size": page_size,
            "num_pages": num_pages if num_pages is not None else base.num_pages,
            "max_model_len": max_model_len if max_model_len is not None else base.max_model_len,
        })
        self.model = load_model(model, dtype=dtype, mesh=mesh)
        self.tokenizer = self.model.tokenizer
        head = self._load_predictor(predictor, embedded=model is None)
        self.head = head
        if cluster is not None:
            # Disaggregated: a prefill mesh and N decode meshes, driven by cluster.policy.
            self.loop: ServingLoop = build_cluster(self.model, cluster, self.engine_config,
                                                   head=head, prefill_head=head)
            self.prefill_engine = self.loop.prefill_engine
            self.decode_engine = self.loop.decoders[0]
        else:
            self.prefill_engine = PrefillEngine(self.model, self.engine_config, head=head)
            self.decode_engine = DecodeEngine(self.model, self.engine_config, head=head)
            self.loop = ServingLoop(self.prefill_engine, [self.decode_engine], self.tokenizer)
        self._ids = itertools.count()

    def _load_predictor(self, predictor: str | Path | None, embedded: bool):
        from ares_jax.serving.models import resolve_head

        return resolve_head(self.model, predictor, embedded=embedded,
                            engine=self.engine_config)

    # ------------------------------------------------------------------ requests

    def _encode(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt), prompt
        ids = [int(t) for t in prompt]
        return ids, None

    def _submit(self, prompts: Sequence[Prompt],
                params: SamplingParams | Sequence[SamplingParams] | None) -> list[str]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        if params is None:
            params = SamplingParams()
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(plist)} SamplingParams")
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, plist)):
            ids, text = self._encode(prompt)
            n = next(self._ids)
            requests.append((Request(request_id=f"req-{n}", prompt_ids=ids, params=p,
                                     arrival_time=time.perf_counter(), index=i), text))
        added: list[str] = []
        try:
            for req, text in requests:
                self.loop.add_request(req, text)
                added.append(req.request_id)
        except Exception:
            for rid in added:  # all or nothing: a bad prompt fails the whole call cleanly
                self.loop.abort(rid)
                self.loop.finished.pop(rid, None)
            raise
        return added

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool | None = None) -> list[RequestOutput]:
        ids = self._submit(prompts, sampling_params)  # type: ignore[arg-type]
        show = len(ids) >= 8 if use_tqdm is None else use_tqdm
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not show)
        pending = set(ids)
        try:
            while pending:
                for ev in self.loop.step():
                    if ev.finished and ev.request_id in pending:
                        pending.discard(ev.request_id)
                        bar.update(1)
        except BaseException:
            for rid in pending:
                self.loop.abort(rid)
            raise
        finally:
            bar.close()
        return [self.loop.finished.pop(rid).output() for rid in ids]

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             *, use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        prompts = [self.tokenizer.apply_chat_template(c) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompts: Prompt | Sequence[Prompt],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Iterator[StreamChunk]:
        """Yield tokens as they are produced (in order per request) until all prompts finish."""
        ids = self._submit(prompts, sampling_params)  # type: ignore[arg-type]
        pending = set(ids)
        try:
            while pending:
                for ev in self.loop.step():
                    if ev.request_id in pending:
                        if ev.finished:
                            pending.discard(ev.request_id)
                            self.loop.finished.pop(ev.request_id, None)
                        yield ev
        finally:
            for rid in pending:
                self.loop.abort(rid)
                self.loop.finished.pop(rid, None)

    @property
    def devices(self) -> list[jax.Device]:
        return list(self.model.mesh.devices.flat)
