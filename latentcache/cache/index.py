"""Cross-shard duplicate keys, found without holding every key on the driver.

Policy: keep the first copy of a key in input order = (shard id, part path, row); every later copy,
in another shard or the same one, is dropped. Keys arrive in any order (a resumed run commits late
what an earlier run missed), so a copy already indexed can lose its place to an earlier one.

Layout under the index's `url`:

    index.json                        pointer, written last: partition versions, parts table,
                                      hash name, drops not yet applied
    parts/<uuid>.parquet              parts table: row number = part number -> (shard, path)
    partitions/p00042-<uuid>.parquet  one version per partition: (hash, key, part) of every kept key

A key's partition is its 64-bit hash modulo P. A check runs map tasks (read the new parts' keys,
hash them, split by partition) and one reduce task per partition that received keys (read the
partition's current version, find hashes seen before, confirm them by comparing the keys
themselves, write a new version). Ray places them when it is initialised; otherwise they run
inline. The driver holds the parts table (O(parts)) and the duplicates, never the keys.

Kill safety: new versions get new names and the pointer is written last, so a kill leaves the old
index whole; files no pointer names are deleted by the next check. The index stores the parts table
separately so that a copy-on-write drop (part A replaced by A' without some keys) is a rename of
one row (`apply_drops`), not a rewrite of every partition holding A's keys.

Every drop found is also kept in the pointer until `apply_drops` says it was applied: a check
killed after its pointer, and run again with the same parts, returns the same answer.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from .index_store import (
    INDEX_SCHEMA,
    DuplicateIndexError,
    Duplicates,
    HashKeys,
    Pointer,
    parquet_bytes,
    read_partition,
    read_parts,
    read_pointer,
    save,
)


@dataclass(frozen=True)
class PartRef:
    """A part file of a newly committed shard."""

    shard: str
    path: str


def blake2b_64(keys: list[str]) -> np.ndarray:
    """64-bit key hashes (the same as the old whole-cache check used)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys),
        dtype=np.uint64,
        count=len(keys),
    )


# ---- map and reduce: plain functions (Ray places them; tests call them directly) ---------------


def map_parts(
    parts: list[tuple[int, str]], read_keys: Callable[[str], list[str]], hash_keys: HashKeys, partitions: int
) -> tuple[pa.Table, np.ndarray]:
    """The keys of some parts as one (hash, key, part, row) table sorted by partition, and the row
    count of each partition (which lets the driver skip partitions that received nothing).
    One table, not one per partition: Ray keeps small task results in the driver's own memory,
    and P small pieces per map task would put every key there."""
    tables = [part_table(number, read_keys(path), hash_keys) for number, path in parts]
    whole = pa.concat_tables(tables) if tables else part_table(0, [], hash_keys)
    bucket = whole["hash"].to_numpy() % np.uint64(partitions)
    order = np.argsort(bucket, kind="stable")
    return whole.take(pa.array(order)), np.bincount(bucket.astype(np.int64), minlength=partitions)


def partition_slices(counts: list[np.ndarray], partition: int) -> list[tuple[int, int]]:
    """(offset, length) of `partition` in each map output."""
    return [(int(c[:partition].sum()), int(c[partition])) for c in counts]


def part_table(number: int, keys: list[str], hash_keys: HashKeys) -> pa.Table:
    n = len(keys)
    return pa.table(
        {
            "hash": pa.array(np.asarray(hash_keys(keys), dtype=np.uint64)),
            "key": pa.array(keys, pa.string()),
            "part": pa.array(np.full(n, number, np.uint32)),
            "row": pa.array(np.arange(n, dtype=np.uint32)),
        }
    )


@dataclass
class ReduceResult:
    partition: int
    version: str | None  # the new version's file name; None when nothing changed
    drops: list[tuple[int, str, int]]  # (part holding a later copy, key, part holding the kept copy)


