"""The commit log: records in order, checkpoints a user can read, resume, kills, request counts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latentcache.cache.log import CommitLog, LogError
from tests.faultproxy import FaultProxy

ROOT = Path(__file__).resolve().parents[1]


def record(shard: str, rows: int, **extra) -> dict:
    files = [{"path": f"data/{shard}-{i}.parquet", "rows": rows, "latent_shape": [4, 8, 8]} for i in range(2)]
    return {"shard": shard, "rows": rows, "files": files, "moments": {"n": rows, "mean": [0.5, -1.0]}, **extra}


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_later_records_win_across_checkpoints_and_resume(tmp_path):
    log = CommitLog(url=str(tmp_path / "log"), storage_options={})
    for i in range(12):  # past 9 -> 10, where unpadded names would list out of order
        log.append([record(f"s{i % 5}", rows=i), record(f"t{i}", rows=1)])
        if i == 6:
            log.checkpoint()
    expected = {
        **{f"s{i % 5}": record(f"s{i % 5}", rows=i) for i in range(12)},
        **{f"t{i}": record(f"t{i}", rows=1) for i in range(12)},
    }
    assert log.state() == expected
    assert CommitLog(url=str(tmp_path / "log"), storage_options={}).state() == expected
    log.checkpoint()
    resumed = CommitLog(url=str(tmp_path / "log"), storage_options={})
    assert resumed.state() == expected and resumed.pending() == 0


def test_checkpoint_is_one_row_per_shard_a_user_can_read(tmp_path):
    log = CommitLog(url=str(tmp_path / "log"), storage_options={})
    log.append([record("b", 3, status="ok"), record("a", 2, note=None, score=1)])
    log.append([record("a", 5, score=2.5)])  # int then float: stored as JSON text, read back exactly
    table = pq.read_table(log.checkpoint())
    assert table["shard"].to_pylist() == ["a", "b"]
    assert table["rows"].type == pa.int64() and table["rows"].to_pylist() == [5, 3]
    assert json.loads(table["files"][0].as_py())[0]["latent_shape"] == [4, 8, 8]
    state = CommitLog(url=str(tmp_path / "log"), storage_options={}).state()
    assert state["a"] == record("a", 5, score=2.5) and state["b"] == record("b", 3, status="ok")
    assert "note" not in log.state()["a"]  # a null value and an absent key are the same


def test_a_schema_shapes_the_checkpoint_and_refuses_unknown_fields(tmp_path):
    file_type = pa.struct([("path", pa.string()), ("rows", pa.int64()), ("latent_shape", pa.list_(pa.int64()))])
    schema = pa.schema(
        [("shard", pa.string()), ("rows", pa.int64()), ("files", pa.list_(file_type)), ("error", pa.string())]
    )
    log = CommitLog(url=str(tmp_path / "log"), storage_options={}, schema=schema)
    log.append([{"shard": "a", "rows": 2, "files": [{"path": "p", "rows": 2, "latent_shape": [4, 2, 2]}]}])
    before = log.state()
    assert before["a"]["error"] is None
    assert pq.read_table(log.checkpoint()).schema.names == schema.names
    assert CommitLog(url=str(tmp_path / "log"), storage_options={}, schema=schema).state() == before
    with pytest.raises(LogError, match="lacks"):
        log.append([{"shard": "b", "rows": 1, "typo": 1}])
    with pytest.raises(LogError, match="shard"):
        log.append([{"rows": 1}])
    with pytest.raises(LogError, match="shard"):
        CommitLog(url=str(tmp_path / "other"), storage_options={}, schema=pa.schema([("rows", pa.int64())]))


def test_runs_begin_end_and_unclean_survive_compaction(tmp_path):
    url = str(tmp_path / "log")
    log = CommitLog(url=url, storage_options={})
    assert not log.unclean() and log.last_run() is None
    log.begin_run({"run": 1})
    log.append([record("a", 1)])
    log.checkpoint()
    assert CommitLog(url=url, storage_options={}).unclean()
    log.end_run({"written": 1})
    assert not CommitLog(url=url, storage_options={}).unclean()  # the end is in the tail
    log.checkpoint()
    resumed = CommitLog(url=url, storage_options={})
    assert not resumed.unclean() and resumed.last_run() == {"begin": {"run": 1}, "end": {"written": 1}}
    resumed.begin_run({"run": 2})
    assert CommitLog(url=url, storage_options={}).unclean()


def test_nothing_new_writes_nothing_and_strays_are_ignored_then_removed(tmp_path):
    root = tmp_path / "log"
    log = CommitLog(url=str(root), storage_options={})
    for i in range(3):
        log.append([record(f"s{i}", i)])
    first = log.checkpoint()
    listing = files_under(root)
    log.append([])
    assert log.checkpoint() == first and files_under(root) == listing
    # What kills leave: a checkpoint no pointer names, a compacted entry, a half-written local file.
    (root / "checkpoints" / "00000000000000000099-deadbeef.parquet").write_bytes(b"half")
    (root / "log" / "00000000000000000001.json").write_text(
        json.dumps({"seq": 1, "kind": "commit", "records": [record("s0", 77)]})
    )
    (root / "log" / ".tmp-abc-00000000000000000005.json").write_text("{")
    resumed = CommitLog(url=str(root), storage_options={})
    assert resumed.state() == log.state()
    resumed.append([record("s9", 9)])
    resumed.checkpoint()
    assert [p for p in files_under(root) if "tmp" in p or "deadbeef" in p or p.startswith("log/")] == []


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from latentcache import storage
    from latentcache.cache.log import CommitLog

    writes, kill_at = 0, int(sys.argv[2])
    real_write = storage.write_bytes

    def write_then_maybe_die(url, data, options=None):
        global writes
        writes += 1
        if writes == kill_at:  # half-way through the write: a temporary file, nothing published
            folder = os.path.dirname(url)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, ".tmp-killed"), "wb") as f:
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(url, data, options)

    storage.write_bytes = write_then_maybe_die
    log = CommitLog(url=sys.argv[1], storage_options={})
    log.begin_run({"run": 1})
    for i in range(6):
        log.append([{"shard": f"s{i % 4}", "rows": i, "files": [{"path": f"p{i}"}]}])
        print(i, flush=True)
        if i % 2 == 1:
            log.checkpoint()
    log.end_run({"ok": True})
    log.checkpoint()
""")


