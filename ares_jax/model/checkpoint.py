"""orbax save/restore of converted weights, for restarts that skip dequantising and converting.

A checkpoint is a directory:

- ``weights/``: an orbax ``StandardCheckpointer`` tree of the ``Weights`` arrays (absent
  weights, an untied ``lm_head`` or the QKV biases, are simply left out);
- ``tokenizer.json``: the tokenizer backend in HF ``tokenizers`` format, when there is one;
- ``ares_checkpoint.json``: the ``Config``, the tokenizer's settings and a format version.
  It is written last, so its presence marks a complete checkpoint.

``restore`` reads every array straight into its target sharding on the mesh: each device
fetches only its own shard, and no host copy of the whole model is made.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh
from tokenizers import Tokenizer as HFTokenizer

from ares_jax.config import from_dict, to_dict
from ares_jax.model.errors import CorruptFileError, MissingTensorError, TensorShapeError
from ares_jax.model.model import Config, LayerWeights, Weights, is_shape_leaf, weight_shapes
from ares_jax.model.sharding import DEFAULT_RULES, ShardingRules, weight_shardings
from ares_jax.model.tokenizer import Tokenizer

MANIFEST_FILE = "ares_checkpoint.json"
WEIGHTS_DIR = "weights"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "ares-jax-checkpoint"
FORMAT_VERSION = 1

_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerWeights))
_TOP_FIELDS = tuple(f.name for f in dataclasses.fields(Weights) if f.name != "layers")


def is_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a directory written by ``save`` (it has the manifest)."""
    return (Path(path) / MANIFEST_FILE).is_file()


def save(path: str | Path, cfg: Config, weights: Weights, tokenizer: Tokenizer | None = None,
         *, overwrite: bool = False) -> Path:
    """Write ``weights`` (device or numpy arrays), ``cfg`` and ``tokenizer`` under ``path``."""
    import orbax.checkpoint as ocp

    path = Path(path).resolve()  # orbax wants absolute paths
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
        if any(path.iterdir()) and not is_checkpoint(path):
            raise FileExistsError(f"{path} exists and is not an ares-jax checkpoint; refusing "
                                  "to overwrite it")
        (path / MANIFEST_FILE).unlink(missing_ok=True)  # incomplete until rewritten below
    _check_shapes(_to_tree(weights), cfg, where="weights to save")
    path.mkdir(parents=True, exist_ok=True)

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / WEIGHTS_DIR, _to_tree(weights), force=True)
    checkpointer.wait_until_finished()

    tokenizer_meta = None
    if tokenizer is not None:
        (path / TOKENIZER_FILE).write_text(tokenizer.backend.to_str())
        tokenizer_meta = {
            "eos_token_ids": list(tokenizer.eos_token_ids),
            "bos_token_id": tokenizer.bos_token_id,
            "add_bos": tokenizer.add_bos,
            "chat_template": tokenizer.chat_template,
            "backend_adds_special": tokenizer.backend_adds_special,
        }
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "config": to_dict(cfg),
                "tokenizer": tokenizer_meta}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return path


def restore(path: str | Path, *, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES,
            dtype: str | None = None) -> tuple[Config, Weights, Tokenizer | None]:
    """Read a checkpoint onto ``mesh``; ``dtype`` overrides the saved config's dtype."""
    import orbax.checkpoint as ocp

    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    manifest = _read_manifest(path)
    try:
        cfg = from_dict(Config, manifest["config"])
    except (TypeError, ValueError) as err:
        raise CorruptFileError(f"{path / MANIFEST_FILE}: bad config: {err}") from err
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)

    weights_dir = path / WEIGHTS_DIR
    if not weights_dir.is_dir():
        raise CorruptFileError(f"{path}: checkpoint has no {WEIGHTS_DIR}/ directory")
    checkpointer = ocp.StandardCheckpointer()
    _check_shapes(_saved_shapes(checkpointer, weights_dir), cfg, where=str(weights_dir))

    shardings = _to_tree(weight_shardings(cfg, mesh, rules))
    shapes = _to_tree(weight_shapes(cfg))
    # orbax casts to the target dtype while reading, so restoring an f32 checkpoint as bf16
    # never holds an f32 copy on device.
    target = jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape, cfg.jnp_dtype, sharding=sharding),
        shapes, shardings, is_leaf=is_shape_leaf)
    try:
        tree = checkpointer.restore(weights_dir, target)
    except Exception as err:  # orbax/tensorstore raise many types for damaged data
        raise CorruptFileError(f"{weights_dir}: cannot restore weights (truncated or corrupt "
                               f"checkpoint?): {err}") from err
    return cfg, _from_tree(tree), _restore_tokenizer(path, manifest.get("tokenizer"))


