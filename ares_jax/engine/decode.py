"""The decode engine: continuous batching over a paged KV pool.

``insert`` a prefilled request, ``step`` the whole batch one token, ``release`` finished
requests. Batch size and page-table width are bucketed to powers of two, so steady-state serving
reuses a handful of compiled steps; the pool is donated to every step and updated in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ares_jax.engine import sampling
from ares_jax.engine.kv_pool import (
    SCRATCH_PAGE,
    OutOfPages,
    PageAllocator,
    bucket,
    create_pool,
    pages_for,
    read_page_run,
    read_pages,
    run_start,
    write_page_run,
    write_pages,
)
from ares_jax.engine.prefill import resolve_max_model_len
from ares_jax.engine.types import EngineConfig, PrefillResult, Request, StepOutput
from ares_jax.model import model as llama
from ares_jax.model.loader import LoadedModel
from ares_jax.model.sharding import kv_pool_sharding
from ares_jax.transfer.local import handoff

DEFAULT_CPU_PAGES = 2048

# A fused head: (params, hidden [B, D], hidden_tap [B, D], generated [B], max_tokens [B]) -> [B].
HeadFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass
class SlotState:
    request: Request
    num_cached: int  # tokens whose K/V are in the pool
    last_token: int  # the next token to feed; its K/V is written by the next step
    generated: int  # tokens generated so far, the first (from prefill) included
    order: int  # insertion order: the newest is preempted first


class DecodeEngine:
    def __init__(self, model: LoadedModel, config: EngineConfig,
                 head: tuple[HeadFn, Any] | None = None) -> None:
        self.model = model
        self.cfg = model.cfg
        self.config = config
        self.backend = resolve_decode_backend(config.decode_backend, model)
        self._packed = cpu_kernel_weights(model) if self.backend == "cpu_kernel" else None
        self.max_model_len = resolve_max_model_len(model, config)
        self.page_size = config.page_size
        self.max_pages_per_seq = pages_for(self.max_model_len, self.page_size)
        num_pages = config.num_pages or self._pages_from_memory()
        self.pool = create_pool(self.cfg, num_pages, self.page_size, model.mesh, model.rules)
        self.allocator = PageAllocator(num_pages)
        self.slots: dict[str, SlotState] = {}
        self._order = 0
        self.head = head
        self._replicated = NamedSharding(model.mesh, PartitionSpec())

    # ------------------------------------------------------------------ capacity

    def _pages_from_memory(self) -> int:
        if self.config.kv_cache_gib is None:
            return DEFAULT_CPU_PAGES
        per_page = self.cfg.kv_bytes_per_token * self.page_size
        return max(2, int(self.config.kv_cache_gib * 2**30 // per_page))

    @property
    def num_active(self) -> int:
        return len(self.slots)

    def free_slots(self) -> int:
        return self.config.max_num_seqs - len(self.slots)

    def can_admit(self, num_tokens: int) -> bool:
        """A slot is free and the pool has the pages for ``num_tokens`` plus the next token."""
        return self.free_slots() > 0 and \
            pages_for(num_tokens + 1, self.page_size) <= self.allocator.num_free

    def check_fits(self, total_tokens: int) -> None:
        """Refuse a request that could never fit, whatever else is running."""
        if total_tokens > self.max_model_len:
            raise ValueError(f"the request needs {total_tokens} tokens of context; "
                             f"max_model_len is {self.max_model_len}")
        need = pages_for(total_tokens, self.page_size)
        if need > self.allocator.capacity:
            raise ValueError(f"the request needs {need} KV pages; the pool holds "
                             f"{self.allocator.capacity}")

    # ------------------------------------------------------------------ requests in and out

    def insert(self, result: PrefillResult) -> None:
        """Place a prefilled request: its K/V pages move to this engine's mesh and pool."""
        rid = result.request.request_id
        if rid in self.slots:
            raise ValueError(f"request {rid} is already running on this engine")
        if self.free_slots() <= 0:
            raise OutOfPages(f"request {rid}: no free decode slot ({self.config.max_num_seqs})")
        n = pages_for(result.num_tokens, self.page_size)
        pages = self.allocator.allocate(rid, n)
        try:
            self._write(pages, result.k, result.v)
        except Exception:
            self.allocator.free(rid)
            raise
        self._add_slot(result.request, num_cached=result.num_tokens,
                       last_token=result.first.token_id,
                       generated=len(result.request.resumed_ids) + 1)

    def _add_slot(self, request: Request, *, num_cached: int, last_token: int,
                  generated: int) -> None:
        self._order += 1
        self.slots[request.request_id] = SlotState(request, num_cached, last_token, generated,
                                                   self._order)

    def _write(self, pages: list[int], k: jax.Array, v: jax.Array) -> None:
        """Write [L, n, S, KVH, K] arrays (n >= len(pages); the rest go to scratch)."""
        target = kv_pool_sharding(k.shape, self.model.mesh, self.model.rules)
        k, v = handoff(k, v, target)
        first = run_start(pages) if len(pages) == k.shape[1] else None
        if first is not None:
            self.pool.k, self.pool.v = write_page_run(self.pool.k, self.pool.v,
                                                      jnp.int32(first), k, v)
            return
        ids = np.full(k.shape[1], SCRATCH_PAGE, np.int32)
        ids[: len(pages)] = pages
        self.pool.k, self.pool.v = write_pages(self.pool.k, self.pool.v, jnp.asarray(ids), k, v)

    def release(self, request_id: str) -> int:
        """Drop a request (finished, cancelled or failed) and free its pages. Idempotent."""
        self.slots.pop(request_id, None)
        return self.allocator.free(request_id)

    # ------------------------------------------------------------------ page export / import

    def export_pages(self, request_id: str, start: int, end: int) -> tuple[jax.Array, jax.Array]:
        """Copies of the request's pages [start, end) as [L, bucket(n), S, KVH, K] arrays."""
        pages = self.allocator.pages(request_id)
        if not 0 <= start <= end <= len(pages):
            raise IndexError(f"request {request_id}: page range [{start}, {end}) outside its "
                             f"{len(pages)} pages")
        n = end - start
        first = run_start(pages[start:end]) if n == bucket(n) else None
        if first is not None:
            return read_page_run(self.pool.k, self.pool.v, jnp.int32(first), n)
        ids = np.full(bucket(max(n, 1)), SCRATCH_PAGE, np.int32)
        ids[:n] = pages[start:end]
        return read_pages(self.pool.k, self.pool.v, jnp.asarray(ids))

    def reserve(self, request_id: str, num_pages: int) -> list[int]:
        """Pre-allocate pages for an incoming request (migration destination)."""
        return self.allocator.allocate(request_id, num_pages)

    def import_pages(self, request_id: str, start: int, k: jax.Array, v: jax.Array,
                     count: int) -> None:
        """Write ``count`` pages from ``k``/``v`` into the request's reserved pages from
        ``start``."""
        pages = self.allocator.pages(request_id)
        if start + count > len(pages):
            raise IndexError(f"request {request_id}: importing pages [{start}, {start + count}) "
                             f"but only {len(pages)} are reserved")
        if k.shape[1] < count or k.shape[0] != self.cfg.n_layers or \
                k.shape[2:] != self.pool.k.shape[2:]:
            raise ValueError(f"request {request_id}: page block of shape {k.shape} does not "
                             f"match this pool's pages {self.pool.k.shape}")
        self._write(pages[start:start + count], k, v)

    def adopt(self, request: Request, *, num_cached: int, last_token: int, generated: int) -> None:
        """Start decoding a request whose pages were imported (migration commit)."""
        need = pages_for(num_cached, self.page_size)
        if len(self.allocator.pages(request.request_id)) < need:
            raise ValueError(f"request {request.request_id}: {need} pages needed to adopt it")
        self._add_slot(request, num_cached=num_cached, last_token=last_token,
                       generated=generated)

    # ------------------------------------------------------------------ the step

    def _ensure_pages(self) -> list[str]:
        """Give every request a page for its next token, preempting the newest on shortage."""
        preempted: list[str] = []
        for rid in sorted(self.slots, key=lambda r: self.slots[r].order):
            if rid not in self.slots:
                continue
            st = self.slots[rid]
            while len(self.allocator.pages(rid)) < pages_for(st.num_cached + 1, self.page_size):
                try:
                    self.allocator.allocate(rid, 1)
                except OutOfPages:
                    victim = max(self.slots, key=lambda r: self.slots[r].order)
                    self.release(victim)
                    preempted.append(victim)
                    if victim == rid:
                        break
        return preempted

    def step(self) -> StepOutput:
        """Decode one token for every active request."""
        preempted = self._ensure_pages()
        ids = list(self.slots)
        if not ids:
            empty = jnp.zeros((0, self.cfg.d_model), self.cfg.jnp_dtype)
            return StepOutput([], [], empty, empty, None, preempted)
        states = [self.slots[r] for r in ids]
        b = bucket(len(ids))
        width = bucket(max(len(self.allocator.pages(r)) for r in ids),
                       maximum=self.max_pages_per_seq)
        tokens = np.zeros(b, np.int32)
        positions = np.zeros(b, np.int32)
        table = np.full((b, width), SCRATCH_PAGE, np.int32)
        generated = np.zeros(b, np.int32)
        max_tokens = np.ones(b, np.int32)
        for i, (rid, st) in enumerate(zip(ids, states)):
            tokens[i], positions[i] = st.last_token, st.num_cached
            pages = self.allocator.pages(rid)
            table[i, : len(pages)] = pages
            generated[i], max_tokens[i] = st.generated, st.request.params.max_tokens
        params = [st.request.params for st in states]
        s = sampling.sampler_inputs_for(params, [st.request.index for st in states],
                                        [st.generated for st in states],
                                        [st.generated for st in states], b)
        greedy_only, num_logprobs = sampling.batch_mode(params)
        rep = self._replicated
        head_fn, head_params = self.head if self.head is not None else (None, None)
        # One transfer for all per-step inputs rather than one per array.
        inputs = jax.device_put((tokens, positions, table, s, (generated, max_tokens)), rep)
        self.pool.k, self.pool.v, picked, hidden, tap, pred = _decode_jit(
            self.model.weights, self._packed, self.pool.k, self.pool.v, *inputs[:4], head_params,
            inputs[4],
            cfg=self.cfg, ecfg=self.config, backend=self.backend, head_fn=head_fn,
            greedy_only=greedy_only, num_logprobs=num_logprobs)
        host = jax.device_get(picked)
        infos = sampling.to_token_infos(host, params)
        for st, info in zip(states, infos):
            st.num_cached += 1
            st.last_token = info.token_id
            st.generated += 1
        pred_host = None if pred is None else np.asarray(jax.device_get(pred))[: len(ids)]
        return StepOutput(ids, infos, hidden, tap, pred_host, preempted)



