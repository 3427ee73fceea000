"""An append-only commit log of shard records, compacted into Parquet checkpoints (like Delta Lake's).

Layout under the log's `url` (every name below is relative to it):

    _latest.json                       pointer, written last: {"seq", "checkpoint", "run"}
    log/00000000000000000042.json      one object per append: {"seq", "kind", ...}
    checkpoints/<seq>-<uuid>.parquet   every record as of entry <seq>, one row per shard

- `append` PUTs one object per call, named by a zero-padded sequence number so that a listing
  returns entries in order. Kinds: "commit" (a batch of records), "begin" / "end" (a run).
- `state()` = GET the pointer + GET the checkpoint it names + LIST `log/` (one request per 1000
  entries) + GET each entry after the checkpoint. The tail is short because `checkpoint()` runs
  every so many appends and at the end of a run, and deletes the entries it compacted.
- Kill safety (SIGKILL at any point): each object appears whole or not at all (storage writes are
  atomic); the pointer is written last, so a checkpoint becomes the state only once complete; a
  checkpoint is built only from entries already stored, so it never names one that may be lost.
  What a kill leaves (a checkpoint no pointer names, entries already compacted, `.tmp-` files of a
  local write) is ignored by readers and deleted by the next `checkpoint()`.
- One writer: the driver. Readers may run beside it: a checkpoint or entry deleted between the
  pointer read and its GET restarts the read.

Checkpoint table (readable with `pyarrow.parquet.read_table`), one row per shard, sorted by shard:
- with a `schema`: exactly its columns. Records are conformed to it on append (a missing field is
  null, a field the schema lacks is refused), so a record reads back the same before and after
  compaction.
- without: one column per top-level key. Scalars of one type per column (bool, int, float, str)
  are typed columns; dicts, lists, and columns mixing types hold JSON text, and the Parquet
  metadata key `latentcache.json_columns` lists them. A null value and an absent key are the same:
  records are stored and returned without null-valued keys.
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..errors import LatentcacheError

POINTER = "_latest.json"
SEQ_DIGITS = 20
JSON_COLUMNS_KEY = b"latentcache.json_columns"
SCALAR_TYPES = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}
LOAD_ATTEMPTS = 5


class LogError(LatentcacheError):
    """A record the log cannot store, or a log it cannot read."""


class CommitLog:
    def __init__(self, *, url: str, storage_options: dict, schema: pa.Schema | None = None) -> None:
        if schema is not None and schema.names.count("shard") != 1:
            raise LogError("a commit log schema needs one 'shard' field")
        self.url, self.storage_options, self.schema = url.rstrip("/"), storage_options, schema
        self._loaded = False
        self._records: dict[str, dict] = {}
        self._pointer: dict[str, Any] = {"seq": -1, "checkpoint": None, "run": None}
        self._tail: list[int] = []  # sequence numbers of stored entries after the checkpoint
        self._run: dict[str, Any] | None = None  # {"begin": run, "end": summary | None}

    # ---- public API -------------------------------------------------------------------------

    def append(self, records: list[dict]) -> None:
        """Stores a batch of shard records as one log object; later records of a shard win."""
        records = [self._normalize(r) for r in records]
        if not records:
            return
        self._write_entry({"kind": "commit", "records": records})
        self._records.update((r["shard"], r) for r in records)

    def state(self) -> dict[str, dict]:
        """Shard id -> its latest record (shared dicts: do not mutate them)."""
        self._ensure_loaded()
        return dict(self._records)

    def begin_run(self, run: dict) -> None:
        self._write_entry({"kind": "begin", "run": run})
        self._run = {"begin": run, "end": None}

    def end_run(self, summary: dict) -> None:
        self._write_entry({"kind": "end", "summary": summary})
        self._run = {"begin": (self._run or {}).get("begin"), "end": summary}

    def unclean(self) -> bool:
        """True when the last run began and did not end (a kill): unnamed files may lie about."""
        self._ensure_loaded()
        return self._run is not None and self._run["end"] is None

    def last_run(self) -> dict[str, Any] | None:
        """{"begin": run, "end": summary or None} of the last run begun, or None."""
        self._ensure_loaded()
        return self._run

    def pending(self) -> int:
        """Entries stored since the checkpoint (the caller checkpoints every K of them)."""
        self._ensure_loaded()
        return len(self._tail)

    def checkpoint(self) -> str:
        """Compacts every stored entry into a new checkpoint; returns its URL. Nothing new: no write."""
        self._ensure_loaded()
        if self._tail or self._pointer["checkpoint"] is None:
            name = f"checkpoints/{self._last_seq():0{SEQ_DIGITS}d}-{uuid.uuid4().hex[:8]}.parquet"
            storage.write_bytes(self._url(name), self._checkpoint_bytes(), self.storage_options)
            self._pointer = {"seq": self._last_seq(), "checkpoint": name, "run": self._run}
            storage.write_bytes(self._url(POINTER), json.dumps(self._pointer).encode(), self.storage_options)
            self._tail = []
        self._remove_strays()
        return self._url(self._pointer["checkpoint"])

    def refresh(self) -> None:
        """Forgets what this object read; the next call reads the store again."""
        self._loaded = False

    # ---- records <-> table ------------------------------------------------------------------

    def _normalize(self, record: dict) -> dict:
        """The record as a checkpoint will give it back."""
        if not isinstance(record.get("shard"), str):
            raise LogError(f"a record needs a string 'shard' id: {str(record)[:200]}")
        if self.schema is None:
            return {k: v for k, v in json.loads(json.dumps(record)).items() if v is not None}
        extra = set(record) - set(self.schema.names)
        if extra:
            raise LogError(f"record of shard {record['shard']} has fields the schema lacks: {sorted(extra)}")
        return pa.Table.from_pylist([record], schema=self.schema).to_pylist()[0]

    def _checkpoint_bytes(self) -> bytes:
        records = [self._records[shard] for shard in sorted(self._records)]
        if self.schema is not None:
            table = pa.Table.from_pylist(records, schema=self.schema)
        else:
            table = table_from_records(records)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()

    # ---- reading the store ------------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        for attempt in range(LOAD_ATTEMPTS):
            try:
                self._load()
                self._loaded = True
                return
            except FileNotFoundError:  # a checkpoint ran beside us and deleted what we listed
                if attempt == LOAD_ATTEMPTS - 1:
                    raise

    def _load(self) -> None:
        self._pointer = self._read_pointer()
        self._run = self._pointer.get("run")
        self._records = self._read_checkpoint(self._pointer["checkpoint"])
        self._tail = [seq for seq in self._list_entries() if seq > self._pointer["seq"]]
        for entry in self._read_entries(self._tail):
            self._apply(entry)

    def _read_pointer(self) -> dict[str, Any]:
        try:
            return json.loads(read_object(self._url(POINTER), self.storage_options))
        except FileNotFoundError:
            return {"seq": -1, "checkpoint": None, "run": None}

    def _read_checkpoint(self, name: str | None) -> dict[str, dict]:
        if name is None:
            return {}
        table = pq.read_table(io.BytesIO(read_object(self._url(name), self.storage_options)))
        return {r["shard"]: r for r in records_from_table(table, schemaless=self.schema is None)}

    def _read_entries(self, seqs: list[int]) -> list[dict[str, Any]]:
        """The entries, in order; fetched concurrently (fsspec batches the GETs of a list)."""
        fs, _ = storage.url_to_fs(self.url, self.storage_options)
        paths = [storage.url_to_fs(self._entry_url(seq), self.storage_options)[1] for seq in seqs]
        data = storage.retrying(fs.cat)(paths, on_error="raise", start=0) if paths else {}
        return [json.loads(data[path]) for path in paths]

    def _apply(self, entry: dict[str, Any]) -> None:
        if entry["kind"] == "commit":
            self._records.update((r["shard"], r) for r in entry["records"])
        elif entry["kind"] == "begin":
            self._run = {"begin": entry["run"], "end": None}
        elif entry["kind"] == "end":
            self._run = {"begin": (self._run or {}).get("begin"), "end": entry["summary"]}

    def _list_entries(self) -> list[int]:
        """Sequence numbers stored under log/, in order; stray names (partial local writes) skipped."""
        return sorted(seq for _, seq in self._listing("log"))

    def _listing(self, folder: str) -> list[tuple[str, int]]:
        fs, path = storage.url_to_fs(self._url(folder), self.storage_options)
        try:
            names = storage.retrying(fs.ls)(path, detail=False)
        except FileNotFoundError:
            return []
        return [(name, seq) for name in names if (seq := parse_seq(posixpath.basename(name))) is not None]

    # ---- writing ----------------------------------------------------------------------------

    def _write_entry(self, body: dict[str, Any]) -> None:
        self._ensure_loaded()
        seq = self._last_seq() + 1
        data = json.dumps({"seq": seq, **body}, separators=(",", ":")).encode()
        storage.write_bytes(self._entry_url(seq), data, self.storage_options)
        self._tail.append(seq)

    def _last_seq(self) -> int:
        return self._tail[-1] if self._tail else self._pointer["seq"]

    def _remove_strays(self) -> None:
        """Compacted entries, checkpoints the pointer no longer names, partial local writes."""
        current = posixpath.basename(self._pointer["checkpoint"])
        fs, _ = storage.url_to_fs(self.url, self.storage_options)
        stale = [name for name, seq in self._listing("log") if seq <= self._pointer["seq"]]
        stale += [name for name, _ in self._listing("checkpoints") if posixpath.basename(name) != current]
        remove_many(fs, stale)
        storage.remove_partial_files(self.url, self.storage_options)

    def _url(self, name: str) -> str:
        return storage.join(self.url, name)

    def _entry_url(self, seq: int) -> str:
        return self._url(f"log/{seq:0{SEQ_DIGITS}d}.json")


def parse_seq(name: str) -> int | None:
    """The sequence number at the start of a log or checkpoint name; None for anything else."""
    digits = name[:SEQ_DIGITS]
    if len(digits) == SEQ_DIGITS and digits.isdigit() and name[SEQ_DIGITS : SEQ_DIGITS + 1] in (".", "-"):
        return int(digits)
    return None


def read_object(url: str, storage_options: dict) -> bytes:
    """One GET. (s3fs's plain `cat_file` first asks for the size, a HEAD, to split large reads;
    a read from byte 0 skips that, and a missing object is one 404, not a HEAD and a LIST.)"""
    fs, path = storage.url_to_fs(url, storage_options)
    return storage.retrying(fs.cat_file)(path, start=0)


def remove_many(fs: Any, paths: list[str]) -> None:
    """Deletes paths in bulk (one request per 1000 on S3); a path already gone is fine."""
    if not paths:
        return
    try:
        storage.retrying(fs.rm)(paths)
    except FileNotFoundError:
        for path in paths:
            try:
                storage.retrying(fs.rm_file)(path)
            except FileNotFoundError:
                pass


# ---- schemaless tables: typed scalar columns, JSON text for the rest ---------------------------


def column_kind(values: list[Any]) -> type | None:
    """The one Python scalar type of a column's non-null values; None when JSON text is needed."""
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return str
    kind = kinds.pop() if len(kinds) == 1 else None
    if kind is int and any(not -(2**63) <= v < 2**63 for v in values if v is not None):
        return None
    return kind if kind in SCALAR_TYPES else None


