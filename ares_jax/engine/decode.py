"""The decode engine: continuous batching over a paged KV pool.

``insert`` a prefilled request, ``step`` the whole batch one token. Each step checks the
token-level stop conditions itself and frees the pages of every request that finished, so a
remote replica needs no round trip per token. Batch size and page-table width are bucketed to
powers of two, so steady-state serving reuses a handful of compiled steps; the pool is donated
to every step and updated in place.

The slots, the page allocator and the pool are private: everything outside (the replica
handles, the scheduler core, the migration code) goes through the methods below, which is what
lets the same scheduler drive an engine in this process or one behind gRPC.
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
from ares_jax.engine.stops import token_stop
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
    predicted_remaining: float = float("nan")  # the fused head's latest output


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeLoad:
    """One engine's load, columnar (one entry per running request, in slot order)."""

    free_pages: int
    used_pages: int
    capacity_pages: int
    reserved_pages: int  # held for requests that are not running here (incoming migrations)
    free_slots: int
    request_ids: tuple[str, ...]
    kv_tokens: np.ndarray  # int64
    generated: np.ndarray  # int64
    max_tokens: np.ndarray  # int64
    predicted_remaining: np.ndarray  # float64, NaN before the first prediction


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
        self._pool = create_pool(self.cfg, num_pages, self.page_size, model.mesh, model.rules)
        self._allocator = PageAllocator(num_pages)
        self._slots: dict[str, SlotState] = {}
        self._order = 0
        self.head = head
        self._replicated = NamedSharding(model.mesh, PartitionSpec())
        self._eos = frozenset(self.cfg.eos_token_ids)

    # ------------------------------------------------------------------ capacity

    def _pages_from_memory(self) -> int:
        if self.config.kv_cache_gib is None:
            return DEFAULT_CPU_PAGES
        per_page = self.cfg.kv_bytes_per_token * self.page_size
        return max(2, int(self.config.kv_cache_gib * 2**30 // per_page))

    @property
    def num_active(self) -> int:
        return len(self._slots)

    @property
    def num_free_pages(self) -> int:
        return self._allocator.num_free

    @property
    def num_used_pages(self) -> int:
        return self._allocator.num_used

    @property
    def capacity_pages(self) -> int:
        return self._allocator.capacity

    @property
    def kv_bytes_per_page(self) -> int:
        return self.cfg.kv_bytes_per_token * self.page_size

    def free_slots(self) -> int:
        return self.config.max_num_seqs - len(self._slots)

    def is_running(self, request_id: str) -> bool:
        return request_id in self._slots

    def running_ids(self) -> list[str]:
        return list(self._slots)

    def pages_held(self, request_id: str) -> int:
        """Pages allocated to ``request_id`` (running or reserved)."""
        return len(self._allocator.pages(request_id))

    def page_owners(self) -> list[str]:
        return self._allocator.owners()

    def num_cached(self, request_id: str) -> int:
        return self._slots[request_id].num_cached

    def can_admit(self, num_tokens: int) -> bool:
        """A slot is free and the pool has the pages for ``num_tokens`` plus the next token."""
        return self.free_slots() > 0 and \
            pages_for(num_tokens + 1, self.page_size) <= self._allocator.num_free

    def load(self) -> DecodeLoad:
        """The running requests as columns plus page counts: what a scheduler snapshot needs."""
        states = list(self._slots.values())
        running_pages = sum(len(self._allocator.pages(r)) for r in self._slots)
        return DecodeLoad(
            free_pages=self._allocator.num_free, used_pages=self._allocator.num_used,
            capacity_pages=self._allocator.capacity,
            reserved_pages=self._allocator.num_used - running_pages,
            free_slots=self.free_slots(), request_ids=tuple(self._slots),
            kv_tokens=np.fromiter((s.num_cached for s in states), np.int64, len(states)),
            generated=np.fromiter((s.generated for s in states), np.int64, len(states)),
            max_tokens=np.fromiter((s.request.params.max_tokens for s in states), np.int64,
                                   len(states)),
            predicted_remaining=np.fromiter((s.predicted_remaining for s in states), np.float64,
                                            len(states)))

    def block_until_ready(self) -> None:
        """Wait for every write queued on the pool (a copy has landed before a commit)."""
        jax.block_until_ready((self._pool.k, self._pool.v))

    def check_fits(self, total_tokens: int) -> None:
        """Refuse a request that could never fit, whatever else is running."""
        if total_tokens > self.max_model_len:
            raise ValueError(f"the request needs {total_tokens} tokens of context; "
                             f"max_model_len is {self.max_model_len}")
        need = pages_for(total_tokens, self.page_size)
        if need > self._allocator.capacity:
            raise ValueError(f"the request needs {need} KV pages; the pool holds "
                             f"{self._allocator.capacity}")

    # ------------------------------------------------------------------ requests in and out

    def insert(self, result: PrefillResult) -> None:
        """Place a prefilled request: its K/V pages move to this engine's mesh and pool."""
        self.insert_kv(result.request, result.k, result.v, num_tokens=result.num_tokens,
                       first_token=result.first.token_id)

    def insert_kv(self, request: Request, k: jax.Array, v: jax.Array, *, num_tokens: int,
                  first_token: int, predicted_remaining: float | None = None) -> None:
        """``insert`` from the parts: ``k``/``v`` are [L, n >= pages_for(num_tokens), S, KVH,
        K] page blocks on any mesh of this process (they are copied here with device_put)."""
        rid = request.request_id
        if rid in self._slots:
            raise ValueError(f"request {rid} is already running on this engine")
        if self.free_slots() <= 0:
            raise OutOfPages(f"request {rid}: no free decode slot ({self.config.max_num_seqs})")
        n = pages_for(num_tokens, self.page_size)
        if k.shape[1] < n:
            raise ValueError(f"request {rid}: a block of {k.shape[1]} pages cannot hold "
                             f"{num_tokens} tokens")
        pages = self._allocator.allocate(rid, n)
        try:
            self._write(pages, k, v)
        except Exception:
            self._allocator.free(rid)
            raise
        self._add_slot(request, num_cached=num_tokens, last_token=first_token,
                       generated=len(request.resumed_ids) + 1)
        if predicted_remaining is not None:
            self._slots[rid].predicted_remaining = float(predicted_remaining)

    def _add_slot(self, request: Request, *, num_cached: int, last_token: int,
                  generated: int) -> None:
        self._order += 1
        self._slots[request.request_id] = SlotState(request, num_cached, last_token, generated,
                                                    self._order)

    def _write(self, pages: list[int], k: jax.Array, v: jax.Array) -> None:
        """Write [L, n, S, KVH, K] arrays (n >= len(pages); the rest go to scratch)."""
        target = kv_pool_sharding(k.shape, self.model.mesh, self.model.rules)
        k, v = handoff(k, v, target)
        first = run_start(pages) if len(pages) == k.shape[1] else None
        pool = self._pool
        if first is not None:
            pool.k, pool.v = write_page_run(pool.k, pool.v, jnp.int32(first), k, v)
            return
        ids = np.full(k.shape[1], SCRATCH_PAGE, np.int32)
        ids[: len(pages)] = pages
        pool.k, pool.v = write_pages(pool.k, pool.v, jnp.asarray(ids), k, v)

    def release(self, request_id: str) -> int:
        """Drop a request (finished, cancelled, failed, or reserved for a migration that was
        abandoned) and free its pages. Idempotent; returns the pages freed."""
        self._slots.pop(request_id, None)
        return self._allocator.free(request_id)

    # ------------------------------------------------------------------ page export / import

    def export_pages(self, request_id: str, start: int, end: int) -> tuple[jax.Array, jax.Array]:
        """Copies of the request's pages [start, end) as [L, bucket(n), S, KVH, K] arrays."""
        pages = self._allocator.pages(request_id)
        if not 0 <= start <= end <= len(pages):
            raise IndexError(f"request {request_id}: page range [{start}, {end}) outside its "
                             f"{len(pages)} pages")
        n = end - start
        first = run_start(pages[start:end]) if n == bucket(n) else None
        if first is not None:
            return read_page_run(self._pool.k, self._pool.v, jnp.int32(first), n)
        ids = np.full(bucket(max(n, 1)), SCRATCH_PAGE, np.int32)
        ids[:n] = pages[start:end]
        return read_pages(self._pool.k, self._pool.v, jnp.asarray(ids))

    def reserve(self, request_id: str, num_pages: int) -> list[int]:
        """Pre-allocate pages for an incoming request (migration destination); raises
        ``OutOfPages`` when the pool cannot supply them."""
        if request_id in self._slots:
            raise ValueError(f"request {request_id} is already running on this engine")
        return self._allocator.allocate(request_id, num_pages)

    def import_pages(self, request_id: str, start: int, k: jax.Array, v: jax.Array,
                     count: int) -> None:
        """Write ``count`` pages from ``k``/``v`` into the request's reserved pages from
        ``start``."""
        pages = self._allocator.pages(request_id)
        if start + count > len(pages):
            raise IndexError(f"request {request_id}: importing pages [{start}, {start + count}) "
                             f"but only {len(pages)} are reserved")
        if k.shape[1] < count or k.shape[0] != self.cfg.n_layers or \
                k.shape[2:] != self._pool.k.shape[2:]:
            raise ValueError(f"request {request_id}: page block of shape {k.shape} does not "
                             f"match this pool's pages {self._pool.k.shape}")
        self._write(pages[start:start + count], k, v)

    def adopt(self, request: Request, *, num_cached: int, last_token: int, generated: int,
              predicted_remaining: float = float("nan")) -> None:
        """Start decoding a request whose pages were imported (migration commit)."""
        need = pages_for(num_cached, self.page_size)
        if len(self._allocator.pages(request.request_id)) < need:
            raise ValueError(f"request {request.request_id}: {need} pages needed to adopt it")
        if request.request_id in self._slots:
            raise ValueError(f"request {request.request_id} is already running on this engine")
        if self.free_slots() <= 0:
            raise OutOfPages(f"request {request.request_id}: no free decode slot")
        self._add_slot(request, num_cached=num_cached, last_token=last_token,
                       generated=generated)
        self._slots[request.request_id].predicted_remaining = predicted_remaining

    def detach(self, request_id: str) -> SlotState:
        """Stop decoding a request but keep its pages (the stop-and-copy stage of a migration:
        its last pages are exported next). ``reattach`` undoes it; ``release`` ends it."""
        return self._slots.pop(request_id)

    def reattach(self, state: SlotState) -> None:
        """Resume decoding a detached request exactly where it stopped."""
        if len(self._allocator.pages(state.request.request_id)) < \
                pages_for(state.num_cached, self.page_size):
            raise ValueError(f"request {state.request.request_id}: its pages were freed")
        self._slots[state.request.request_id] = state

    # ------------------------------------------------------------------ the step

    def _ensure_pages(self) -> list[str]:
        """Give every request a page for its next token, preempting the newest on shortage."""
        preempted: list[str] = []
        slots, alloc = self._slots, self._allocator
        for rid in sorted(slots, key=lambda r: slots[r].order):
            if rid not in slots:
                continue
            st = slots[rid]
            while len(alloc.pages(rid)) < pages_for(st.num_cached + 1, self.page_size):
                try:
                    alloc.allocate(rid, 1)
                except OutOfPages:
                    victim = max(slots, key=lambda r: slots[r].order)
                    self.release(victim)
                    preempted.append(victim)
                    if victim == rid:
                        break
        return preempted

    def step(self) -> StepOutput:
        """Decode one token for every active request; requests that finish are released."""
        preempted = self._ensure_pages()
        ids = list(self._slots)
        if not ids:
            empty = jnp.zeros((0, self.cfg.d_model), self.cfg.jnp_dtype)
            return StepOutput([], [], empty, empty, None, preempted)
        states = [self._slots[r] for r in ids]
        b = bucket(len(ids))
        width = bucket(max(len(self._allocator.pages(r)) for r in ids),
                       maximum=self.max_pages_per_seq)
        tokens = np.zeros(b, np.int32)
        positions = np.zeros(b, np.int32)
        table = np.full((b, width), SCRATCH_PAGE, np.int32)
        generated = np.zeros(b, np.int32)
        max_tokens = np.ones(b, np.int32)
        for i, (rid, st) in enumerate(zip(ids, states)):
            tokens[i], positions[i] = st.last_token, st.num_cached
            pages = self._allocator.pages(rid)
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
        pool = self._pool
        pool.k, pool.v, picked, hidden, tap, pred = _decode_jit(
            self.model.weights, self._packed, pool.k, pool.v, *inputs[:4], head_params,
            inputs[4],
            cfg=self.cfg, ecfg=self.config, backend=self.backend, head_fn=head_fn,
            greedy_only=greedy_only, num_logprobs=num_logprobs)
        host = jax.device_get(picked)
        infos = sampling.to_token_infos(host, params)
        finish, stop = [], []
        eos = self._eos
        for rid, st, info in zip(ids, states, infos):
            st.num_cached += 1
            st.last_token = info.token_id
            st.generated += 1
            reason, stop_reason = token_stop(info.token_id, st.generated,
                                             len(st.request.prompt_ids), st.request.params, eos,
                                             self.max_model_len)
            finish.append(reason)
            stop.append(stop_reason)
            if reason is not None:
                self.release(rid)
        pred_host = None if pred is None else np.asarray(jax.device_get(pred))[: len(ids)]
        if pred_host is not None:
            for st, p in zip(states, pred_host):
                st.predicted_remaining = float(p)
        return StepOutput(ids, infos, hidden, tap, pred_host, preempted, finish, stop)



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
    return model.cached("cpu_kernel_weights", lambda: llama.pack_for_cpu_kernels(model.weights))


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
