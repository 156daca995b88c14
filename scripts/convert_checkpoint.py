#!/usr/bin/env python
"""Convert a GGUF file or Hugging Face checkpoint directory into an ares-jax orbax checkpoint.

    python scripts/convert_checkpoint.py SRC DST [--dtype bfloat16] [--overwrite]

``load_model(DST)`` then restores straight into the target sharding, skipping dequantisation
and layout conversion.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="a .gguf file or an HF checkpoint directory")
    parser.add_argument("dst", help="directory to write the ares-jax checkpoint to")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="stored dtype (default: bf16 on GPU/TPU, f32 on CPU)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing ares-jax checkpoint at DST")
    args = parser.parse_args(argv)

    from ares_jax.model import checkpoint, load_model

    loaded = load_model(args.src, dtype=args.dtype)
    out = checkpoint.save(args.dst, loaded.cfg, loaded.weights, loaded.tokenizer,
                          overwrite=args.overwrite)
    print(f"wrote {out} ({loaded.cfg.architecture}, {loaded.cfg.n_layers} layers, "
          f"{loaded.cfg.jnp_dtype.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
