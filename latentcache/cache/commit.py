"""The driver's side of the commit protocol (the writer tasks' side is writer.py).

1. Writer tasks write final part files (and error parts) and send one metadata row per shard.
2. When the driver has seen every row of a shard (its marker's count), the shard's record is
   queued; records are appended to the commit log in batches (one PUT per batch): a shard is
   committed by its record, never earlier.
3. After the shards of a run are committed, their parts go through the duplicate index; a part
   holding later copies of keys is copied without them to a new name, its record (naming the new
   part and its new error part, `checked`) is appended, the index is told, the old part deleted.
A file a reader can see is never rewritten. A run that follows a killed one deletes what no
record names (one listing of data/ and of the errors folder).
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from .formats import get_format
from .layout import DATA, Layout
from .log import CommitLog
from .moments import Moments, merge_all
from .records import COMMITTED, FAILED
from .writer import ERRORS_SCHEMA, parquet_bytes

log = logging.getLogger(__name__)
CRASH_ENV = "LATENTCACHE_CRASH_AT"


def crash_point(step: str) -> None:
    """Fault injection for the reliability tests: SIGKILLs this process at a named step of the
    protocol when $LATENTCACHE_CRASH_AT names it (a real kill, as a preemption would land there)."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class ShardLedger:
    """Per shard: rows seen so far, the marker's expected count, and what the writers reported."""

    seen: dict[str, int] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    reports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    marker: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, meta: dict[str, Any]) -> str | None:
        shard = meta["shard"]
        self.reports.setdefault(shard, []).append(meta)
        self.seen[shard] = self.seen.get(shard, 0) + meta["rows"]
        if meta["shard_rows"] is not None:
            self.expected[shard] = meta["shard_rows"]
            self.marker[shard] = {"shard_status": meta["shard_status"], "shard_error": meta["shard_error"]}
        return shard if self.seen[shard] == self.expected.get(shard, -1) else None

    def record(self, shard: str, name: str) -> dict[str, Any]:
        reports = self.reports.pop(shard, [])
        parts = [p for r in reports for p in json.loads(r["parts"])]
        moments = merge_all(Moments.from_dict(p["moments"]) for p in parts if p.get("moments"))
        marker = self.marker.get(shard, {})
        return {
            "shard": shard,
            "name": name,
            "status": FAILED if marker.get("shard_status") == "failed" else COMMITTED,
            "input": self.expected.get(shard, self.seen.get(shard, 0)),
            "written": sum(p["rows"] for p in parts),
            "failed": sum(r["error_rows"] for r in reports),
            "fp32_fallback": sum(r["fp32_fallback"] for r in reports),
            "nonfinite": sum(r["nonfinite"] for r in reports),
            "duplicates": 0,
            "parts": parts,
            "errors": [r["errors"] for r in reports if r["errors"]],
            "moments": moments.to_dict() if moments else None,
            **marker,
            "checked": False,
            "error_index": [i for r in reports if r["errors"] for i in json.loads(r["error_index"])],
        }


def read_part_keys(root: str, storage_options: dict[str, Any], fmt: str, path: str) -> list[str]:
    """The keys of a part in row order (the duplicate index's map tasks call it; picklable via partial)."""
    return get_format(fmt).read_keys(storage.read_bytes(storage.join(root, path), storage_options))


class Committer:
    """Appends shard records to the log in batches; a batch's PUT is the commit point of its shards."""

    def __init__(
        self,
        layout: Layout,
        commit_log: CommitLog,
        *,
        batch: int = 64,
        seconds: float = 5.0,
        checkpoint_every: int = 50,
    ) -> None:
        self.layout, self.log, self.limit, self.seconds, self.every = (
            layout,
            commit_log,
            batch,
            seconds,
            checkpoint_every,
        )
        self.queue: list[dict[str, Any]] = []
        self.last = time.monotonic()

    def add(self, record: dict[str, Any]) -> None:
        self.queue.append(record)
        if len(self.queue) >= self.limit or time.monotonic() - self.last > self.seconds:
            self.flush()

    def flush(self) -> None:
        if self.queue:
            previous = self.log.state()
            self.log.append(self.queue)
            crash_point("committed")
            self.layout.remove([f for r in self.queue for f in superseded(previous.get(r["shard"]), r)])
            if self.log.pending() >= self.every:
                self.log.checkpoint()
        self.queue, self.last = [], time.monotonic()


def named_files(record: dict[str, Any] | None) -> set[str]:
    if not record:
        return set()
    return {p["path"] for p in record.get("parts", [])} | set(record.get("errors", []))


def superseded(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Files the old record named and the new one does not (a retried failed shard's error rows)."""
    return sorted(named_files(old) - named_files(new))


def known_rows(layout: Layout, record: dict[str, Any], fmt: str) -> list[tuple[str, str | None]]:
    """(key, row error) of every row a shard's writers reported, in input order. Error rows carry
    their input index; the good rows fill the other positions in part order (parts are named by
    their first row; exact for one latent shape, the failed-shard case that matters)."""
    good = [
        k
        for p in sorted(record["parts"], key=lambda p: p["path"])
        for k in read_part_keys(layout.root, layout.storage_options, fmt, p["path"])
    ]
    bad = [r for e in record["errors"] for r in pq.read_table(io.BytesIO(layout.read_bytes(e))).to_pylist()]
    by_index = dict(zip(record.get("error_index", []), bad))
    rows, good_iter = [], iter(good)
    for index in range(len(good) + len(bad)):
        row = by_index.get(index)
        rows.append((row["key"], row["reason"]) if row else (next(good_iter), None))
    return rows


def fail_shard(layout: Layout, record: dict[str, Any], fmt: str, reason: str) -> dict[str, Any]:
    """A shard that did not complete: its parts and error parts go; one error part names the shard
    (a row with a null key) and has one row per key read before it failed, in input order."""
    known = known_rows(layout, record, fmt)
    why = f"shard failed: {reason}"
    rows = [{"key": None, "shard": record["shard"], "reason": why}] + [
        {"key": k, "shard": record["shard"], "reason": why + (f"; this sample: {e}" if e else "")} for k, e in known
    ]
    path = layout.errors_path()
    layout.write_bytes(path, parquet_bytes(pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)))
    layout.remove([p["path"] for p in record["parts"]] + record["errors"])
    kept = {k: v for k, v in record.items() if k != "error_index"}
    return {
        **kept,
        "status": FAILED,
        "shard_error": reason,
        "parts": [],
        "written": 0,
        "moments": None,
        "failed": len(known),
        "errors": [path],
    }


def remove_unnamed(layout: Layout, records: dict[str, dict[str, Any]]) -> list[str]:
    """After a killed run: parts and error parts no record names (one listing per folder)."""
    named = set().union(*(named_files(r) for r in records.values())) if records else set()
    strays = [p for folder in (DATA, layout.errors_dir) for p in layout.listed(folder) if p not in named]
    layout.remove(strays)
    return strays