@pytest.mark.parametrize("kill_at", range(1, 18))
def test_a_sigkill_at_any_write_loses_only_the_unfinished_append(tmp_path, kill_at):
    """Writes: begin, then (append, append, checkpoint file, pointer) x3, end, checkpoint, pointer;
    kill_at 17: no kill."""
    url = str(tmp_path / "log")
    child = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, url, str(kill_at)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    done = [int(line) for line in child.stdout.split()]
    assert child.returncode == (-signal.SIGKILL if kill_at <= 16 else 0), child.stderr
    expected = {f"s{i % 4}": {"shard": f"s{i % 4}", "rows": i, "files": [{"path": f"p{i}"}]} for i in done}
    resumed = CommitLog(url=url, storage_options={})
    assert resumed.state() == expected
    assert resumed.unclean() == (2 <= kill_at <= 14)  # begin is write 1, end is write 14
    resumed.append([{"shard": "z", "rows": 0}])
    resumed.checkpoint()
    assert CommitLog(url=url, storage_options={}).state() == {**expected, "z": {"shard": "z", "rows": 0}}
    assert not any("tmp" in p for p in files_under(tmp_path / "log"))


class CountingProxy(FaultProxy):
    """Forwards every request (no faults) and counts them: LIST, GET, PUT, HEAD, POST (bulk delete)."""

    def decide(self, method: str, target: str, range_header: str) -> tuple | None:
        with self._lock:
            self.stats["LIST" if "list-type=" in target else method] += 1
        return super().decide(method, target, range_header)


def ours(stats: dict) -> dict:
    """This proxy's counts, without the per-method ones the fault proxy itself keeps."""
    return {k: v for k, v in stats.items() if not k.startswith("method:")}


def test_resume_requests_do_not_grow_with_the_shard_count(s3, s3_server):
    bucket, options = s3
    counts = {}
    with CountingProxy(s3_server, rate=0.0) as proxy:
        proxied = {**options, "endpoint_url": proxy.endpoint}
        for shards in (10, 3000):
            url = f"s3://{bucket}/log{shards}"
            log = CommitLog(url=url, storage_options=proxied)
            for start in range(0, shards, 1000):
                log.append([record(f"s{i:06d}", i) for i in range(start, min(start + 1000, shards))])
            log.checkpoint()
            for i in range(5):  # a tail of five entries after the checkpoint
                log.append([record(f"s{i:06d}", -i)])
            proxy.stats.clear()
            resumed = CommitLog(url=url, storage_options=proxied)
            assert len(resumed.state()) == shards and resumed.state()["s000004"]["rows"] == -4
            counts[shards] = ours(proxy.stats)
    # GET the pointer, GET the checkpoint, LIST the tail, GET its five entries; nothing else
    assert counts[10] == counts[3000] == {"requests": 8, "GET": 7, "LIST": 1}


def test_checkpoint_requests_and_compaction_on_s3(s3, s3_server):
    bucket, options = s3
    url = f"s3://{bucket}/log"
    with CountingProxy(s3_server, rate=0.0) as proxy:
        proxied = {**options, "endpoint_url": proxy.endpoint}
        log = CommitLog(url=url, storage_options=proxied)
        log.begin_run({"run": 1})
        for i in range(40):
            log.append([{"shard": f"s{i % 7}", "rows": i}])
        proxy.stats.clear()
        log.checkpoint()
        # PUT checkpoint + pointer; LIST log/ and checkpoints/; one bulk DELETE of the 41 entries
        assert ours(proxy.stats) == {"requests": 5, "PUT": 2, "LIST": 2, "POST": 1}
        proxy.stats.clear()
        log.checkpoint()  # nothing new: nothing written
        assert proxy.stats["PUT"] == 0 and proxy.stats["POST"] == 0
    fs = fsspec.filesystem("s3", **options)
    names = sorted(p.rsplit("/", 1)[-1][:20] for p in fs.find(f"{bucket}/log"))
    assert names == ["00000000000000000040", "_latest.json"]
    resumed = CommitLog(url=url, storage_options=options)
    assert resumed.state() == log.state() and resumed.unclean() and resumed.pending() == 0


def test_stats_are_the_same_bytes_whatever_order_the_shards_committed_in():
    """stats.json depends on the committed shards, not on the order the log saw them (a no-op rerun,
    which reads them back from a checkpoint in shard order, must find nothing to rewrite)."""
    import numpy as np

    from latentcache.cache.finalize import merged_stats
    from latentcache.cache.moments import Moments

    rng = np.random.default_rng(0)
    records = {
        f"shard-{i:05d}": {
            "status": "committed",
            "moments": Moments.of(rng.normal(i, 1 + i / 7, size=(3, 4, 8, 8))).to_dict(),
        }
        for i in range(40)
    }
    reordered = dict(reversed(list(records.items())))
    assert json.dumps(merged_stats(records, {})) == json.dumps(merged_stats(reordered, {}))
