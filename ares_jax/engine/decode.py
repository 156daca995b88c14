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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ares_jax.engine import sampling
from ares_jax.engine.kv_pool import (
    SCRATCH_PAGE,
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
from ares_jax.engine.slots import SlotTable
from ares_jax.engine.types import EngineConfig, PrefillResult, Request, StepOutput
from ares_jax.model import model as llama
from ares_jax.model.loader import LoadedModel
from ares_jax.model.sharding import kv_pool_sharding
from ares_jax.transfer.local import handoff

DEFAULT_CPU_PAGES = 2048

# A fused head: (params, hidden [B, D], hidden_tap [B, D], generated [B], max_tokens [B]) -> [B].
HeadFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class DecodeEngine(SlotTable):
    """The slot table (``engine/slots.py``: requests, pages, preemption, stop checks) plus
    the device side: the KV pool and the jitted step."""

    def __init__(self, model: LoadedModel, config: EngineConfig,
                 head: tuple[HeadFn, Any] | None = None) -> None:
        self.model = model
        self.cfg = model.cfg
        self.config = config
        self.backend = resolve_decode_backend(config.decode_backend, model)
        self._packed = cpu_kernel_weights(model) if self.backend == "cpu_kernel" else None
        max_model_len = resolve_max_model_len(model, config)
        num_pages = config.num_pages or self._pages_from_memory()
        super().__init__(num_pages=num_pages, page_size=config.page_size,
                         max_num_seqs=config.max_num_seqs, max_model_len=max_model_len,
                         eos_token_ids=self.cfg.eos_token_ids)
        self.max_pages_per_seq = pages_for(self.max_model_len, self.page_size)
        self._pool = create_pool(self.cfg, num_pages, self.page_size, model.mesh, model.rules)
        self.head = head
        self._replicated = NamedSharding(model.mesh, PartitionSpec())

    @property
    def kv_bytes_per_page(self) -> int:
        return self.cfg.kv_bytes_per_token * self.page_size

    # ------------------------------------------------------------------ capacity

    def _pages_from_memory(self) -> int:
        if self.config.kv_cache_gib is None:
            return DEFAULT_CPU_PAGES
        per_page = self.cfg.kv_bytes_per_token * self.page_size
        return max(2, int(self.config.kv_cache_gib * 2**30 // per_page))

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
        n = pages_for(num_tokens, self.page_size)
        if k.shape[1] < n:
            raise ValueError(f"request {rid}: a block of {k.shape[1]} pages cannot hold "
                             f"{num_tokens} tokens")
        pages = self.admit(request, num_tokens=num_tokens, first_token=first_token,
                           predicted_remaining=predicted_remaining)
        try:
            self._write(pages, k, v)
        except Exception:
            self.release(rid)
            raise

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

    def step(self) -> StepOutput:
        """Decode one token for every active request; requests that finish are released."""
        preempted = self.ensure_pages()
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
            greedy_only=greedy_only, num_logprobs=num_logprobs, pool_sharding=pool.sharding)
        host = jax.device_get(picked)
        infos = sampling.to_token_infos(host, params)
        pred_host = None if pred is None else np.asarray(jax.device_get(pred))[: len(ids)]
        finish, stop = self.advance_slots(ids, [i.token_id for i in infos], pred_host)
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
            num_logprobs, pool_sharding):
    """Model step + in-place KV write + sampling (+ the fused predictor head), one jitted call."""
    out = llama.decode_step(weights, cfg, k_pool, v_pool, tokens, positions, page_table,
                            ecfg.tap_layer, backend, packed)
    page_size = k_pool.shape[2]
    page = jnp.take_along_axis(page_table, (positions // page_size)[:, None], 1)[:, 0]
    slot = positions % page_size
    # The pool leaves with the sharding it came in with (left to XLA, a one-device mesh's pool
    # comes back with a different spec). A fresh engine's second step adds a second entry to
    # jit's C++ dispatch cache (the donated pool comes back committed), but jax_log_compiles
    # shows it is neither traced nor compiled again: one XLA compilation per shape bucket.
    k_pool = jax.lax.with_sharding_constraint(k_pool.at[:, page, slot].set(out["k"]),
                                              pool_sharding)
    v_pool = jax.lax.with_sharding_constraint(v_pool.at[:, page, slot].set(out["v"]),
                                              pool_sharding)
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
                                       "num_logprobs", "pool_sharding"))


def compiled_step_count() -> int:
    """Dispatch-cache entries of the decode step (a test checks steady serving adds none);
    an entry is not always a compilation (see the comment in ``_decode``)."""
    return _decode_jit._cache_size()
