"""Cluster runs: `ray job submit` of jobs/encode.py to a `ray start --head` node, and a two-node
cluster where only one node has a (logical) GPU.

Both clusters must never touch other Ray sessions on this machine:
- each gets a private temp dir (`--temp-dir` and RAY_TMPDIR: the "latest cluster" address file
  that a plain `ray.init()` joins lives there, not in /tmp/ray), explicit free ports, and its own
  auth token file (RAY_AUTH_TOKEN_PATH), so ~/.ray/auth_token is neither read nor written;
- teardown kills only what this test started: the `ray start --block` process group, then any
  process whose command line names the private temp dir. `ray stop` is not used: it stops every
  Ray process on the machine, whoever started it.
The two-node cluster runs in a subprocess (tests/_cluster_two_nodes.py) because
`ray.cluster_utils.Cluster` cannot share a process with the session fixture's local Ray.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from latentcache.samples import make_shards

from .helpers import manifest, read_cache

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def private_ray_env(temp_dir: Path) -> dict[str, str]:
    """Token auth on, with a token only this cluster and its clients know."""
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    return {
        **env,
        "RAY_TMPDIR": str(temp_dir),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "HF_HUB_OFFLINE": "1",
    }


def kill_processes_under(temp_dir: Path, group: int | None) -> list[int]:
    """Kills the process group we started, then every process naming our private temp dir."""
    if group is not None:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            mine = str(temp_dir).encode() in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid()
        except OSError:
            continue
        if mine:
            try:
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
                killed.append(int(cmdline.parent.name))
            except ProcessLookupError:
                pass
    return killed


@pytest.fixture()
def private_dir() -> Iterator[Path]:
    # Short and under /tmp: Ray's Unix socket paths under it must stay below 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="lc-ray-", dir="/tmp"))
    yield path
    kill_processes_under(path, None)
    shutil.rmtree(path, ignore_errors=True)


def wait_for_dashboard(url: str, token: str, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(1.0)
    raise TimeoutError(f"the head node's dashboard did not answer at {url}")


@pytest.fixture()
def head_node(private_dir) -> Iterator[tuple[str, dict[str, str], Path]]:
    """`ray start --head --block` on free ports; yields (dashboard URL, client env, temp dir)."""
    env = private_ray_env(private_dir)
    gcs, node_manager, object_manager, client, dashboard, agent, agent_grpc, runtime_env, metrics = free_ports(9)
    command = [
        RAY,
        "start",
        "--head",
        "--block",
        "--temp-dir",
        str(private_dir),
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--node-manager-port",
        str(node_manager),
        "--object-manager-port",
        str(object_manager),
        "--ray-client-server-port",
        str(client),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(runtime_env),
        "--metrics-export-port",
        str(metrics),
        "--min-worker-port",
        "0",
        "--max-worker-port",
        "0",  # workers: ports the OS picks
        "--num-cpus",
        "2",
        "--object-store-memory",
        str(300 << 20),
        "--include-dashboard",
        "true",
        "--disable-usage-stats",
    ]
    with open(private_dir / "ray-start.log", "wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard}"
        wait_for_dashboard(url, Path(env["RAY_AUTH_TOKEN_PATH"]).read_text(), proc)
        yield url, env, private_dir
    finally:
        proc.terminate()  # `ray start --block` stops the node's processes on SIGTERM
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        kill_processes_under(private_dir, proc.pid)


def job_info(url: str, token: str, job_id: str) -> dict:
    """The job's record from the Jobs REST API (what `ray job status` prints)."""
    request = urllib.request.Request(f"{url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def uploaded_package(temp_dir: Path) -> Path:
    packages = [p for p in temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert len(packages) == 1, packages
    return packages[0]


def test_ray_job_submit_runs_jobs_encode_on_the_cluster(head_node, shards, kl_model, tmp_path):
    url, env, temp_dir = head_node
    out = tmp_path / "cache"
    job_id = f"latentcache-test-{uuid.uuid4().hex[:8]}"
    # What a user types (README), with absolute paths: relative ones would resolve inside the
    # uploaded working directory.
    submit = [
        RAY,
        "job",
        "submit",
        "--address",
        url,
        "--working-dir",
        str(ROOT),
        "--submission-id",
        job_id,
        "--",
        sys.executable,
        "jobs/encode.py",
        "--config",
        "configs/local.yaml",
        "--quiet",
        "--input",
        str(shards[0].parent / "shard-{00000..00001}.tar"),
        "--output",
        str(out),
        "--model",
        str(kl_model),
        "--resolution",
        "64",
        "--batch-size",
        "4",
    ]
    result = subprocess.run(submit, env=env, cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert job_info(url, Path(env["RAY_AUTH_TOKEN_PATH"]).read_text(), job_id)["status"] == "SUCCEEDED"
    assert "2/2 shards committed, 12 written" in result.stdout  # the job's own summary, tailed by submit
    m = manifest(out)
    assert m["complete"] and m["counts"]["written"] == 12 and read_cache(out).num_rows == 12
    package = uploaded_package(temp_dir)
    files = [p for p in package.rglob("*") if p.is_file()]
    assert (package / "jobs" / "encode.py").is_file() and (package / "latentcache" / "pipeline.py").is_file()
    assert not (package / ".venv").exists() and not (package / ".git").exists()
    assert sum(p.stat().st_size for p in files) < 20 << 20  # sources only, not the environment
    # Token auth stays on: a client without RAY_AUTH_MODE=token sends no token and is refused.
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run(
        [RAY, "job", "list", "--address", url], env=no_token, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()


def run_cluster_script(module: str, private_dir: Path, *args: str) -> dict:
    """Runs a tests._cluster_* script (its own ray.cluster_utils.Cluster under private_dir) as a
    subprocess, reaps every process it left, and returns the JSON of its last stdout line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env=private_ray_env(private_dir),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=540)
    finally:
        kill_processes_under(private_dir, proc.pid)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_two_nodes_encoders_only_on_the_gpu_node_decoding_on_both(private_dir, kl_model, tmp_path):
    make_shards(tmp_path / "shards", shards=4, per_shard=4, size=(80, 96))
    out = tmp_path / "cache"
    run = run_cluster_script(
        "tests._cluster_two_nodes",
        private_dir,
        str(tmp_path / "shards" / "shard-{00000..00003}.tar"),
        str(out),
        str(kl_model),
    )
    assert run["status"] == 0
    assert run["encoders"] == 1 and run["encoder_nodes"] == [run["gpu_node"]]  # one encoder per GPU
    assert run["decode_nodes"] == sorted([run["head_node"], run["gpu_node"]])
    m = manifest(out)
    assert m["complete"] and m["counts"] == {**m["counts"], "input": 16, "written": 16, "failed": 0}


def test_placement_on_a_cpu_only_cluster_and_the_num_encoders_override(ray_session):
    from latentcache.config import EncodeConfig
    from latentcache.pipeline import plan_placement

    cpu = plan_placement(EncodeConfig(input="x.tar", output="out", model="vae"))
    assert (cpu.num_encoders, cpu.encoder_gpus) == (1, 0.0)  # no GPU in the session's local Ray
    assert cpu.encoder_cpus == 0.0  # on CPU its threads share every core with decoding
    assert cpu.writers == 1  # claiming no CPU, capped at one per encoder
    assert plan_placement(EncodeConfig(input="x.tar", output="out", model="vae", encoder_cpus=1)).encoder_cpus == 1
    assert plan_placement(EncodeConfig(input="x.tar", output="out", model="vae", num_encoders=2)).num_encoders == 2
