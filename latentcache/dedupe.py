"""Duplicate keys across shards: the first copy in input-shard order is kept, the rest go to `_errors`.

Within a shard, `sinks.commit_shard` keeps the first row of a key. Across shards, commits land in
any order (and a resumed run commits last the shards an earlier run missed), so this check runs at
the end of every run, over everything committed, in input order:

1. each committed shard's kept keys (`_state/keys/<name>.parquet`, written once by its commit and
   never changed) are hashed to 64 bits, and one sort over all of them finds the hashes that occur
   in more than one shard: about 8 bytes per key (under 1 GB for 100M keys), never the key strings;
2. the few candidate keys are confirmed by exact comparison, so a hash collision never drops a key;
3. each shard holding a later copy is rewritten without it (one atomic write per file), the copy
   gets an error row saying which shard kept the key, and the shard's record (counts, statistics),
   the resume point, is updated last.
Every step is recomputed from the unchanged key files, so a run killed half-way through repeats
it to the same result.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .latent_space import LatentSpace
from .manifest import CacheLayout
from .reader import _safetensors_metadata
from .sinks import ERRORS_SCHEMA, ShardRows, column_to_numpy, parquet_bytes, shard_moments
from .sources import ShardRef
from .stats import merge_all

log = logging.getLogger(__name__)

REASON = "duplicate key across shards: kept the first copy, in shard {first}"
REASON_PREFIX = REASON.split(":")[0]
COUNT_FIELD = "duplicates_across_shards"


def key_hashes(keys: list[str]) -> np.ndarray:
    return np.fromiter((int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys),
                       dtype=np.uint64, count=len(keys))


def read_keys(layout: CacheLayout, name: str) -> list[str]:
    try:
        data = storage.read_bytes(layout.url("_state", "keys", name + ".parquet"), layout.storage_options)
    except FileNotFoundError:  # committed by a version without key files: nothing to compare
        log.warning("shard %s has no key file; it is left out of the duplicate check", name)
        return []
    return pq.read_table(io.BytesIO(data)).column("key").to_pylist()


def in_input_order(records: dict[str, dict[str, Any]], shards: list[ShardRef]) -> list[dict[str, Any]]:
    """Committed records by input order; shards no longer in the input come last, by name."""
    order = {s.id: i for i, s in enumerate(shards)}
    return sorted(records.values(), key=lambda r: (order.get(r["shard"], len(order)), r["name"]))


def repeated_hashes(hashes: list[np.ndarray]) -> np.ndarray:
    """Hashes that occur in more than one shard (each shard's keys are already unique)."""
    everything = np.sort(np.concatenate([np.empty(0, np.uint64), *hashes]))
    return np.unique(everything[1:][everything[1:] == everything[:-1]])


def find_duplicates(layout: CacheLayout, ordered: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Shard name -> {duplicate key: name of the shard that keeps it}, for shards holding later copies."""
    hashes = [key_hashes(read_keys(layout, r["name"])) for r in ordered]
    candidates = repeated_hashes(hashes)
    owner: dict[str, str] = {}
    duplicates: dict[str, dict[str, str]] = {}
    for record, shard_hashes in zip(ordered, hashes):
        hits = np.flatnonzero(np.isin(shard_hashes, candidates))
        if not hits.size:
            continue
        keys = read_keys(layout, record["name"])
        for i in hits:
            first = owner.setdefault(keys[i], record["name"])
            if first != record["name"]:
                duplicates.setdefault(record["name"], {})[keys[i]] = first
    return duplicates


# ---- rewriting one committed file without some keys, per format ------------------------------


def drop_rows_parquet(data: bytes, drop: set[str]) -> tuple[bytes, int, np.ndarray | None]:
    table = pq.read_table(io.BytesIO(data))
    table = table.filter(pc.invert(pc.is_in(table.column("key"), value_set=pa.array(sorted(drop), pa.string()))))
    latent = column_to_numpy(table.column("latent")) if "latent" in table.column_names else None
    return parquet_bytes(table), table.num_rows, latent


def drop_rows_safetensors(data: bytes, drop: set[str]) -> tuple[bytes, int, np.ndarray | None]:
    import torch
    from safetensors.torch import load, save

    metadata = _safetensors_metadata(data)
    keys, rows = json.loads(metadata["keys"]), json.loads(metadata["rows"])
    keep = [i for i, k in enumerate(keys) if k not in drop]
    tensors = {name: t[keep].contiguous() for name, t in load(data).items()}
    metadata = {**metadata, "keys": json.dumps([keys[i] for i in keep]), "rows": json.dumps([rows[i] for i in keep])}
    latent = tensors.get("latent")
    stats_latent = latent.numpy() if latent is not None and latent.dtype != torch.bfloat16 else None
    return save(tensors, metadata=metadata), len(keep), stats_latent


ROW_DROPPERS: dict[str, Callable[[bytes, set[str]], tuple[bytes, int, np.ndarray | None]]] = {
    "parquet": drop_rows_parquet,
    "safetensors": drop_rows_safetensors,
}


def rewrite_errors(layout: CacheLayout, record: dict[str, Any], duplicates: dict[str, str]) -> None:
    """The shard's error rows with this check's rows replaced (so repeating it adds nothing)."""
    url = layout.url("_state", "errors", record["name"] + ".parquet")
    errors = pq.read_table(io.BytesIO(storage.read_bytes(url, layout.storage_options))).cast(ERRORS_SCHEMA)
    errors = errors.filter(pc.invert(pc.starts_with(errors.column("reason"), REASON_PREFIX)))
    added = pa.Table.from_pylist([{"key": k, "shard": record["shard"], "reason": REASON.format(first=first)}
                                  for k, first in duplicates.items()], schema=ERRORS_SCHEMA)
    storage.write_bytes(url, parquet_bytes(pa.concat_tables([errors, added])), layout.storage_options)


def drop_duplicates(layout: CacheLayout, record: dict[str, Any], duplicates: dict[str, str], *, fmt: str,
                    space: LatentSpace, store_dtype: str) -> dict[str, Any]:
    """Errors first, then the files, then the record: the record is only ever ahead of nothing."""
    rewrite_errors(layout, record, duplicates)
    files, moments = [], []
    for entry in record["files"]:
        data, rows, latent = ROW_DROPPERS[fmt](storage.read_bytes(layout.url(entry["path"]), layout.storage_options),
                                               set(duplicates))
        if rows != entry["rows"]:
            storage.write_bytes(layout.url(entry["path"]), data, layout.storage_options)
        files.append({**entry, "rows": rows})
        if latent is not None and rows:
            moments.append(shard_moments(ShardRows({"latent": latent}, [], store_dtype), space))
    merged = merge_all(m for m in moments if m is not None)
    before = record.get(COUNT_FIELD, 0)
    return {**record, "files": files, "written": sum(f["rows"] for f in files), COUNT_FIELD: len(duplicates),
            "failed": record["failed"] - before + len(duplicates), "moments": merged.to_dict() if merged else None}


def drop_cross_shard_duplicates(layout: CacheLayout, records: dict[str, dict[str, Any]], shards: list[ShardRef], *,
                                fmt: str, space: dict[str, Any], store_dtype: str) -> dict[str, dict[str, Any]]:
    """Applies the keep-first policy across shards; returns the records, updated where rows were dropped."""
    ordered = in_input_order(records, shards)
    by_name = {r["name"]: r for r in ordered}
    updated = dict(records)
    for name, duplicates in find_duplicates(layout, ordered).items():
        record = by_name[name]
        if record.get(COUNT_FIELD) == len(duplicates):
            continue  # done by an earlier run
        new = drop_duplicates(layout, record, duplicates, fmt=fmt, space=LatentSpace.from_dict(space), store_dtype=store_dtype)
        layout.write_json(new, "_state", "shards", name + ".json")
        updated[new["shard"]] = new
        log.warning("shard %s: %d key(s) already committed by an earlier shard; recorded in _errors", name, len(duplicates))
    return updated
