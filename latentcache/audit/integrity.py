"""Integrity: every file exists, parses and holds what the manifest records; counts add up; nothing lost.

One pass over every file: rows, shapes, dtypes, NaN/Inf, duplicate keys; then the manifest as a
whole (complete, counts reconcile) and, with --input, every input key is in the cache or in
`_errors` and no cached key comes from elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import storage
from ..cache.codecs import codec
from ..reader import Cache, CacheFile, LatentBlock
from ..rows import CROP
from .findings import Findings, examples


def check_rows(block: LatentBlock, manifest: dict[str, Any]) -> list[str]:
    counts = {len(block.keys), *(len(t) for t in block.tensors.values())}
    if counts != {block.file.rows}:
        return [f"{block.file.path}: manifest records {block.file.rows} rows, file holds {sorted(counts)}"]
    return []


def check_shapes(block: LatentBlock, manifest: dict[str, Any]) -> list[str]:
    expected = block.file.latent_shape
    out = []
    for name, arr in block.tensors.items():
        shape = tuple(arr.shape[1:]) if name != "codes" else (expected[0], *arr.shape[1:])
        if shape != expected:
            out.append(f"{block.file.path}: {name} has shape {list(shape)}, manifest records {list(expected)}")
    return out


def check_dtypes(block: LatentBlock, manifest: dict[str, Any]) -> list[str]:
    expected = codec(manifest["store_dtype"]).array_dtype  # bf16, int8, fp8 are read back as float32
    return [
        f"{block.file.path}: {name} is {arr.dtype}, manifest records {manifest['store_dtype']}"
        for name, arr in block.tensors.items()
        if name != "codes" and arr.dtype != expected
    ]


def check_finite(block: LatentBlock, manifest: dict[str, Any]) -> list[str]:
    out = []
    for name, arr in block.tensors.items():
        if np.issubdtype(arr.dtype, np.floating) and len(arr):
            bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
            keys = [k for k, b in zip(block.keys, bad) if b]
            if keys:
                out.append(f"{block.file.path}: {name} has NaN/Inf in {len(keys)} row(s): {examples(keys)}")
    return out


BLOCK_CHECKS: dict[str, Callable[[LatentBlock, dict[str, Any]], list[str]]] = {
    "row_count": check_rows,
    "shape": check_shapes,
    "dtype": check_dtypes,
    "non_finite": check_finite,
}


def read_block(cache: Cache, file: CacheFile, findings: Findings) -> LatentBlock | None:
    try:
        return cache.read(file)
    except FileNotFoundError:
        findings.fail("missing_file", f"{file.path}: listed in the manifest but absent")
    except Exception as exc:  # noqa: BLE001 - any parse error (truncation, garbage) means "unreadable"
        findings.fail("unreadable_file", f"{file.path}: {storage.describe(exc)}")
    return None


@dataclass
class CacheScan:
    """Where each key lives (file index, row) and its stored crop metadata, from one pass."""

    where: dict[str, tuple[int, int]] = field(default_factory=dict)
    crops: dict[str, dict[str, int | None]] = field(default_factory=dict)
    rows: int = 0


def scan_cache(cache: Cache, findings: Findings) -> CacheScan:
    scan = CacheScan()
    for index, file in enumerate(cache.files):
        block = read_block(cache, file, findings)
        if block is None:
            continue
        for kind, check in BLOCK_CHECKS.items():
            for detail in check(block, cache.manifest):
                findings.fail(kind, detail)
        record_keys(scan, block, index, findings)
    findings.checks += ["files", *BLOCK_CHECKS, "duplicate_key"]
    return scan


def record_keys(scan: CacheScan, block: LatentBlock, index: int, findings: Findings) -> None:
    crop_columns = {n: block.meta.get(n, [None] * len(block.keys)) for n, _ in CROP}
    for row, key in enumerate(block.keys):
        scan.rows += 1
        if key in scan.where:
            other = scan.where[key][0]
            findings.fail("duplicate_key", f"key {key!r} in {block.file.path} already in file #{other}")
            continue
        scan.where[key] = (index, row)
        scan.crops[key] = {n: c[row] for n, c in crop_columns.items()}


# ---- integrity: the manifest as a whole ----------------------------------------------------------


def check_complete(cache: Cache, findings: Findings) -> None:
    m = cache.manifest
    if not m.get("complete", False):
        findings.fail("incomplete", "manifest says the run is incomplete")
    for shard, reason in (m.get("failed_shards") or {}).items():
        findings.fail("incomplete", f"shard {shard} failed: {reason}")
    for name, rec in (m.get("shards") or {}).items():  # a shard committed from a partial read (older caches)
        if rec.get("shard_status", "ok") != "ok":
            findings.fail("incomplete", f"shard {name} is {rec['shard_status']}: {rec.get('shard_error')}")


def check_counts(cache: Cache, findings: Findings) -> None:
    for name, rec in cache.manifest["shards"].items():
        if rec["input"] != rec["written"] + rec["failed"]:
            findings.fail(
                "counts", f"shard {name}: input {rec['input']} != written {rec['written']} + failed {rec['failed']}"
            )
        in_files = sum(f["rows"] for f in rec["files"])
        if in_files != rec["written"]:
            findings.fail("counts", f"shard {name}: files list {in_files} rows but {rec['written']} were written")


def error_keys(cache: Cache, findings: Findings) -> list[str]:
    try:
        return [k for k in cache.errors().column("key").to_pylist() if k is not None]
    except FileNotFoundError:
        findings.fail("missing_file", "_errors.parquet: absent")
    except Exception as exc:  # noqa: BLE001
        findings.fail("unreadable_file", f"_errors.parquet: {storage.describe(exc)}")
    return []


def check_input_keys(input_keys: list[str], scan: CacheScan, errors: list[str], findings: Findings) -> None:
    """Nothing lost (every input key is cached or an error row), nothing extra (no key from elsewhere)."""
    accounted = set(scan.where) | set(errors)
    missing = sorted(set(input_keys) - accounted)
    extra = sorted(set(scan.where) - set(input_keys))
    for key in missing:
        findings.fail("missing_key", f"input key {key!r} is neither in the cache nor in _errors")
    for key in extra:
        findings.fail("extra_key", f"cache key {key!r} is not in the input")
    findings.checks.append("input_keys")