def reduce_partition(spec: dict[str, Any], rank: np.ndarray, *map_outputs: pa.Table) -> ReduceResult:
    """Merges one partition's new keys with its current version. `spec`: url, storage_options,
    partition, current (file name or None), slices ((offset, length) of the partition in each map
    output). `rank`: each part's place in input order."""
    new = pa.concat_tables([t.slice(*where) for t, where in zip(map_outputs, spec["slices"])])
    old = read_partition(spec["url"], spec["storage_options"], spec["current"])
    new_hash, old_hash = new["hash"].to_numpy(), old["hash"].to_numpy()
    unique, counts = np.unique(new_hash, return_counts=True)
    suspects = np.union1d(unique[counts > 1], np.intersect1d(unique, old_hash))
    new_suspect, old_suspect = np.isin(new_hash, suspects), np.isin(old_hash, suspects)
    kept, drops = resolve(new.filter(new_suspect), old.filter(old_suspect), rank)
    added = new.filter(pa.array(~new_suspect)).select(INDEX_SCHEMA.names)
    if added.num_rows == 0 and sorted(kept) == sorted(index_rows(old.filter(old_suspect))):
        return ReduceResult(spec["partition"], None, drops)
    merged = pa.concat_tables([old.filter(pa.array(~old_suspect)), added, rows_table(kept)])
    merged = merged.take(pc.sort_indices(merged, [("hash", "ascending")]))
    name = f"partitions/p{spec['partition']:05d}-{uuid.uuid4().hex[:12]}.parquet"
    storage.write_bytes(storage.join(spec["url"], name), parquet_bytes(merged), spec["storage_options"])
    return ReduceResult(spec["partition"], name, drops)


def resolve(new: pa.Table, old: pa.Table, rank: np.ndarray) -> tuple[list[tuple], list[tuple[int, str, int]]]:
    """For keys whose hash was seen before: the kept copy of each key, and every later copy.
    Grouping by the key itself is the exact comparison: a hash collision never drops a key."""
    copies: dict[str, list[tuple[int, int, int]]] = defaultdict(list)  # key -> (rank, row, part)
    hashes: dict[str, int] = {}
    for h, key, part, row in zip(*(new[c].to_pylist() for c in ("hash", "key", "part", "row"))):
        copies[key].append((int(rank[part]), row, part))
        hashes[key] = h
    for h, key, part in index_rows(old):
        hashes[key] = h
        if not any(c[2] == part for c in copies[key]):  # a part checked again speaks for itself
            copies[key].append((int(rank[part]), -1, part))
    kept, drops = [], []
    for key, found in copies.items():
        found.sort()
        kept.append((hashes[key], key, found[0][2]))
        drops += [(part, key, found[0][2]) for _, _, part in found[1:]]
    return kept, drops


def index_rows(table: pa.Table) -> list[tuple]:
    return list(zip(*(table[c].to_pylist() for c in INDEX_SCHEMA.names)))


def rows_table(rows: list[tuple]) -> pa.Table:
    columns = list(zip(*rows)) if rows else [[], [], []]
    return pa.Table.from_arrays([pa.array(list(c), f.type) for c, f in zip(columns, INDEX_SCHEMA)], schema=INDEX_SCHEMA)


# ---- the driver -------------------------------------------------------------------------------


def check_duplicates(
    *,
    url: str,
    storage_options: dict,
    new: list[PartRef],
    read_keys: Callable[[str], list[str]],
    partitions: int = 256,
    hash_keys: HashKeys = blake2b_64,
    map_tasks: int = 64,
    use_ray: bool | None = None,
) -> Duplicates:
    """Indexes the keys of `new` parts; returns every later copy not yet dropped (see the module
    docstring). `partitions` applies when the index is created; `hash_keys` must match it.
    `use_ray`: None = on Ray when it is initialised; False = inline (a test, a small run)."""
    pointer = read_pointer(url, storage_options, partitions, hash_keys)
    shards, paths = read_parts(url, storage_options, pointer.parts)
    known = len(paths)
    numbers = number_parts(new, shards, paths)
    ordered = sorted(dict.fromkeys(new), key=lambda r: (r.shard, r.path))
    groups = chunks([(numbers[ref.path], ref.path) for ref in ordered], map_tasks)
    on_ray = ray_running() if use_ray is None else use_ray
    results = run_tasks(pointer, url, storage_options, groups, input_rank(shards, paths), read_keys, hash_keys, on_ray)
    found, keepers = pointer.duplicates(), {}
    for result in results:
        for part, key, keeper in result.drops:
            keepers[key] = shards[keeper]
            found.add(paths[part], key, shards[keeper], kept_here=part == keeper)
    found.relabel(keepers)
    versions = {str(r.partition): r.version for r in results if r.version}
    if versions or found != pointer.duplicates() or len(paths) > known:
        superseded = [pointer.versions[p] for p in versions if p in pointer.versions]
        pointer.versions.update(versions)
        pointer.remember(found)
        save(url, storage_options, pointer, (shards, paths) if len(paths) > known else None, superseded)
    return found


