"""``ares-jax predictor collect | train | eval``."""

from __future__ import annotations

import argparse
import json
import sys

from ares_jax.config import with_overrides


def register(subparsers) -> None:
    parser = subparsers.add_parser("predictor", help="remaining-length predictor: collect data, "
                                   "train heads, evaluate against baselines")
    sub = parser.add_subparsers(dest="predictor_command", required=True)

    p = sub.add_parser("collect", help="run the engine on ShareGPT + HumanEval prompts and record "
                       "hidden states every k tokens (resumable)")
    p.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="CollectConfig override, e.g. max_tokens=768")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_collect)

    p = sub.add_parser("train", help="train a head (ARES regression or TRAIL-style classifier)")
    p.add_argument("--data", required=True, help="collected data directory")
    p.add_argument("--max-shards", type=int, default=None,
                   help="use only the first N shards (a fixed snapshot of a growing collection)")
    p.add_argument("--out", required=True, help="checkpoint directory (best/ and latest/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig override, e.g. head.layer=last or head.loss=l1")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="score every method on the same held-out prediction points")
    p.add_argument("--data", required=True, help="collected data directory")
    p.add_argument("--max-shards", type=int, default=None,
                   help="use only the first N shards (a fixed snapshot of a growing collection)")
    p.add_argument("--head", action="append", default=[], metavar="NAME=CKPT",
                   help="a trained head checkpoint to score (repeatable)")
    p.add_argument("--prompt-only", default=None, metavar="CKPT",
                   help="TetriInfer-style prompt-only classifier checkpoint")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="write MAE vs progress plot")
    p.set_defaults(func=_eval)

    p = sub.add_parser("train-prompt-only", help="fine-tune the TetriInfer-style prompt-only "
                       "baseline (a separate SmolLM2 copy with a length-bucket classifier)")
    p.add_argument("--data", required=True)
    p.add_argument("--max-shards", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train_prompt_only)


def _collect(args: argparse.Namespace) -> int:
    from ares_jax.model.loader import load_model
    from ares_jax.predictor.collect import Collector
    from ares_jax.predictor.config import CollectConfig

    cfg = with_overrides(CollectConfig(), args.overrides)
    model = load_model(args.model)
    manifest = Collector(model, cfg, args.out).run(progress=not args.no_progress)
    json.dump(manifest.get("stats", {}), sys.stdout, indent=2)
    print()
    return 0


def _train(args: argparse.Namespace) -> int:
    from ares_jax.predictor.config import TrainConfig
    from ares_jax.predictor.data import load_dataset, read_manifest
    from ares_jax.predictor.train import train_head

    cfg = with_overrides(TrainConfig(), args.overrides)
    manifest = read_manifest(args.data)
    provenance = {k: manifest.get(k) for k in ("model", "hidden_size", "n_layers", "tap_layer")}
    provenance["collect"] = manifest.get("config")
    result = train_head(load_dataset(args.data, args.max_shards), cfg, args.out,
                        progress=not args.no_progress, provenance=provenance)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


def _train_prompt_only(args: argparse.Namespace) -> int:
    from ares_jax.predictor.data import load_dataset
    from ares_jax.predictor.prompt_only import PromptOnlyConfig, train_prompt_only

    cfg = with_overrides(PromptOnlyConfig(), args.overrides)
    result = train_prompt_only(load_dataset(args.data, args.max_shards), cfg, args.out,
                               progress=not args.no_progress)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ares_jax.predictor.evaluate import evaluate, format_table, plot_mae

    heads = dict(item.split("=", 1) for item in args.head)
    report = evaluate(args.data, heads=heads, prompt_only=args.prompt_only,
                      split_seed=args.split_seed, max_shards=args.max_shards)
    if args.plot:
        plot_mae(report, args.plot)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(format_table(report))
    return 0