def resolve_decode_backend(requested: str, model: LoadedModel) -> str:
    """The decode-step implementation for ``EngineConfig.decode_backend`` on this model."""
    from ares_jax.kernels import build

    devices = list(model.mesh.devices.flat)
    one_cpu = len(devices) == 1 and devices[0].platform == "cpu"
    f32 = model.cfg.jnp_dtype == jnp.float32
    if requested == "auto":
        return "cpu_kernel" if one_cpu and f32 and build.available() else "xla"
    if requested == "cpu_kernel":
        if not one_cpu:
            raise ValueError("EngineConfig.decode_backend='cpu_kernel' needs a one-device CPU "
                             f"mesh; this model is on {len(devices)} {devices[0].platform} "
                             "device(s)")
        if not f32:
            raise ValueError("EngineConfig.decode_backend='cpu_kernel' supports float32 only; "
                             f"this model is {model.cfg.jnp_dtype}")
        build.require()
    return requested


def cpu_kernel_weights(model: LoadedModel) -> dict[str, jax.Array]:
    """The model's projections packed for the CPU matmul kernel, made once per model and shared
    by every decode engine on it."""
    packed = getattr(model, "_cpu_kernel_weights", None)
    if packed is None:
        packed = llama.pack_for_cpu_kernels(model.weights)
        model._cpu_kernel_weights = packed  # type: ignore[attr-defined]
    return packed


