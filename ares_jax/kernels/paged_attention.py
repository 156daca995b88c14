"""A paged-attention decode kernel for XLA:CPU, built on first use and called through the XLA FFI.

XLA:CPU runs decode attention as a gather of every sequence's pages into a fresh, transposed
``[B, ctx, KVH, K]`` block followed by two small batched matmuls, which moves each cached K/V
row three times. ``paged_attention_cpu.cc`` reads each row once, in place, and splits the work
over XLA's intra-op thread pool. GPU and TPU keep the XLA formulation in ``model.py``.

The C++ source ships with the package and is compiled with the host's C++ compiler (``$CXX``,
else ``c++``) into a per-user cache (``$ARES_JAX_CACHE_DIR``, else ``~/.cache/ares_jax``), keyed
by the source, the flags, the jaxlib version and the CPU's feature flags, so a shared home
directory never serves a library built for another CPU. Nothing is downloaded. Without a
compiler ``available()`` is False and the engine falls back to the XLA formulation.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention_cpu.cc")
TARGET = "ares_paged_attention_cpu"
SYMBOL = "AresPagedAttentionCpu"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


class KernelUnavailable(RuntimeError):
    """The CPU kernel could not be built or loaded on this machine."""


def cache_dir() -> Path:
    root = os.environ.get("ARES_JAX_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ares_jax"


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _library_path(compiler: str) -> Path:
    import jaxlib

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(),
                 jaxlib.__version__.encode(), platform.machine().encode(),
                 _cpu_features().encode()):
        key.update(part)
    return cache_dir() / f"paged_attention_cpu-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the kernel if this machine has no up-to-date build yet; returns the library."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise KernelUnavailable("no C++ compiler found (set $CXX)")
    out = _library_path(compiler)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelUnavailable(f"{' '.join(cmd)} could not run: {e}") from e
        if proc.returncode != 0:
            raise KernelUnavailable(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _register() -> str | None:
    """Build, load and register the FFI target once per process; the reason if that failed."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(lib, SYMBOL)),
                                    platform="cpu")
    except (KernelUnavailable, OSError, AttributeError) as e:
        log.warning("CPU paged-attention kernel unavailable, using the XLA formulation: %s", e)
        return str(e)
    return None


def available() -> bool:
    """Whether the kernel is built and registered (building it on the first call)."""
    return _register() is None


def require() -> None:
    """Build and register the kernel, or raise ``KernelUnavailable`` with the reason."""
    reason = _register()
    if reason is not None:
        raise KernelUnavailable(reason)


def paged_attention(
    q: jax.Array,
    k_self: jax.Array,
    v_self: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    layer: jax.Array,
    page_table: jax.Array,
    positions: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """Decode attention for one layer, reading K/V in place from the whole pool.

    q: [B, KVH, G, K] f32; k_self/v_self: [B, KVH, K] (the new token's own K/V);
    k_pool/v_pool: [L, P, S, KVH, K] f32; layer: int32 scalar; page_table: [B, W] int32;
    positions: [B] int32, the tokens already cached. Returns [B, KVH, G, K] f32: softmax over
    the first ``positions[b]`` cached tokens plus the token itself, as in ``model.decode_step``.
    """
    require()
    f32 = jnp.float32
    if any(x.dtype != f32 for x in (q, k_self, v_self, k_pool, v_pool)):
        raise TypeError("paged_attention (CPU kernel) supports float32 only")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, f32))
    return call(q, k_self, v_self, k_pool, v_pool, jnp.asarray(layer, jnp.int32),
                page_table.astype(jnp.int32), positions.astype(jnp.int32),
                scale=np.float32(scale))