# ----------------------------------------------------------------------------- helpers


def _to_tree(w: Weights) -> dict[str, Any]:
    """Weights -> nested dict without the absent (None) weights, which orbax cannot store.

    Works on any ``Weights``-shaped object: arrays, shardings, or shape tuples.
    """
    tree: dict[str, Any] = {k: getattr(w, k) for k in _TOP_FIELDS if getattr(w, k) is not None}
    tree["layers"] = {k: getattr(w.layers, k) for k in _LAYER_FIELDS
                      if getattr(w.layers, k) is not None}
    return tree


def _from_tree(tree: dict[str, Any]) -> Weights:
    layers = LayerWeights(**{k: tree["layers"].get(k) for k in _LAYER_FIELDS})
    return Weights(layers=layers, **{k: tree.get(k) for k in _TOP_FIELDS})


def _flat(tree: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in tree.items() if k != "layers"}
    out.update({f"layers.{k}": v for k, v in tree.get("layers", {}).items()})
    return out


def _check_shapes(tree: dict[str, Any], cfg: Config, where: str) -> None:
    """``tree`` leaves are anything with ``.shape`` (arrays, orbax array metadata)."""
    have = {k: tuple(v.shape) for k, v in _flat(tree).items()}
    want = {k: tuple(v) for k, v in _flat(_to_tree(weight_shapes(cfg))).items()}
    missing = sorted(set(want) - set(have))
    if missing:
        raise MissingTensorError(f"{where}: weights {missing} required by the config are missing")
    for name, shape in want.items():
        if have[name] != shape:
            raise TensorShapeError(f"{where}: weight {name!r} has shape {have[name]} but the "
                                   f"config implies {shape}")


def _saved_shapes(checkpointer: Any, weights_dir: Path) -> dict[str, Any]:
    try:
        meta = checkpointer.metadata(weights_dir)
    except Exception as err:  # noqa: BLE001 - any failure here means an unreadable checkpoint
        raise CorruptFileError(f"{weights_dir}: unreadable orbax metadata (truncated or corrupt "
                               f"checkpoint?): {err}") from err
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict) or not isinstance(tree.get("layers"), dict):
        raise CorruptFileError(f"{weights_dir}: orbax metadata is not an ares-jax weights tree")
    return tree


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path}: not an ares-jax checkpoint (no {MANIFEST_FILE}; was "
                                "the save interrupted?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{manifest_path}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptFileError(f"{manifest_path}: not an {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CorruptFileError(f"{manifest_path}: format version {manifest.get('version')!r}, "
                               f"this ares-jax reads version {FORMAT_VERSION}")
    return manifest


def _restore_tokenizer(path: Path, meta: dict[str, Any] | None) -> Tokenizer | None:
    if meta is None:
        return None
    tokenizer_path = path / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise CorruptFileError(f"{path}: the manifest records a tokenizer but {TOKENIZER_FILE} "
                               "is missing")
    try:
        backend = HFTokenizer.from_str(tokenizer_path.read_text())
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise CorruptFileError(f"{tokenizer_path}: unreadable tokenizer: {err}") from err
    return Tokenizer(
        backend=backend,
        eos_token_ids=tuple(meta.get("eos_token_ids", ())),
        bos_token_id=meta.get("bos_token_id"),
        add_bos=bool(meta.get("add_bos", False)),
        chat_template=meta.get("chat_template"),
        backend_adds_special=bool(meta.get("backend_adds_special", False)),
    )
