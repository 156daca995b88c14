"""``ares-jax serve`` (a whole cluster on this host), ``ares-jax scheduler`` and
``ares-jax replica`` (one process each, for multi-host deployments).

Every flag can also come from ``--config FILE`` (JSON or YAML, keys as the flag names with
dashes or underscores); flags given on the command line win.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from pathlib import Path

# KV transports between replica processes (serving/transport.make_transport); jax is not
# imported here, so the names are listed rather than taken from that module.
TRANSPORTS = ("jax", "shm", "none")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="JSON or YAML file with defaults for these flags")
    p.add_argument("--model", default=None,
                   help="a .gguf file, an HF or ares-jax checkpoint directory, 'embedded' "
                        "(default: SmolLM2-135M-Instruct) or random:tiny|small (tests)")
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: f32 on CPU, "
                                                 "bf16 on GPU/TPU)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-pages", type=int, default=None, help="KV pages per decode mesh")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--predictor", default="default",
                   help="the length head: default (packaged, embedded model only), none, or "
                        "a head checkpoint directory")
    p.add_argument("--log-level", default="INFO")


def _scheduler_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="ares",
                   help="static | least-load | llumnix | ares | ares-oracle")
    p.add_argument("--dispatch-policy", default=None,
                   help="dispatch by another policy than the one that migrates")
    p.add_argument("--reschedule-every", type=int, default=4,
                   help="scheduler iterations between rescheduling rounds")
    p.add_argument("--max-migrations-per-minute", type=int, default=0,
                   help="start at most this many migrations per 60 s (0: no cap); the "
                        "policy's other moves are dropped and counted (migrations_capped)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--port", type=int, default=None,
                   help="HTTP port of the OpenAI-compatible front door (off when not given)")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="requests allowed to wait; past it new ones are refused at once")
    p.add_argument("--replica-timeout", type=float, default=5.0,
                   help="seconds without a heartbeat (sent every 0.5 s) after which a replica "
                        "process is declared dead and its requests recomputed elsewhere; "
                        "replicas drop what they hold after twice this without a scheduler")


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="start a scheduler and replica processes on this host",
                           description=__doc__)
    _common(serve)
    _scheduler_flags(serve)
    serve.add_argument("--prefill-replicas", type=int, default=1)
    serve.add_argument("--decode-replicas", type=int, default=2)
    serve.add_argument("--devices-per-replica", type=int, default=1)
    serve.add_argument("--platform", default="auto", choices=("auto", "cpu", "gpu"),
                       help="gpu: one CUDA_VISIBLE_DEVICES slice per replica process")
    serve.add_argument("--transport", default="jax", choices=TRANSPORTS,
                       help="KV between replica processes: jax (jax.experimental.transfer "
                            "over TCP), shm (/dev/shm segments: one host only), none")
    serve.add_argument("--log-dir", type=Path, default=None,
                       help="where replica processes write their logs (default: a temp dir)")
    serve.add_argument("--ready-timeout", type=float, default=600.0)
    serve.set_defaults(func=_run_serve)

    sched = sub.add_parser("scheduler", help="run the scheduler process (multi-host)")
    _common(sched)
    _scheduler_flags(sched)
    sched.add_argument("--expect-prefill", type=int, default=1,
                       help="prefill replicas (meshes) to wait for before serving")
    sched.add_argument("--expect-decode", type=int, default=2)
    sched.add_argument("--expect-replicas", type=int, default=None,
                       help="instead: this many replicas of any role (at least one of each)")
    sched.set_defaults(func=_run_scheduler, host="0.0.0.0")

    rep = sub.add_parser("replica", help="run one replica process (one or more meshes)")
    _common(rep)
    rep.add_argument("--role", default="decode", choices=("prefill", "decode"))
    rep.add_argument("--roles", default=None,
                     help="one role per mesh, e.g. prefill,decode,decode (overrides --role "
                          "and --meshes)")
    rep.add_argument("--meshes", type=int, default=1, help="meshes this process hosts")
    rep.add_argument("--devices-per-replica", type=int, default=1, help="devices per mesh")
    rep.add_argument("--scheduler", required=True, help="HOST:PORT of the scheduler")
    rep.add_argument("--host", default="0.0.0.0")
    rep.add_argument("--grpc-port", type=int, default=0, help="0: any free port")
    rep.add_argument("--advertise-host", default=None,
                     help="the address others reach this process at, for gRPC and the KV "
                          "transfer server (default: --host, or 127.0.0.1 for 0.0.0.0)")
    rep.add_argument("--transport", default="jax", choices=TRANSPORTS,
                     help="KV to and from other processes: jax (any host), shm (processes of "
                          "this host only; every replica must use the same), none (a "
                          "multi-controller group has none)")
    from ares_jax.launch import distributed

    distributed.add_arguments(rep)
    rep.set_defaults(func=_run_replica)
    for name, p in (("serve", serve), ("scheduler", sched), ("replica", rep)):
        _PARSERS[name] = p
        _ALL_SETTINGS.update(a.dest for a in p._actions if a.dest not in _NOT_SETTINGS)


# Settings of any serving command: one config file can feed them all (a setting another
# command uses is skipped; one that none uses is refused).
_PARSERS: dict[str, argparse.ArgumentParser] = {}
_ALL_SETTINGS: set[str] = set()
_NOT_SETTINGS = {"help", "func", "command", "config", "argv"}


def apply_config_file(args: argparse.Namespace) -> argparse.Namespace:
    """Re-parse the command line with ``--config``'s values as defaults: flags given on the
    command line win, and file values get the flags' types and choices."""
    if getattr(args, "config", None) is None:
        return args
    path = Path(args.config)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    parser = _PARSERS[args.command]
    actions = {a.dest: a for a in parser._actions if a.dest not in _NOT_SETTINGS}
    defaults = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        action = actions.get(name)
        if action is None:
            if name in _ALL_SETTINGS:
                continue  # a setting of another serving command
            raise ValueError(f"{path}: unknown setting {key!r} for 'ares-jax {args.command}'")
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"{path}: {key} must be one of {list(action.choices)}, got "
                             f"{value!r}")
        # argparse converts string defaults with the flag's type; other values pass as they are.
        defaults[name] = str(value) if action.type is not None and not isinstance(
            value, str) and not isinstance(value, bool) else value
    parser.set_defaults(**defaults)
    return parser.parse_args(list(getattr(args, "argv", []))[1:])


