"""Multi-controller replicas: where a group's shape comes from, and a real 2-process CPU group
that forms one global mesh, runs a tensor-parallel forward pass and matches one device."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ares_jax.launch import distributed
from ares_jax.launch.distributed import DistributedSpec, first_slurm_host, resolve

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- resolution


def test_a_lone_process_needs_no_group():
    assert resolve(env={}) is None
    assert resolve("off", coordinator="h:1", num_processes=2, process_id=0, env={}) is None
    # A group of one has nothing to coordinate.
    assert resolve(coordinator="h:1", num_processes=1, process_id=0, env={}) is None


def test_flags_win_over_the_environment():
    env = {"ARES_COORDINATOR": "envhost:9", "ARES_NUM_PROCESSES": "4", "ARES_PROCESS_ID": "3",
           "ARES_LOCAL_DEVICE_IDS": "0,1"}
    assert resolve(env=env) == DistributedSpec(coordinator="envhost:9", num_processes=4,
                                               process_id=3, local_device_ids=(0, 1),
                                               source="flags/env")
    spec = resolve(coordinator="flaghost:7", process_id=1, env=env)
    assert (spec.coordinator, spec.num_processes, spec.process_id) == ("flaghost:7", 4, 1)
    assert not spec.is_leader


def test_a_partial_description_names_what_is_missing():
    with pytest.raises(ValueError, match="--num-processes, --process-id"):
        resolve(coordinator="h:1", env={})
    with pytest.raises(ValueError, match="process_id must be in"):
        resolve(coordinator="h:1", num_processes=2, process_id=2, env={})
    with pytest.raises(ValueError, match="HOST:PORT"):
        resolve(coordinator="nohost", num_processes=2, process_id=0, env={})
    with pytest.raises(ValueError, match="ARES_NUM_PROCESSES"):
        resolve(env={"ARES_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="no slurm environment"):
        resolve("slurm", env={})


@pytest.mark.parametrize("nodelist, first", [
    ("gpu07", "gpu07"), ("gpu[03-05,09],cpu1", "gpu03"), ("a1,b[2-3]", "a1"),
    ("rack[2-3]-n[010-012]", "rack2-n010"), ("n[7,1-2]", "n7"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_slurm_is_opt_in_and_fills_what_flags_leave():
    env = {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "2", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
           "SLURM_STEP_NODELIST": "gpu[10-13]"}
    # gpu_host.sh's replicas inherit SLURM_PROCID: without --distributed slurm it is ignored.
    assert resolve(env=env) is None
    spec = resolve("slurm", env=env)
    port = distributed.slurm_default_port(env)
    assert 49152 <= port < 65536
    assert spec == DistributedSpec(coordinator=f"gpu10:{port}", num_processes=4, process_id=2,
                                   source="slurm")
    spec = resolve("slurm", env={**env, "ARES_COORDINATOR_PORT": "7000"}, num_processes=2,
                   process_id=1)
    assert (spec.coordinator, spec.num_processes, spec.process_id) == ("gpu10:7000", 2, 1)


def test_k8s_statefulset_and_indexed_job():
    sts = {"HOSTNAME": "ares-jax-decode-mh-1", "ARES_NUM_PROCESSES": "2",
           "ARES_COORDINATOR_SERVICE": "ares-jax-decode-mh"}
    spec = resolve("k8s", env=sts)
    assert spec.coordinator == f"ares-jax-decode-mh-0.ares-jax-decode-mh:{8476}"
    assert (spec.num_processes, spec.process_id, spec.source) == (2, 1, "k8s")
    job = {"HOSTNAME": "ares-jax-job-0-abcde", "JOB_COMPLETION_INDEX": "3",
           "ARES_NUM_PROCESSES": "4", "ARES_COORDINATOR": "ares-jax-job-0.svc:8476"}
    assert resolve("k8s", env=job).process_id == 3
    with pytest.raises(ValueError, match="--num-processes"):
        resolve("k8s", env={"HOSTNAME": "x-1", "ARES_COORDINATOR": "x-0.s:1"})


def test_argparse_flags_round_trip():
    import argparse

    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    args = parser.parse_args(["--coordinator", "h:5", "--num-processes", "2", "--process-id",
                              "0", "--local-device-ids", "0,1"])
    spec = distributed.resolve_from_args(args, env={})
    assert spec.is_leader and spec.local_device_ids == (0, 1)
    assert distributed.resolve_from_args(parser.parse_args([]), env={}) is None


# ----------------------------------------------------------------------------- a real group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_form_one_mesh_and_match_one_device(tmp_path):
    from ares_jax.launch.check_distributed import TOKENS_SEED, reference_logits

    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = []
    try:
        for pid in range(2):
            cmd = [sys.executable, "-m", "ares_jax.launch.check_distributed",
                   "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                   "--process-id", str(pid), "--out", str(tmp_path / f"p{pid}.json")]
            # Own session: the cleanup below can kill each process with anything it spawned.
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True))
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    reports = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert [r["process_id"] for r in reports] == [0, 1]
    for r in reports:
        assert r["ok"], r
        assert (r["process_count"], r["global_devices"], r["local_devices"]) == (2, 4, 2)
        assert r["mesh_shape"] == {"data": 1, "model": 4}
        assert r["wq_shard_shape"][2] == 2  # 8 heads over 4 devices: each process holds half
        assert r["broadcast"] == {"op": "step", "n": 3}
    # And against this (single) process: the same numbers, to f32 reduction-order noise.
    tokens = np.random.default_rng(TOKENS_SEED).integers(0, 512, (2, 16)).astype(np.int32)
    want = float(np.sum(reference_logits(tokens).astype(np.float64)))
    for r in reports:
        assert r["logits_checksum"] == pytest.approx(want, abs=1e-3)
