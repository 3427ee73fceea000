"""End of a run: merge per-shard records into `_manifest.json`, `_errors.parquet` and `_stats.json`."""

from __future__ import annotations

import io
import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .config import EncodeConfig, public_dict
from .manifest import CacheLayout, library_versions
from .sinks import ERRORS_SCHEMA, parquet_bytes
from .sources import ShardRef
from .stats import Moments, merge_all, summary

log = logging.getLogger(__name__)


def fragment_keys(urls: list[str], storage_options: dict[str, Any]) -> list[dict[str, Any]]:
    """The keys (and row errors) a failed shard's fragments hold: what was read before it failed."""
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u, storage_options)), columns=["key", "index", "error"])
              for u in urls]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    return sorted((r for r in rows if r["key"] is not None), key=lambda r: r["index"])


def failed_shard_errors(failed: dict[str, str], known: dict[str, list[dict[str, Any]]]) -> pa.Table:
    """Each failed shard: one row naming it (key null), then one per key read before it failed."""
    rows = []
    for shard, reason in sorted(failed.items()):
        rows.append({"key": None, "shard": shard, "reason": f"shard failed: {reason}"})
        rows += [{"key": r["key"], "shard": shard,
                  "reason": f"shard failed: {reason}" + (f"; this sample: {r['error']}" if r["error"] else "")}
                 for r in known.get(shard, [])]
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)


def merged_errors(layout: CacheLayout, records: dict[str, dict[str, Any]]) -> pa.Table:
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(layout.url("_state", "errors", r["name"] + ".parquet"),
                                                          layout.storage_options)))
              for r in sorted(records.values(), key=lambda r: r["name"])]
    return pa.concat_tables([ERRORS_SCHEMA.empty_table(), *tables]).cast(ERRORS_SCHEMA)


def merged_stats(records: dict[str, dict[str, Any]], space: dict[str, Any]) -> dict[str, Any] | None:
    moments = merge_all(Moments.from_dict(r["moments"]) for r in records.values() if r.get("moments"))
    if moments is None:
        return None
    return {**summary(moments), "describes": "raw latents (stored values with the latent-space convention undone)",
            "latent_space": space, "moments": moments.to_dict()}


def run_counts(records: dict[str, dict[str, Any]],
               names: tuple[str, ...] = ("input", "written", "failed", "fp32_fallback")) -> dict[str, int]:
    rows = records.values()
    return {name: sum(r.get(name, 0) for r in rows) for name in names}


def write_run_outputs(layout: CacheLayout, cfg: EncodeConfig, identity: dict[str, Any], shards: list[ShardRef],
                      records: dict[str, dict[str, Any]], failed: dict[str, str], seconds: float,
                      known: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Writes the manifest, errors (failed shards' rows included) and stats; returns the run summary."""
    errors = pa.concat_tables([merged_errors(layout, records), failed_shard_errors(failed, known or {})])
    storage.write_bytes(layout.url("_errors.parquet"), parquet_bytes(errors), layout.storage_options)
    stats = merged_stats(records, identity["latent_space"])
    if stats is not None:
        layout.write_json(stats, "_stats.json")
    counts = run_counts(records)
    manifest = {
        **identity,
        "config": public_dict(cfg),
        "versions": library_versions(),
        "counts": counts,
        # rows whose batch was re-run in fp32 after NaN/Inf, and rows still non-finite (in _errors.parquet)
        "precision": {"dtype": cfg.dtype, "compute_dtype": identity.get("compute_dtype"),
                      **run_counts(records, ("fp32_fallback", "nonfinite"))},
        "complete": not failed and len(records) == len(shards),
        "shards": {r["name"]: {k: r.get(k) for k in ("shard", "input", "written", "failed", "fp32_fallback", "nonfinite", "files",
                                                      "shard_status", "shard_error")}
                   for r in sorted(records.values(), key=lambda r: r["name"])},
        "failed_shards": failed,
    }
    layout.write_json(manifest, "_manifest.json")
    return {"output": cfg.output, "manifest": layout.url("_manifest.json"), "stats": layout.url("_stats.json"),
            "errors": layout.url("_errors.parquet"), "shards": len(shards), "committed": len(records),
            "failed_shards": failed, "counts": counts, "complete": manifest["complete"], "seconds": round(seconds, 2)}