def engine_config(args: argparse.Namespace):
    from ares_jax.engine.types import EngineConfig

    return EngineConfig(page_size=args.page_size, num_pages=args.num_pages,
                        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)


def cluster_config(args: argparse.Namespace):
    from ares_jax.cluster.config import ClusterConfig
    from ares_jax.cluster.migration import MigrationConfig
    from ares_jax.scheduler.registry import POLICY_NAMES

    for name in (args.policy, args.dispatch_policy):
        if name is not None and name not in POLICY_NAMES:
            raise ValueError(f"unknown policy {name!r}; one of {', '.join(POLICY_NAMES)}")
    return ClusterConfig(policy=args.policy, dispatch_policy=args.dispatch_policy,
                         reschedule_every=args.reschedule_every,
                         migration=MigrationConfig(
                             max_starts_per_minute=args.max_migrations_per_minute))


def _logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _run_serve(args: argparse.Namespace) -> int:
    from ares_jax.serving.launch import serve

    args = apply_config_file(args)
    _logging(args)
    return serve(args)


def _run_scheduler(args: argparse.Namespace) -> int:
    from ares_jax.serving.launch import run_scheduler

    args = apply_config_file(args)
    _logging(args)
    return run_scheduler(args)


def _run_replica(args: argparse.Namespace) -> int:
    args = apply_config_file(args)
    _logging(args)
    roles = args.roles.split(",") if args.roles else [args.role] * args.meshes
    need = len(roles) * args.devices_per_replica
    from ares_jax.launch import distributed

    group = distributed.resolve_from_args(args)
    if group is not None:  # each mesh spans the group: this process holds its share of each
        from ares_jax.serving.multihost import local_devices_needed

        need = local_devices_needed(args.devices_per_replica, len(roles), group.num_processes)
    # JAX reads the device count when its backend starts, i.e. at the first jax.devices().
    flags = os.environ.get("XLA_FLAGS", "")
    if need > 1 and "xla_force_host_platform_device_count" not in flags and \
            os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={need}"
    from ares_jax.serving.launch import run_replica

    return run_replica(args, roles, group)


def install_stop_handlers(stop) -> None:
    """SIGINT and SIGTERM set ``stop`` (a threading.Event) instead of raising."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
