"""Faults with real processes: a driver SIGKILLed mid-run, an encoder worker killed by pid, an
object store that fails a fixed fraction of requests (tests/faultproxy.py), a stale output, and
the safe defaults. Every test ends by checking the cache: each key exactly once, counts that
reconcile, and no partial or orphaned file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from latentcache.cache.layout import META
from latentcache.samples import make_shards, make_vae

from .faultproxy import FaultProxy
from .helpers import encode, errors, manifest, named_files, read_cache

ENCODER_PROCESS = "ray::MapWorker(MapBatches(LatentEncoder))"
# The encode subprocesses start their own small local Ray, never join one running on this machine.
SUBPROCESS_ENV = {
    **os.environ,
    "RAY_ADDRESS": "local",
    "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.01",
    "HF_HUB_OFFLINE": "1",
}


# ---- processes ------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of a live process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[3])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def descendants(root: int) -> list[int]:
    parents = {pid: stat[0] for pid in all_pids() if (stat := proc_stat(pid))}
    found, frontier = [], {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        found += sorted(frontier)
    return found


class EncodeProcess:
    """`python -m latentcache encode` in a session of its own, so that every process it starts
    (its local Ray included) can be found and cleaned up after its driver is SIGKILLed."""

    def __init__(self, log: Path, env: dict[str, str] | None = None, **flags: object) -> None:
        argv = [sys.executable, "-m", "latentcache", "encode", "--quiet"]
        for name, value in flags.items():
            argv += ["--" + name.replace("_", "-"), str(value)]
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                env={**SUBPROCESS_ENV, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_for(self, condition, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert self.proc.poll() is None, (
                f"encode exited ({self.proc.returncode}) early:\n{self.log.read_text()[-3000:]}"
            )
            assert time.time() < deadline, "timed out waiting for the run"
            time.sleep(0.1)

    def kill_driver(self) -> None:
        """SIGKILL the driver only (what a preemption does), then reap what it had started."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.time() + 20
        while self.session() and time.time() < deadline:
            time.sleep(0.5)  # Ray's own processes notice the dead driver and exit
        for pid in self.session():
            os.kill(pid, signal.SIGKILL)

    def session(self) -> list[int]:
        return [pid for pid in all_pids() if (stat := proc_stat(pid)) and stat[1] == self.proc.pid]

    def finish(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            for pid in self.session():
                os.kill(pid, signal.SIGKILL)


# ---- what a finished cache must satisfy -----------------------------------------------------


def assert_exactly_once(out: Path, keys: set[str]) -> dict:
    m = manifest(out)
    assert m["complete"] and not m["failed_shards"]
    cached = read_cache(out).column("key").to_pylist()
    assert sorted(cached) == sorted(keys), "every key exactly once"
    c = m["counts"]
    assert (
        c["input"] == c["written"] + c["failed"] and c["written"] == len(keys) and c["failed"] == errors(out).num_rows
    )
    assert_no_leftovers(out, m)
    return m


def assert_no_leftovers(out: Path, m: dict) -> None:
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert not [f for f in files if Path(f).name.startswith(".tmp-")], "partial files left"
    assert not [f for f in files if not f.startswith(("data/", META))], "files outside data/ and the metadata folder"
    stored = {f for f in files if f.startswith(("data/", f"{META}/errors/"))}
    assert stored == named_files(out), "orphaned or missing data/error files"


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> list[Path]:
    return make_shards(tmp_path_factory.mktemp("rel-shards"), shards=4, per_shard=6, size=(64, 64))


def shard_keys(shards: list[Path], per_shard: int = 6) -> set[str]:
    return {f"{s:05d}{i:04d}" for s in range(len(shards)) for i in range(per_shard)}


# ---- 1. the driver killed at any point ------------------------------------------------------


def test_driver_sigkilled_twice_then_resume_is_exactly_once(small_shards, kl_model, tmp_path):
    out = tmp_path / "out"
    flags = dict(
        input=small_shards[0].parent / "shard-{00000..00003}.tar",
        output=out,
        model=kl_model,
        resolution=64,
        batch_size=2,
        store_dtype="fp32",
    )
    log = tmp_path / "encode.log"

    early = EncodeProcess(log, **flags)  # very early: the output is claimed, no shard started
    early.wait_for(lambda: (out / META / "run.json").exists())
    early.kill_driver()

    mid = EncodeProcess(log, **flags)  # mid-run: right after the first shards are committed
    mid.wait_for(lambda: bool(committed_entries(out)))
    mid.kill_driver()
    assert not (out / META / "manifest.json").exists(), "the kill must land before the run ends"
    visible = {p: (out / p).stat().st_mtime_ns for p in committed_parts(out)}
    assert visible

    assert EncodeProcess(log, **flags).finish() == 0, log.read_text()[-3000:]
    m = assert_exactly_once(out, shard_keys(small_shards))
    assert len(m["shards"]) == 4
    for path, mtime in visible.items():  # resumed: what was committed before the kill was not redone
        assert (out / path).stat().st_mtime_ns == mtime


def committed_entries(out: Path) -> list[dict]:
    """The commit log's entries that commit shards (what a reader could see so far)."""
    entries = []
    for path in sorted((out / META / "log" / "log").glob("*.json")):
        try:
            entries.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return [e for e in entries if e.get("kind") == "commit"]


def committed_parts(out: Path) -> set[str]:
    return {p["path"] for e in committed_entries(out) for r in e["records"] for p in r.get("parts", [])}


# ---- 2. an encoder worker process killed mid-run --------------------------------------------


@pytest.fixture(scope="module")
def worker_fault_run(ray_session, small_shards, kl_model, tmp_path_factory):
    """One encode during which the encoder actor's process is SIGKILLed once it has encoded a batch."""
    out = tmp_path_factory.mktemp("worker-fault") / "out"
    killed: dict[str, object] = {}

    def kill_encoder_once_busy() -> None:
        while not killed and not (out / META / "manifest.json").exists():
            busy = (out / "data").exists() and any(p.is_file() for p in (out / "data").rglob("*"))
            encoders = [pid for pid in descendants(os.getpid()) if cmdline(pid).startswith(ENCODER_PROCESS)]
            if busy and encoders:
                os.kill(encoders[0], signal.SIGKILL)
                killed.update(pid=encoders[0], run_finished=(out / META / "manifest.json").exists())
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_encoder_once_busy, daemon=True)
    watcher.start()
    rc = encode(
        input=small_shards[0].parent / "shard-{00000..00003}.tar",
        output=out,
        model=kl_model,
        resolution=64,
        batch_size=2,
        store_dtype="fp32",
    )
    watcher.join(5)
    return out, rc, killed