def apply_drops(*, url: str, storage_options: dict, replaced: dict[str, str | None]) -> None:
    """Tells the index that each part `old` was replaced by `new` (the same rows without the
    dropped keys), or deleted (None): its pending drops are done and its keys now live in `new`."""
    pointer = read_pointer(url, storage_options, None, None)
    shards, paths = read_parts(url, storage_options, pointer.parts)
    position = {path: i for i, path in enumerate(paths)}
    for old, new in replaced.items():
        if old in position:
            paths[position[old]] = new
        pointer.pending.pop(old, None)
        pointer.kept_here.pop(old, None)
    save(url, storage_options, pointer, (shards, paths), [])


def number_parts(new: list[PartRef], shards: list[str], paths: list[str]) -> dict[str, int]:
    """Part numbers of `new` (known parts keep theirs; the others are appended to shards/paths)."""
    position = {path: i for i, path in enumerate(paths)}
    for ref in sorted(new, key=lambda r: (r.shard, r.path)):
        if ref.path in position and shards[position[ref.path]] != ref.shard:
            owner = shards[position[ref.path]]
            raise DuplicateIndexError(f"part {ref.path} is indexed for shard {owner}, not {ref.shard}")
        if ref.path not in position:
            position[ref.path] = len(paths)
            shards.append(ref.shard)
            paths.append(ref.path)
    return {ref.path: position[ref.path] for ref in new}


def input_rank(shards: list[str], paths: list[str]) -> np.ndarray:
    """Each part's place in input order (shard id, then path); deleted parts come last."""
    table = pa.table({"shard": pa.array(shards, pa.string()), "path": pa.array(paths, pa.string())})
    order = pc.sort_indices(table, [("shard", "ascending"), ("path", "ascending")])  # nulls (deleted parts) sort last
    rank = np.empty(len(shards), dtype=np.int64)
    rank[order.to_numpy()] = np.arange(len(shards))
    return rank


def chunks(items: list[Any], count: int) -> list[list[Any]]:
    size = max(1, math.ceil(len(items) / max(1, count)))
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_tasks(
    pointer: Pointer,
    url: str,
    storage_options: dict,
    groups: list[list[tuple[int, str]]],
    rank: np.ndarray,
    read_keys: Callable[[str], list[str]],
    hash_keys: HashKeys,
    on_ray: bool,
) -> list[ReduceResult]:
    """Map over the groups of new parts, then reduce each partition that received keys."""
    specs = [
        {"url": url, "storage_options": storage_options, "partition": p, "current": pointer.versions.get(str(p))}
        for p in range(pointer.partitions)
    ]
    if not groups:
        return []
    if not on_ray:
        tables, counts = zip(*(map_parts(group, read_keys, hash_keys, pointer.partitions) for group in groups))
        touched = np.flatnonzero(sum(counts))
        return [reduce_partition({**specs[p], "slices": partition_slices(counts, p)}, rank, *tables) for p in touched]
    return run_on_ray(specs, groups, rank, read_keys, hash_keys)


def ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def run_on_ray(
    specs: list[dict],
    groups: list[list[tuple[int, str]]],
    rank: np.ndarray,
    read_keys: Callable[[str], list[str]],
    hash_keys: HashKeys,
) -> list[ReduceResult]:
    import ray

    mapper = ray.remote(map_parts).options(num_returns=2)
    tables, count_refs = zip(*(mapper.remote(group, read_keys, hash_keys, len(specs)) for group in groups))
    counts = ray.get(list(count_refs))
    rank_ref, reducer = ray.put(rank), ray.remote(reduce_partition)
    pending = [
        reducer.remote({**specs[p], "slices": partition_slices(counts, p)}, rank_ref, *tables)
        for p in np.flatnonzero(sum(counts))
    ]
    return ray.get(pending)


# ---- the stored pointer, parts table and partitions ---------------------------------------------
