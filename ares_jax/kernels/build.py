"""Build, cache and register ares-jax's XLA:CPU kernels (``*_cpu.cc`` beside this file).

The C++ sources ship with the package and are compiled together, with the host's C++ compiler
(``$CXX``, else ``c++``), into one library in a per-user cache (``$ARES_JAX_CACHE_DIR``, else
``~/.cache/ares_jax``). The cache key covers the sources, the flags, the jaxlib version and the
CPU's feature flags, so a shared home directory never serves a library built for another CPU.
Nothing is downloaded. Without a compiler ``available()`` is False and the engine keeps XLA's
own lowering.

No ``-ffast-math``: GCC 12 links ``crtfastmath.o`` into shared libraries built with it, which
would switch the whole process to flush-to-zero.
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

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "paged_attention_cpu.cc", HERE / "matmul_cpu.cc")
HEADERS = (HERE / "cpu_common.h",)
# FFI target name -> exported handler symbol.
TARGETS = {
    "ares_paged_attention_cpu": "AresPagedAttentionCpu",
    "ares_layer_matmul_cpu": "AresLayerMatmulCpu",
}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


class KernelUnavailable(RuntimeError):
    """The CPU kernels could not be built or loaded on this machine."""


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
    for part in (*(p.read_bytes() for p in SOURCES + HEADERS), " ".join(FLAGS).encode(),
                 compiler.encode(), jaxlib.__version__.encode(), platform.machine().encode(),
                 _cpu_features().encode()):
        key.update(part)
    return cache_dir() / f"ares_cpu_kernels-{key.hexdigest()[:16]}.so"


def find_compiler() -> str | None:
    """``$CXX``, else ``c++`` or ``g++`` on the PATH; None when there is none."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build() -> Path:
    """Compile the kernels if this machine has no up-to-date build yet; returns the library."""
    compiler = find_compiler()
    if not compiler:
        raise KernelUnavailable("no C++ compiler found (set $CXX)")
    out = _library_path(compiler)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{HERE}",
           *map(str, SOURCES), "-o", tmp]
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
    """Build, load and register every FFI target once per process; the reason if that failed."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (KernelUnavailable, OSError, AttributeError) as e:
        log.warning("ares-jax CPU kernels unavailable, using XLA's own lowering: %s", e)
        return str(e)
    return None


def available() -> bool:
    """Whether the kernels are built and registered (building them on the first call)."""
    return _register() is None


def require() -> None:
    """Build and register the kernels, or raise ``KernelUnavailable`` with the reason."""
    reason = _register()
    if reason is not None:
        raise KernelUnavailable(reason)