def test_encoder_worker_killed_mid_run_is_replaced(worker_fault_run, small_shards):
    out, rc, killed = worker_fault_run
    assert killed.get("pid") and killed["run_finished"] is False, "the encoder was killed mid-run"
    assert proc_stat(killed["pid"]) is None
    assert rc == 0
    assert_exactly_once(out, shard_keys(small_shards))


# ---- 3. stale output, and the safe defaults -------------------------------------------------


def test_stale_output_refused_unless_overwrite(worker_fault_run, small_shards, kl_model, tmp_path, capsys):
    from latentcache.models import weights_sha256

    out = worker_fault_run[0]
    other = make_vae(tmp_path / "other-vae", seed=1)
    flags = dict(input=small_shards[0], output=out, store_dtype="fp32")
    capsys.readouterr()
    for model, resolution, differs in ((other, 64, "model_sha256"), (kl_model, 32, "preprocess")):
        assert encode(model=model, resolution=resolution, **flags) == 2
        err = capsys.readouterr().err.strip()
        assert f"different {differs}" in err and "--overwrite" in err and "\n" not in err
    assert_exactly_once(out, shard_keys(small_shards))  # refused runs changed nothing
    assert encode(model=other, resolution=64, overwrite=True, **flags) == 0
    m = assert_exactly_once(out, {k for k in shard_keys(small_shards) if k.startswith("00000")})
    assert m["model_sha256"] == weights_sha256(str(other)) and len(m["shards"]) == 1


def test_pickle_checkpoints_refused_unless_allowed(tmp_path, small_shards, capsys):
    import torch
    from diffusers import AutoencoderKL

    folder = make_vae(tmp_path / "vae")
    AutoencoderKL.from_pretrained(folder).save_pretrained(tmp_path / "pickled", safe_serialization=False)
    torch.save(AutoencoderKL.from_pretrained(folder).state_dict(), tmp_path / "vae.ckpt")
    for model in (tmp_path / "pickled", tmp_path / "vae.ckpt"):
        assert encode(input=small_shards[0], output=tmp_path / "out", model=model, resolution=64) == 2
        assert "pickle" in capsys.readouterr().err
    assert not (tmp_path / "out" / META).exists()


# ---- 4. object-store faults ----------------------------------------------------------------


MANIFEST = f"cache/{META}/manifest.json"


