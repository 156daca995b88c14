"""Serve an in-process ``LLM`` over HTTP: ``python -m ares_jax.frontend [--cluster] ...``.

``add_arguments`` / ``run`` are separate so that the ``ares-jax`` command line can mount them
as a subcommand. On CPU, ``--cluster`` needs virtual devices set before JAX starts, e.g.
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--served-model-name", default=None,
                      help="the id in /v1/models (default: from the checkpoint)")
    http.add_argument("--max-waiting", type=int, default=256,
                      help="queued requests beyond this are answered 429")
    http.add_argument("--log-level", default="info")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help=".gguf, HF directory or ares-jax checkpoint (default: embedded)")
    model.add_argument("--dtype", default=None)
    model.add_argument("--max-num-seqs", type=int, default=64)
    model.add_argument("--max-model-len", type=int, default=None)
    model.add_argument("--no-predictor", action="store_true",
                       help="serve without the length head")
    cluster = parser.add_argument_group("in-process disaggregated cluster")
    cluster.add_argument("--cluster", action="store_true",
                         help="one prefill mesh and N decode meshes on the local devices")
    cluster.add_argument("--policy", default="ares")
    cluster.add_argument("--prefill-devices", type=int, default=2)
    cluster.add_argument("--decode-replicas", type=int, default=3)
    cluster.add_argument("--devices-per-replica", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    from ares_jax import LLM
    from ares_jax.frontend.backend import LoopBackend
    from ares_jax.frontend.server import serve_http

    logging.basicConfig(level=args.log_level.upper())
    kwargs = {}
    if args.cluster:
        from ares_jax.cluster import ClusterConfig

        kwargs["cluster"] = ClusterConfig(
            policy=args.policy, prefill_devices=args.prefill_devices,
            decode_replicas=args.decode_replicas, devices_per_replica=args.devices_per_replica)
    if args.no_predictor:
        kwargs["predictor"] = None
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len, **kwargs)
    with LoopBackend.from_llm(llm, model_name=args.served_model_name,
                              max_waiting=args.max_waiting) as backend:
        serve_http(backend, args.host, args.port, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ares_jax.frontend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
