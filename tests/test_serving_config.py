"""``ares-jax serve --config FILE`` (YAML or JSON): a file gives the same settings as the
flags, flags given on the command line win over it, unknown keys and unknown policies are
refused with a message that names them, and one real ``serve --config`` run (tiny random
model, 1 prefill + 1 decode process) serves with the merged settings and stops cleanly on
SIGTERM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ares_jax.cli import build_parser, main
from ares_jax.cluster import ServingLoop
from ares_jax.engine.decode import DecodeEngine
from ares_jax.engine.prefill import PrefillEngine
from ares_jax.engine.sampling import SamplingParams
from ares_jax.engine.types import EngineConfig, Request
from ares_jax.scheduler.registry import POLICY_NAMES
from ares_jax.serving.cli import apply_config_file, cluster_config, engine_config
from ares_jax.serving.local_cluster import LocalCluster, process_alive

# Settings as a config file writes them: dashes and underscores both accepted.
SETTINGS = {
    "model": "random:tiny",
    "prefill-replicas": 1,
    "decode_replicas": 1,
    "policy": "least-load",
    "dispatch-policy": "static",
    "reschedule-every": 2,
    "page-size": 8,
    "num_pages": 64,
    "max-model-len": 256,
    "max-num-seqs": 8,
    "predictor": "none",
    "log-level": "WARNING",
}
# The same settings as flags.
FLAGS = ["--model", "random:tiny", "--prefill-replicas", "1", "--decode-replicas", "1",
         "--policy", "least-load", "--dispatch-policy", "static", "--reschedule-every", "2",
         "--page-size", "8", "--num-pages", "64", "--max-model-len", "256",
         "--max-num-seqs", "8", "--predictor", "none", "--log-level", "WARNING"]
ECFG = EngineConfig(page_size=8, num_pages=64, max_num_seqs=8, max_model_len=256)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def write(path: Path, data: dict) -> Path:
    if path.suffix in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump(data))
    else:
        path.write_text(json.dumps(data))
    return path


def serve_args(*argv: str):
    """``ares-jax serve ARGV`` parsed, with ``--config`` applied as the command does."""
    argv_list = ["serve", *argv]
    args = build_parser().parse_args(argv_list)
    args.argv = argv_list
    return apply_config_file(args)


def settings(args) -> dict:
    """Everything a serve run is configured by (not where the settings came from)."""
    return {k: v for k, v in vars(args).items() if k not in ("config", "func", "argv", "command")}


# ----------------------------------------------------------------------------- merging


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_gives_the_same_settings_as_flags(tmp_path, suffix):
    from_file = serve_args("--config", str(write(tmp_path / f"serve{suffix}", SETTINGS)))
    from_flags = serve_args(*FLAGS)
    assert settings(from_file) == settings(from_flags)
    assert (from_file.model, from_file.prefill_replicas, from_file.decode_replicas) == \
        ("random:tiny", 1, 1)
    assert engine_config(from_file) == ECFG
    cfg = cluster_config(from_file)
    assert (cfg.policy, cfg.dispatch_policy, cfg.reschedule_every) == \
        ("least-load", "static", 2)


def test_flags_on_the_command_line_win_over_the_file(tmp_path):
    path = str(write(tmp_path / "serve.yaml", SETTINGS))
    args = serve_args("--config", path, "--policy", "llumnix", "--decode-replicas=3",
                      "--page-size", "16")
    assert (args.policy, args.decode_replicas, args.page_size) == ("llumnix", 3, 16)
    # What the command line left alone still comes from the file.
    assert (args.model, args.num_pages, args.dispatch_policy, args.prefill_replicas) == \
        ("random:tiny", 64, "static", 1)
    assert cluster_config(args).policy == "llumnix"


def test_transport_comes_from_the_file_and_an_unknown_one_is_refused(tmp_path):
    args = serve_args("--config", str(write(tmp_path / "s.yaml", {**SETTINGS,
                                                                  "transport": "shm"})))
    assert args.transport == "shm"
    with pytest.raises(ValueError, match=r"transport must be one of \['jax', 'shm', 'none'\]"):
        serve_args("--config", str(write(tmp_path / "bad.yaml", {"transport": "rdma"})))


def test_migration_cap_flag_reaches_the_core_config_and_a_negative_one_is_refused():
    assert cluster_config(serve_args("--model", "random:tiny")).migration.max_starts_per_minute \
        == 0
    cfg = cluster_config(serve_args("--model", "random:tiny", "--max-migrations-per-minute", "6"))
    assert cfg.migration.max_starts_per_minute == 6
    with pytest.raises(ValueError, match="max_starts_per_minute must be >= 0"):
        cluster_config(serve_args("--model", "random:tiny", "--max-migrations-per-minute", "-1"))


def test_without_a_file_the_flag_defaults_stand():
    args = serve_args("--model", "random:tiny")
    assert (args.policy, args.page_size, args.decode_replicas) == ("ares", 16, 2)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_unknown_key_is_refused_naming_it(tmp_path, suffix):
    path = write(tmp_path / f"bad{suffix}", {**SETTINGS, "decode-replica": 2})
    with pytest.raises(ValueError, match=r"bad\.(yaml|json): unknown setting 'decode-replica'"):
        serve_args("--config", str(path))
    # A setting of another serving command is skipped, not refused: one file can configure
    # the scheduler and the replicas of a deployment (the Kubernetes ConfigMap does).
    path = write(tmp_path / f"other{suffix}", {"expect-decode": 2, "policy": "static"})
    args = serve_args("--config", str(path))
    assert args.policy == "static" and not hasattr(args, "expect_decode")


def test_unknown_policy_is_refused_naming_it_and_the_known_ones(tmp_path):
    for argv in (["--policy", "fastest"], ["--dispatch-policy", "fastest"]):
        with pytest.raises(ValueError, match="unknown policy 'fastest'; one of") as err:
            cluster_config(serve_args(*argv))
        assert all(name in str(err.value) for name in POLICY_NAMES)
    path = write(tmp_path / "serve.yaml", {"policy": "fastest"})
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        cluster_config(serve_args("--config", str(path)))
    for name in POLICY_NAMES:
        assert cluster_config(serve_args("--policy", name)).policy == name


def test_serve_refuses_a_bad_policy_or_file_before_starting_anything(tmp_path, monkeypatch):
    """Through the real entry point: the error comes before the scheduler listens or any
    replica process starts (nothing to clean up, no port taken)."""
    started = []
    monkeypatch.setattr("ares_jax.serving.launch.Children.start",
                        lambda *a, **k: started.append(a))
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        main(["serve", "--model", "random:tiny", "--policy", "fastest", "--platform", "cpu"])
    bad = write(tmp_path / "bad.yaml", {"polcy": "static"})
    with pytest.raises(ValueError, match="unknown setting 'polcy'"):
        main(["serve", "--config", str(bad)])
    assert started == []


def test_file_values_get_the_flags_types(tmp_path):
    args = serve_args("--config", str(write(tmp_path / "serve.yaml",
                                            {"log-dir": str(tmp_path / "logs")})))
    assert isinstance(args.log_dir, Path)


def test_flags_given_to_main_win_over_the_file(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("ares_jax.serving.launch.serve", lambda args: seen.append(args) or 0)
    path = write(tmp_path / "serve.yaml", SETTINGS)
    assert main(["serve", "--config", str(path), "--policy", "static"]) == 0
    assert seen[0].policy == "static"


# ----------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``ares-jax serve --config serve.yaml --policy static``: (client, the line it printed
    when ready, replica pids). Stopped with SIGTERM afterwards; nothing may be left behind."""
    tmp = tmp_path_factory.mktemp("serve-config")
    config = write(tmp / "serve.yaml", SETTINGS)
    cluster = LocalCluster(["--config", str(config), "--policy", "static",
                            "--log-dir", str(tmp / "logs")], start_timeout_s=300)
    yield cluster.client, cluster.banner, cluster.pids
    out = cluster.close()  # raises if a replica process outlives it
    assert cluster.proc.returncode == 0, out
    assert "every replica process has exited" in out


