"""``ares-jax`` command line. Each subsystem registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules exposing ``register(subparsers)``, each adding subcommands with set_defaults(func=...).
_SUBCOMMAND_MODULES = (
    "ares_jax.sim.cli",
    "ares_jax.predictor.cli",
    "ares_jax.serving.cli",  # serve, scheduler, replica
    "ares_jax.bench.cli",  # bench serve
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ares-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            # Only a subsystem that is not installed is skipped, not a broken import inside it.
            if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the subcommand's own parser re-reads it (e.g. under --config)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
