"""The paged KV pool: device arrays ``[layers, pages, page_size, kv_heads, head_dim]`` for K and
V, and host-side page accounting.

Page 0 is a scratch page that is never handed out. Padded batch rows and padded page-table
slots point at it, so bucketed shapes never need a branch, and a write to it is harmless.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from ares_jax.model.model import Config
from ares_jax.model.sharding import DEFAULT_RULES, ShardingRules, kv_pool_sharding
from ares_jax.paging import pages_for  # noqa: F401 - re-exported for the engine

SCRATCH_PAGE = 0



class OutOfPages(RuntimeError):
    """The pool has fewer free pages than asked for (the caller queues or preempts)."""


class PageAllocator:
    """Free-list page accounting with an owner per page, so nothing leaks silently."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is scratch), got {num_pages}")
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, SCRATCH_PAGE, -1))
        self._owned: dict[str, list[int]] = {}

    @property
    def capacity(self) -> int:
        """Pages that can ever be handed out."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def owners(self) -> list[str]:
        return list(self._owned)

    def pages(self, owner: str) -> list[int]:
        return self._owned.get(owner, [])

    def allocate(self, owner: str, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPages(f"{owner}: needs {n} pages, {len(self._free)} free "
                             f"of {self.capacity}")
        got = [self._free.pop() for _ in range(n)]
        self._owned.setdefault(owner, []).extend(got)
        return got

    def free(self, owner: str) -> int:
        pages = self._owned.pop(owner, [])
        self._free.extend(reversed(pages))
        return len(pages)


@dataclasses.dataclass
class KVPool:
    """K and V page arrays placed on ``mesh``; replaced functionally after every donated update."""

    k: jax.Array
    v: jax.Array
    sharding: NamedSharding
    page_size: int

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def bytes(self) -> int:
        return 2 * self.k.size * self.k.dtype.itemsize


def pool_shape(cfg: Config, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (cfg.n_layers, num_pages, page_size, cfg.n_kv_heads, cfg.head_dim)


def create_pool(cfg: Config, num_pages: int, page_size: int, mesh: Mesh,
                rules: ShardingRules = DEFAULT_RULES) -> KVPool:
    shape = pool_shape(cfg, num_pages, page_size)
    sharding = kv_pool_sharding(shape, mesh, rules)
    zeros = jax.jit(lambda: jnp.zeros(shape, cfg.jnp_dtype), out_shardings=sharding)
    return KVPool(k=zeros(), v=zeros(), sharding=sharding, page_size=page_size)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def write_pages(k_pool: jax.Array, v_pool: jax.Array, page_ids: jax.Array, k_new: jax.Array,
                v_new: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write ``k_new``/``v_new`` [L, n, S, KVH, K] into pages ``page_ids`` [n] (in place)."""
    return k_pool.at[:, page_ids].set(k_new), v_pool.at[:, page_ids].set(v_new)


@jax.jit
def read_pages(k_pool: jax.Array, v_pool: jax.Array,
               page_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The pages ``page_ids`` [n] as [L, n, S, KVH, K] arrays (a copy, on the pool's mesh)."""
    return k_pool[:, page_ids], v_pool[:, page_ids]


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """Smallest power of two >= max(n, minimum), optionally capped."""
    b = max(minimum, 1)
    while b < n:
        b *= 2
    return b if maximum is None else min(b, max(maximum, n))


def padded_ids(ids: Iterable[int], size: int) -> jax.Array:
    ids = list(ids)
    return jnp.asarray(ids + [SCRATCH_PAGE] * (size - len(ids)), jnp.int32)


# A fresh allocator hands out ascending pages, so a request's pages are usually one run; on
# XLA:CPU a slice update is ~10x faster than the equivalent scatter (docs/BENCHMARKS.md).
def run_start(ids: list[int]) -> int | None:
    """The first page id if ``ids`` are consecutive, else None."""
    if ids and ids[-1] - ids[0] == len(ids) - 1 and all(
            b == a + 1 for a, b in zip(ids, ids[1:])):
        return ids[0]
    return None


@functools.partial(jax.jit, donate_argnums=(0, 1))
def write_page_run(k_pool: jax.Array, v_pool: jax.Array, first: jax.Array, k_new: jax.Array,
                   v_new: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``write_pages`` for the consecutive pages ``first, first + 1, ...`` (in place)."""
    put = lambda pool, x: jax.lax.dynamic_update_slice_in_dim(pool, x, first, axis=1)  # noqa
    return put(k_pool, k_new), put(v_pool, v_new)


@functools.partial(jax.jit, static_argnums=(3,))
def read_page_run(k_pool: jax.Array, v_pool: jax.Array, first: jax.Array,
                  n: int) -> tuple[jax.Array, jax.Array]:
    """``read_pages`` for ``n`` consecutive pages from ``first``."""
    get = lambda pool: jax.lax.dynamic_slice_in_dim(pool, first, n, axis=1)  # noqa: E731
    return get(k_pool), get(v_pool)
