"""End of a run: the shard table (log checkpoint), `manifest.json` and `stats.json`, all bounded.

The manifest holds the identity, totals, the format version and pointers (shard table, errors,
data); its size does not grow with the shard count. Files whose content did not change are not
written again, so a rerun with nothing to do rewrites nothing.
"""

from __future__ import annotations

import json
from typing import Any

from .codecs import codec
from .commit import crash_point
from .layout import DATA, Layout
from .log import CommitLog
from .moments import Moments, merge_all, summary
from .records import FORMAT_VERSION, committed, failed_shards, totals


def merged_stats(records: dict[str, dict[str, Any]], space: dict[str, Any]) -> dict[str, Any] | None:
    """Merged in shard order, not commit order: floating-point merging depends on the order, and
    stats.json must be a function of the committed shards (a no-op rerun leaves it untouched)."""
    in_shard_order = dict(sorted(records.items()))
    moments = merge_all(Moments.from_dict(r["moments"]) for r in committed(in_shard_order) if r.get("moments"))
    if moments is None:
        return None
    return {
        **summary(moments),
        "describes": "raw latents (stored values with the latent-space convention undone)",
        "latent_space": space,
        "moments": moments.to_dict(),
    }


def write_if_changed(layout: Layout, relative: str, doc: dict[str, Any]) -> None:
    data = json.dumps(doc, indent=2, sort_keys=True).encode()
    try:
        if layout.read_bytes(relative) == data:
            return
    except FileNotFoundError:
        pass
    layout.write_bytes(relative, data)


def relative_to(layout: Layout, url: str) -> str:
    return url[len(layout.root.rstrip("/")) + 1 :] if url.startswith(layout.root.rstrip("/")) else url


def write_run_outputs(layout: Layout, commit_log: CommitLog, run: dict[str, Any], planned: list[str]) -> dict[str, Any]:
    """Checkpoints the log and writes manifest and stats; returns counts, failed shards and completeness."""
    records = commit_log.state()
    table = relative_to(layout, commit_log.checkpoint())
    crash_point("checkpoint")
    failed = {s: reason for s, reason in failed_shards(records).items() if s in set(planned)}
    missing = [s for s in planned if s not in records]
    failed.update(dict.fromkeys(missing, "shard never completed (rows missing from the pipeline)"))
    counts, extra = totals(records), totals(records, ("nonfinite", "duplicates"))
    stats = merged_stats(records, run["latent_space"])
    if stats is not None:
        write_if_changed(layout, layout.stats, stats)
    manifest = {
        **run,
        "format_version": FORMAT_VERSION,
        "counts": counts,
        "complete": not failed,
        "precision": {
            "dtype": run.get("dtype"),
            "compute_dtype": run.get("compute_dtype"),
            "fp32_fallback": counts["fp32_fallback"],
            "nonfinite": extra["nonfinite"],
        },
        "duplicates": extra["duplicates"],
        "codec": codec(run["store_dtype"]).describe(),
        "committed_shards": len(committed(records)),
        "failed_shards": failed,
        "shard_table": table,
        "errors": layout.errors_dir,
        "data": DATA,
    }
    write_if_changed(layout, layout.manifest, manifest)
    return {"counts": counts, "failed_shards": failed, "complete": not failed, "committed": len(committed(records))}