def _decode(weights, packed, k_pool, v_pool, tokens, positions, page_table, s, head_params,
            head_inputs, *, cfg, ecfg: EngineConfig, backend: str, head_fn, greedy_only,
            num_logprobs):
    """Model step + in-place KV write + sampling (+ the fused predictor head), one jitted call."""
    out = llama.decode_step(weights, cfg, k_pool, v_pool, tokens, positions, page_table,
                            ecfg.tap_layer, backend, packed)
    page_size = k_pool.shape[2]
    page = jnp.take_along_axis(page_table, (positions // page_size)[:, None], 1)[:, 0]
    slot = positions % page_size
    k_pool = k_pool.at[:, page, slot].set(out["k"])
    v_pool = v_pool.at[:, page, slot].set(out["v"])
    picked = sampling.sample(out["logits"], s, eos_ids=cfg.eos_token_ids,
                             greedy_only=greedy_only, num_logprobs=num_logprobs,
                             candidates=ecfg.sampling_candidates)
    pred = None
    if head_fn is not None:
        generated, max_tokens = head_inputs
        pred = head_fn(head_params, out["hidden"], out["hidden_tap"], generated, max_tokens)
    return k_pool, v_pool, picked, out["hidden"], out["hidden_tap"], pred


# Module-level so that every engine with the same model config shares compiled steps.
_decode_jit = jax.jit(_decode, donate_argnums=(2, 3),
                      static_argnames=("cfg", "ecfg", "backend", "head_fn", "greedy_only",
                                       "num_logprobs"))


def compiled_step_count() -> int:
    """Compiled decode-step variants so far (a test checks steady serving adds none)."""
    return _decode_jit._cache_size()
