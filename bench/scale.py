"""Scale benchmark of the cache's state: commit log and duplicate index against the shard count.

    python bench/scale.py --shards 1000 10000 100000 --s3-shards 200 1000 --out bench/results/scale.json

A fabricated state of N committed shards (records like a real shard record: two part files,
moments, counts), on local disk for every N in --shards and on a loopback moto S3 (requests
counted by a proxy) for every N in --s3-shards. For each N it measures
  resume:      a fresh CommitLog's state(): pointer + checkpoint + a tail of --tail entries;
  checkpoint:  compaction of N records plus that tail (what every K commits and finalize cost);
  dup first:   the duplicate check of all N shards' keys (--keys-per-shard each, 0.1% repeated);
  dup resume:  the check of --new-shards more shards against the index of N;
and, on local disk at the largest N, the driver's peak memory during the first duplicate check
(tracemalloc for Python objects, Arrow's pool, and the process RSS above its level before).
"Requests" are HTTP requests on S3, and filesystem calls (reads, writes, listings, deletes) on
local disk. The part files' own key reads (one per part, in the map tasks) are not counted: the
keys here are fabricated from the part's name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa

from latentcache import storage
from latentcache.cache.index import PartRef, check_duplicates
from latentcache.cache.log import CommitLog

KEYS_PER_SHARD = 100
REPEAT_EVERY = 1000  # one key in this many repeats a key of the shard before
FS_CALLS = ("cat_file", "ls", "find", "info", "pipe_file", "mv", "rm", "rm_file", "open")


def shard_record(i: int) -> dict[str, Any]:
    name = f"s{i:07d}"
    files = [{"path": f"data/{name}-{p}.parquet", "rows": 50, "latent_shape": [4, 32, 32]} for p in range(2)]
    return {
        "shard": name,
        "name": name,
        "input": f"s3://corpus/{name}.tar",
        "rows": 100,
        "errors": 0,
        "status": "committed",
        "files": files,
        "moments": {"n": 100, "mean": [0.1, -0.2, 0.3, 0.0], "m2": [1.0, 1.1, 0.9, 1.2]},
    }


def fabricated_keys(path: str) -> list[str]:
    """Keys of the part at `path` ("parts/<shard number>"): unique, but every REPEAT_EVERY-th key
    repeats one of the shard before (a cross-shard duplicate)."""
    shard = int(path.rsplit("/", 1)[1])
    keys = []
    for j in range(KEYS_PER_SHARD):
        n = shard * KEYS_PER_SHARD + j
        keys.append(f"key-{n - KEYS_PER_SHARD if n % REPEAT_EVERY == 0 and shard else n:010d}")
    return keys


def parts(first: int, count: int) -> list[PartRef]:
    return [PartRef(f"s{i:07d}", f"parts/{i}") for i in range(first, first + count)]


# ---- counting -----------------------------------------------------------------------------------


@contextlib.contextmanager
def counting_local_fs() -> Iterator[Counter]:
    """Counts the calls that would be requests on an object store, on fsspec's local filesystem."""
    fs, _ = storage.url_to_fs(tempfile.gettempdir(), {})
    counts: Counter = Counter()
    originals = {name: getattr(fs, name) for name in FS_CALLS}

    def counted(name: str, fn: Callable) -> Callable:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            counts["requests"] += len(path) if isinstance(path, list) else 1
            return fn(path, *args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(fs, name, counted(name, fn))
    try:
        yield counts
    finally:
        for name in originals:
            delattr(fs, name)


@contextlib.contextmanager
def loopback_s3() -> Iterator[tuple[dict, Any]]:
    """A moto S3 server behind a counting proxy; yields (storage options, proxy)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.conftest import free_port
    from tests.faultproxy import FaultProxy

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="scale")
        with FaultProxy(f"http://127.0.0.1:{port}", rate=0.0) as proxy:
            yield {"endpoint_url": proxy.endpoint, "key": "testing", "secret": "testing"}, proxy
    finally:
        server.stop()


def measure(fn: Callable[[], Any], counts: Counter) -> dict[str, float]:
    before = counts["requests"]
    start = time.perf_counter()
    fn()
    return {"seconds": round(time.perf_counter() - start, 3), "requests": counts["requests"] - before}


# ---- the measurements ---------------------------------------------------------------------------


def fill_log(url: str, options: dict, shards: int, tail: int) -> CommitLog:
    """N committed shards in a checkpoint, then `tail` appends of 10 re-committed shards each."""
    log = CommitLog(url=url, storage_options=options)
    for start in range(0, shards, 1000):
        log.append([shard_record(i) for i in range(start, min(start + 1000, shards))])
    log.checkpoint()
    for t in range(tail):
        log.append([shard_record((t * 10 + i) % shards) for i in range(10)])
    return log


def log_rows(url: str, options: dict, shards: int, tail: int, counts: Counter) -> dict[str, Any]:
    fill_log(url, options, shards, tail)
    resumed = CommitLog(url=url, storage_options=options)
    resume = measure(resumed.state, counts)
    assert len(resumed.state()) == shards
    checkpoint = measure(resumed.checkpoint, counts)
    fs, path = storage.url_to_fs(resumed.checkpoint(), options)
    return {"resume": resume, "checkpoint": checkpoint, "checkpoint_bytes": fs.size(path)}


def dup_rows(url: str, options: dict, shards: int, new_shards: int, counts: Counter) -> dict[str, Any]:
    result: dict[str, Any] = {}

    def first() -> None:
        result["first_drops"] = sum(
            map(
                len,
                check_duplicates(
                    url=url, storage_options=options, new=parts(0, shards), read_keys=fabricated_keys
                ).values(),
            )
        )

    def resume() -> None:
        found = check_duplicates(
            url=url, storage_options=options, new=parts(shards, new_shards), read_keys=fabricated_keys
        )
        result["resume_drops"] = sum(map(len, found.values()))

    return {"dup_first": measure(first, counts), "dup_resume": measure(resume, counts), **result}


def start_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            object_store_memory=2 << 30,
        )


def driver_memory(url: str, shards: int) -> dict[str, Any]:
    """Peak driver memory of the first duplicate check over `shards` x KEYS_PER_SHARD keys, on Ray
    (map and reduce run in worker processes: the driver should hold only the parts and the drops)."""
    import psutil

    start_ray()

    process, peak_rss, peak_private = psutil.Process(), [0], [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            info = process.memory_info()
            peak_rss[0] = max(peak_rss[0], info.rss)
            peak_private[0] = max(peak_private[0], info.rss - info.shared)  # less mapped files and shm

    info = process.memory_info()
    rss_before, private_before = info.rss, info.rss - info.shared
    sampler = threading.Thread(target=sample, daemon=True)
    tracemalloc.start()
    sampler.start()
    start = time.perf_counter()
    check_duplicates(url=url, storage_options={}, new=parts(0, shards), read_keys=fabricated_keys)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    start = time.perf_counter()
    check_duplicates(url=url, storage_options={}, new=parts(shards, 100), read_keys=fabricated_keys)
    return {
        "keys": shards * KEYS_PER_SHARD,
        "seconds": round(seconds, 1),
        "resume_100_shards_seconds": round(time.perf_counter() - start, 1),
        "python_peak_mb": round(traced_peak / 2**20, 1),
        "arrow_pool_mb": round(pa.total_allocated_bytes() / 2**20, 1),
        "rss_peak_above_start_mb": round(max(0, peak_rss[0] - rss_before) / 2**20, 1),
        "private_peak_above_start_mb": round(max(0, peak_private[0] - private_before) / 2**20, 1),
    }


def run_local(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    rows = []
    for n in args.shards:
        with counting_local_fs() as counts:
            row = {"store": "local", "shards": n, **log_rows(str(workdir / f"log{n}"), {}, n, args.tail, counts)}
            if n <= args.dup_max_shards:
                row.update(dup_rows(str(workdir / f"index{n}"), {}, n, args.new_shards, counts))
        rows.append(row)
        print_row(row)
    return rows


def run_s3(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with loopback_s3() as (options, proxy):
        for n in args.s3_shards:
            row = {
                "store": "s3",
                "shards": n,
                **log_rows(f"s3://scale/log{n}", options, n, args.tail, proxy.stats),
                **dup_rows(f"s3://scale/index{n}", options, n, args.new_shards, proxy.stats),
            }
            rows.append(row)
            print_row(row)
    return rows


def print_row(row: dict[str, Any]) -> None:
    cells = [f"{row['store']:>5}", f"{row['shards']:>7}"]
    for step in ("resume", "checkpoint", "dup_first", "dup_resume"):
        value = row.get(step)
        cells.append(f"{value['seconds']:>8.2f}s {value['requests']:>6}" if value else f"{'-':>16}")
    print(" | ".join(cells), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="*", default=[1000, 10000, 100000])
    parser.add_argument("--s3-shards", type=int, nargs="*", default=[200, 1000])
    parser.add_argument("--tail", type=int, default=20, help="log entries after the checkpoint at resume")
    parser.add_argument("--new-shards", type=int, default=100, help="shards a resumed run adds to the index")
    parser.add_argument("--dup-max-shards", type=int, default=100000, help="largest local N for the dup check")
    parser.add_argument("--memory-shards", type=int, default=100000, help="N for the memory probe, on Ray (0: skip)")
    parser.add_argument("--ray", action="store_true", help="duplicate check on a local Ray (as a run does)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale.json"))
    args = parser.parse_args(argv)
    if args.ray:
        start_ray()
    print(
        f"{'store':>5} | {'shards':>7} | {'resume s, req':>16} | {'checkpoint':>16} | {'dup first':>16} | "
        f"{'dup resume':>16}"
    )
    with tempfile.TemporaryDirectory(prefix="lc-scale-") as tmp:
        rows = run_local(args, Path(tmp)) + (run_s3(args) if args.s3_shards else [])
        memory = driver_memory(str(Path(tmp) / "memory-index"), args.memory_shards) if args.memory_shards else None
    if memory:
        print(f"duplicate check driver memory at {memory['keys']:,} keys: {memory}")
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "ray": args.ray,
        "keys_per_shard": KEYS_PER_SHARD,
        "tail": args.tail,
        "new_shards": args.new_shards,
        "rows": rows,
        "driver_memory": memory,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
