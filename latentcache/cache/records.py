"""What a cache records: its format version, the run identity, shard records and the manifest.

A shard record (one per input shard, in the commit log and its checkpoint = the shard table):
    shard, name, status ("committed" | "failed"), input, written, failed, fp32_fallback, nonfinite,
    duplicates, parts [{path, rows, latent_shape}], errors [error part paths], moments {count, mean, m2},
    shard_status, shard_error, checked (its keys went through the duplicate check)
Only committed records name part files; a failed record names only its error parts.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError

FORMAT_VERSION = 2
IDENTITY_KEYS = (
    "model_sha256",
    "model_class",
    "latent_space",
    "preprocess",
    "posterior",
    "seed",
    "store_dtype",
    "format",
    "tensor_layout",
    "vq_output",
    "store_posterior",
)
COUNTS = ("input", "written", "failed", "fp32_fallback")  # the manifest's `counts`: input = written + failed
COMMITTED, FAILED = "committed", "failed"


class StaleOutputError(UserError):
    """The output prefix holds a cache made with a different model, convention or preprocessing."""


class OldFormatError(StaleOutputError):
    """The prefix holds a cache in an earlier on-disk format."""


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [k for k in IDENTITY_KEYS if old.get(k) != new.get(k)]


def old_format_message(root: str, version: int) -> str:
    return (
        f"{root} holds a latentcache cache in format {version}; this version reads and writes format "
        f"{FORMAT_VERSION} (docs/cache-format.md). Re-encode into a new --output, or pass --overwrite "
        "to replace it"
    )


def committed(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records.values() if r.get("status") == COMMITTED]


def totals(records: dict[str, dict[str, Any]], names: tuple[str, ...] = COUNTS) -> dict[str, int]:
    rows = committed(records)
    return {name: sum(int(r.get(name) or 0) for r in rows) for name in names}


def failed_shards(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {r["shard"]: r.get("shard_error") or "failed" for r in records.values() if r.get("status") == FAILED}
