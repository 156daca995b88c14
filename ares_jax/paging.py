"""Page arithmetic shared by the engine, the scheduler and the simulator (no JAX import, so
the pure policies and the simulator stay light)."""

from __future__ import annotations

import numpy as np


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold ``tokens`` tokens (rounded up)."""
    return -(-tokens // page_size)


def pages_as_tokens(kv_tokens: int | np.ndarray, page_size: int) -> int | np.ndarray:
    """KV tokens rounded up to whole pages, in tokens (works on numpy arrays too)."""
    return -(-kv_tokens // page_size) * page_size