def s3_objects(bucket: str, endpoint: str, prefix: str) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=endpoint)
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def test_storage_faults_are_retried_and_a_failing_shard_is_reported(
    ray_session, s3, s3_server, small_shards, kl_model, tmp_path, capsys
):
    bucket, options = s3
    client = boto3.client("s3", endpoint_url=s3_server)
    for path in small_shards[:3]:
        client.upload_file(str(path), bucket, f"in/{path.name}")
    with FaultProxy(s3_server, rate=0.25, seed=3) as proxy:
        # botocore's own retries off, so that the faults reach latentcache's retries
        faulty = {**options, "endpoint_url": proxy.endpoint, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
        flags = dict(
            input=f"s3://{bucket}/in/shard-{{00000..00002}}.tar",
            output=f"s3://{bucket}/cache",
            model=kl_model,
            resolution=64,
            batch_size=4,
            storage_options=faulty,
        )
        proxy.outage.add("/in/shard-00001.tar")  # this shard's object fails every time
        assert encode(**flags) == 3
        first = json.loads(s3_objects(bucket, s3_server, MANIFEST)[MANIFEST])
        assert not first["complete"] and list(first["failed_shards"]) == [f"s3://{bucket}/in/shard-00001.tar"]
        assert "read failed" in first["failed_shards"][f"s3://{bucket}/in/shard-00001.tar"]
        assert first["counts"]["written"] == 12 and first["counts"]["input"] == 12
        assert "INCOMPLETE" in capsys.readouterr().out

        proxy.outage.clear()  # the fault clears: a rerun completes the missing shard only
        assert encode(**flags) == 0
        faults = {k: v for k, v in proxy.stats.items() if k not in ("requests", "outage")}
    objects = s3_objects(bucket, s3_server, "cache/")
    m = json.loads(objects[MANIFEST])
    assert m["complete"] and not m["failed_shards"] and m["committed_shards"] == 3
    local = tmp_path / "copy"
    for key, data in objects.items():
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(data)
    assert_exactly_once(local / "cache", {k for k in shard_keys(small_shards) if not k.startswith("00003")})
    assert sum(faults.values()) >= 10 and len(faults) >= 3, faults  # the faults really happened
    secret = options["secret"].encode()
    assert not any(secret in data for data in objects.values()), "a secret was written to the cache"
    captured = capsys.readouterr()
    assert options["secret"] not in captured.out + captured.err


# ---- 5. SIGKILL at each step of the commit protocol -----------------------------------------

CRASH_STEPS = ["part-written", "committed", "duplicates-copied", "duplicates-logged", "run-ended", "checkpoint"]


@pytest.fixture(scope="module")
def overlapping_shards(tmp_path_factory) -> tuple[Path, set[str]]:
    """Three tiny shards; the third repeats a key of the first, so duplicate settlement has work."""
    import numpy as np

    from latentcache.samples import write_tar

    from .helpers import png_bytes

    folder = tmp_path_factory.mktemp("crash-shards")
    rng = np.random.default_rng(0)
    for s, keys in enumerate([["k0", "k1"], ["k2", "k3"], ["k0", "k4"]]):
        write_tar(
            folder / f"shard-{s:05d}.tar",
            [(f"{k}.png", png_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))) for k in keys],
        )
    return folder / "shard-{00000..00002}.tar", {f"k{i}" for i in range(5)}


def visible_files(out: Path) -> dict[str, bytes]:
    """What a reader could see at this moment: the files the committed records name, with their bytes."""
    from latentcache.cache.log import CommitLog
    from latentcache.cache.records import committed

    records = committed(CommitLog(url=str(out / META / "log"), storage_options={}).state())
    paths = {p["path"] for r in records for p in r["parts"]} | {e for r in records for e in r.get("errors", [])}
    return {p: (out / p).read_bytes() for p in paths}


def test_driver_sigkilled_at_each_protocol_step_in_turn_then_rerun_is_exactly_once(
    overlapping_shards, ray_session, kl_model, tmp_path
):
    """One cache, killed once at every step of the protocol in order, each kill landing in the rerun
    that recovers from the one before; the clean rerun after the last is exactly once. A file a
    reader could see after any kill is never rewritten afterwards (it may be deleted)."""
    source, keys = overlapping_shards
    out, log = tmp_path / "out", tmp_path / "encode.log"
    flags = dict(input=source, output=out, model=kl_model, resolution=32, store_dtype="fp32")
    seen: dict[str, bytes] = {}
    for step in CRASH_STEPS:
        crashed = EncodeProcess(log, env={"LATENTCACHE_CRASH_AT": step}, **flags)
        assert crashed.finish() == -signal.SIGKILL, f"no kill at {step}:\n{log.read_text()[-3000:]}"
        for path, data in visible_files(out).items():
            assert seen.setdefault(path, data) == data, f"{path} rewritten after the kill at {step}"
    assert encode(**flags) == 0
    m = assert_exactly_once(out, keys)
    assert m["duplicates"] == 1 and errors(out).column("key").to_pylist() == ["k0"]
    for path, data in seen.items():
        assert not (out / path).exists() or (out / path).read_bytes() == data, path