def test_serve_runs_with_the_file_settings_and_the_flag_override(served, tiny_model):
    client, ready_line, pids = served
    # Model and replica counts from the file, the policy from the flag.
    assert "serving random:tiny on grpc://" in ready_line, ready_line
    assert "1 prefill + 1 decode replica processes" in ready_line, ready_line
    assert "policy static" in ready_line, ready_line
    stats = client.stats()
    assert stats["ready"]
    assert (stats["policy"], stats["dispatch_policy"]) == ("static", "static")
    assert sorted(r["role"] for r in stats["replicas"]) == ["decode", "prefill"]
    assert len(set(pids)) == 2 and all(process_alive(pid) for pid in pids)
    (decode,) = [r for r in stats["replicas"] if r["role"] == "decode"]
    # Engine settings from the file reached the replica processes (page 0 is scratch).
    assert (decode["page_size"], decode["kv_pages_total"]) == (8, 63), decode
    with pytest.raises(ValueError, match="max_model_len is 256"):
        client.generate([[5] * 300], GREEDY)
    # And it serves: the same greedy tokens as the same engines in this process.
    prompts = [np.random.default_rng(500 + i).integers(4, 500, size=6 + 5 * i).tolist()
               for i in range(3)]
    loop = ServingLoop(PrefillEngine(tiny_model, ECFG), [DecodeEngine(tiny_model, ECFG)], None)
    for i, p in enumerate(prompts):
        loop.add_request(Request(request_id=f"r{i}", prompt_ids=p, params=GREEDY, index=i))
    while loop.has_work:
        loop.step()
    expected = [loop.finished[f"r{i}"].token_ids for i in range(len(prompts))]
    assert [o.token_ids for o in client.generate(prompts, GREEDY)] == expected