def table_from_records(records: list[dict]) -> pa.Table:
    names = list(dict.fromkeys(["shard", *(k for r in records for k in r)]))
    arrays, json_columns = [], []
    for name in names:
        values = [r.get(name) for r in records]
        kind = column_kind(values)
        if kind is None:
            json_columns.append(name)
            values = [None if v is None else json.dumps(v) for v in values]
        arrays.append(pa.array(values, type=SCALAR_TYPES[kind or str]))
    schema = pa.schema([pa.field(n, a.type) for n, a in zip(names, arrays)])
    schema = schema.with_metadata({JSON_COLUMNS_KEY: json.dumps(json_columns).encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def records_from_table(table: pa.Table, *, schemaless: bool) -> list[dict]:
    """Rows as dicts; column by column, JSON text decoded in one call per column (fast at 10^5 rows)."""
    if not schemaless:
        return table.to_pylist()
    json_columns = set(json.loads((table.schema.metadata or {}).get(JSON_COLUMNS_KEY, b"[]")))
    columns = []
    for name in table.column_names:
        values = table.column(name).to_pylist()
        if name in json_columns:
            values = json.loads("[" + ",".join("null" if v is None else v for v in values) + "]")
        columns.append(values)
    names = table.column_names
    return [{k: v for k, v in zip(names, row) if v is not None} for row in zip(*columns)]
