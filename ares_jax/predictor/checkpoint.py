"""Head checkpoints: an orbax ``state/`` directory plus ``head.json`` (config, hidden size,
training metrics). The shipped head in ``ares_jax/assets/`` uses the same layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx

from ares_jax.config import from_dict, to_dict
from ares_jax.predictor.config import HeadConfig
from ares_jax.predictor.heads import LengthHead

META = "head.json"


def save_head(path: str | Path, head: LengthHead, extra: dict[str, Any] | None = None) -> None:
    """Write (or overwrite) a checkpoint at ``path``."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "state", nnx.state(head), force=True)
    meta = {"head": to_dict(head.cfg), "hidden_size": head.hidden_size, **(extra or {})}
    (path / META).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(path: str | Path) -> dict[str, Any]:
    meta = Path(path) / META
    if not meta.is_file():
        raise FileNotFoundError(f"{path}: not a predictor head checkpoint (no {META})")
    return json.loads(meta.read_text())


def load_head(path: str | Path) -> LengthHead:
    path = Path(path).absolute()
    meta = read_meta(path)
    cfg = from_dict(HeadConfig, meta["head"])
    abstract = nnx.eval_shape(lambda: LengthHead(cfg, meta["hidden_size"], rngs=nnx.Rngs(0)))
    graphdef, target = nnx.split(abstract)
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(path / "state", target)
    return nnx.merge(graphdef, state)
