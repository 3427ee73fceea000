"""The duplicate index's stored state: the pointer (written last), the parts table, partition files.

See `index.py` for the layout and the policy; this module only reads and writes what it stores.
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..errors import LatentcacheError
from .log import read_object, remove_many

POINTER = "index.json"


INDEX_SCHEMA = pa.schema([("hash", pa.uint64()), ("key", pa.string()), ("part", pa.uint32())])


PARTS_SCHEMA = pa.schema([("shard", pa.string()), ("path", pa.string())])


HashKeys = Callable[[list[str]], np.ndarray]


class DuplicateIndexError(LatentcacheError):
    """The index cannot answer: made with another hash or partition count, or a part moved shard."""


class Duplicates(dict):
    """{part path: {dropped key: keeper shard id}}, with `kept_here`: {part path: keys whose first
    row in that part is the kept copy} (only that part's later rows of the key are dropped)."""

    def __init__(self, *args: Any, kept_here: dict[str, set[str]] | None = None) -> None:
        super().__init__(*args)
        self.kept_here: dict[str, set[str]] = kept_here or {}

    def add(self, path: str, key: str, keeper_shard: str, kept_here: bool) -> None:
        self.setdefault(path, {})[key] = keeper_shard
        if kept_here:
            self.kept_here.setdefault(path, set()).add(key)
        elif key in self.kept_here.get(path, ()):  # an earlier copy arrived: every row of it here goes
            self.kept_here[path].discard(key)
            if not self.kept_here[path]:
                del self.kept_here[path]

    def relabel(self, keepers: dict[str, str]) -> None:
        """Names the current keeper shard in drops found earlier (a keeper can be displaced)."""
        for drops in self.values():
            drops.update((key, keepers[key]) for key in drops.keys() & keepers.keys())

    def keep_mask(self, path: str, keys: list[str]) -> list[bool]:
        """Which rows of the part at `path` (its keys, in row order) stay."""
        drop, here, seen = self.get(path, {}), self.kept_here.get(path, set()), set()
        mask = []
        for key in keys:
            first_here = key in here and key not in seen
            seen.add(key)
            mask.append(key not in drop or first_here)
        return mask

    def __eq__(self, other: object) -> bool:
        """A plain dict compares as a dict; two Duplicates compare `kept_here` too."""
        if not isinstance(other, Duplicates):
            return dict.__eq__(self, other)
        return dict.__eq__(self, other) and nonempty(self.kept_here) == nonempty(other.kept_here)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]  # mutable, like dict


def nonempty(kept_here: dict[str, set[str]]) -> dict[str, set[str]]:
    return {path: keys for path, keys in kept_here.items() if keys}


@dataclass
class Pointer:
    partitions: int
    hash: str
    parts: str | None = None
    versions: dict[str, str] = field(default_factory=dict)  # partition number -> file name
    pending: dict[str, dict[str, str]] = field(default_factory=dict)
    kept_here: dict[str, list[str]] = field(default_factory=dict)

    def duplicates(self) -> Duplicates:
        return Duplicates(
            {p: dict(d) for p, d in self.pending.items()}, kept_here={p: set(k) for p, k in self.kept_here.items()}
        )

    def remember(self, found: Duplicates) -> None:
        self.pending = {p: dict(d) for p, d in found.items()}
        self.kept_here = {p: sorted(k) for p, k in found.kept_here.items()}


def read_partition(url: str, storage_options: dict, name: str | None) -> pa.Table:
    if name is None:
        return INDEX_SCHEMA.empty_table()
    return read_parquet(storage.join(url, name), storage_options)


def read_pointer(url: str, storage_options: dict, partitions: int | None, hash_keys: HashKeys | None) -> Pointer:
    try:
        pointer = Pointer(**json.loads(read_object(storage.join(url, POINTER), storage_options)))
    except FileNotFoundError:
        if partitions is None or hash_keys is None:
            raise DuplicateIndexError(f"no duplicate index at {url}") from None
        return Pointer(partitions=partitions, hash=hash_keys.__name__)
    if hash_keys is not None and pointer.hash != hash_keys.__name__:
        raise DuplicateIndexError(f"the index at {url} hashes keys with {pointer.hash}, not {hash_keys.__name__}")
    return pointer


def read_parts(url: str, storage_options: dict, name: str | None) -> tuple[list[str], list[str]]:
    if name is None:
        return [], []
    table = read_parquet(storage.join(url, name), storage_options)
    return table["shard"].to_pylist(), table["path"].to_pylist()


def save(
    url: str, storage_options: dict, pointer: Pointer, parts: tuple[list[str], list[str]] | None, superseded: list[str]
) -> None:
    """Parts table (when it changed), then the pointer, then the files it no longer names."""
    if parts is not None:
        superseded += [pointer.parts] if pointer.parts else []
        pointer.parts = f"parts/{uuid.uuid4().hex[:12]}.parquet"
        table = pa.table({"shard": pa.array(parts[0], pa.string()), "path": pa.array(parts[1], pa.string())})
        storage.write_bytes(storage.join(url, pointer.parts), parquet_bytes(table), storage_options)
    storage.write_bytes(storage.join(url, POINTER), json.dumps(pointer.__dict__).encode(), storage_options)
    fs, root = storage.url_to_fs(url, storage_options)
    remove_many(fs, [posixpath.join(root, name) for name in superseded])
    remove_strays(url, storage_options, pointer)


def remove_strays(url: str, storage_options: dict, pointer: Pointer) -> None:
    """Files a killed check wrote that no pointer names (one listing per folder)."""
    named = {*pointer.versions.values(), pointer.parts}
    fs, root = storage.url_to_fs(url, storage_options)
    strays = []
    for folder in ("partitions", "parts"):
        try:
            listed = storage.retrying(fs.ls)(posixpath.join(root, folder), detail=False)
        except FileNotFoundError:
            continue
        strays += [p for p in listed if f"{folder}/{posixpath.basename(p)}" not in named]
    remove_many(fs, strays)


def read_parquet(url: str, storage_options: dict) -> pa.Table:
    return pq.read_table(io.BytesIO(read_object(url, storage_options)))


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()
