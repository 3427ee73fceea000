"""Keep-first across and within shards: the index finds later copies, parts are copied without them.

Order of the steps (each survives a SIGKILL before the next):
1. `check_duplicates` indexes the parts of records not yet `checked` and answers {part: {key:
   keeper}}, also remembering the answer as pending in the index;
2. each part holding dropped keys is written again under a NEW name without them (plus an errors
   part for the dropped rows); nothing a reader sees changes yet;
3. one log append: the records name the new parts, say `checked`, and map old -> new (`replaced`);
4. the index is told (`apply_drops`), then the old parts are deleted.
A kill after 2 leaves unnamed files (the next run deletes them, and redoes 1-4 with the same
answer); a kill after 3 is finished by the next run from `replaced`.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import uuid
from typing import Any

import pyarrow as pa

from ..latent_space import LatentSpace
from .commit import crash_point, read_part_keys
from .formats import drop_rows, get_format
from .index import Duplicates, PartRef, apply_drops, check_duplicates
from .layout import Layout
from .log import CommitLog
from .moments import Moments, merge_all
from .records import committed
from .writer import ERRORS_SCHEMA, parquet_bytes, part_moments

log = logging.getLogger(__name__)
DUPLICATE_REASON = "duplicate key across shards: kept the first copy, in shard {keeper}"
SAME_SHARD_REASON = "duplicate key in shard: kept the first copy"
INDEX_PARTITIONS = 64


def renamed(path: str) -> str:
    """The copy's name: the same sort position (shard, first row) as the original, a new id."""
    stem, ext = posixpath.splitext(path)
    return f"{stem.rsplit('-', 1)[0]}-{uuid.uuid4().hex[:8]}{ext}"


def dropped_rows(record: dict[str, Any], keys: list[str], keep: list[bool], found: dict[str, str]) -> list[dict]:
    return [
        {
            "key": k,
            "shard": record["shard"],
            "reason": SAME_SHARD_REASON if found[k] == record["shard"] else DUPLICATE_REASON.format(keeper=found[k]),
        }
        for k, kept in zip(keys, keep)
        if not kept
    ]


def drop_from_part(
    layout: Layout, fmt: str, space: LatentSpace, record: dict[str, Any], entry: dict[str, Any], found: Duplicates
) -> tuple[dict[str, Any] | None, list[dict]]:
    """Step 2 for one part: its copy without the dropped keys (None when nothing stays) and the error rows."""
    data = layout.read_bytes(entry["path"])
    keys = get_format(fmt).read_keys(data)
    keep = found.keep_mask(entry["path"], keys)
    errors = dropped_rows(record, keys, keep, found[entry["path"]])
    if not any(keep):
        return None, errors
    new, part = drop_rows(get_format(fmt), data, keep)
    path = renamed(entry["path"])
    layout.write_bytes(path, new)
    return {**entry, "path": path, "rows": part.rows, "moments": part_moments(part, space)}, errors


def drop_from_record(
    layout: Layout,
    fmt: str,
    space: LatentSpace,
    record: dict[str, Any],
    found: Duplicates,
    replaced: dict[str, str | None],
) -> dict[str, Any]:
    parts, errors = [], []
    for entry in record["parts"]:
        if entry["path"] not in found:
            parts.append(entry)
            continue
        new, rows = drop_from_part(layout, fmt, space, record, entry, found)
        replaced[entry["path"]] = new["path"] if new else None
        parts += [new] if new else []
        errors += rows
    paths = list(record.get("errors", []))
    if errors:
        paths.append(layout.errors_path())
        layout.write_bytes(paths[-1], parquet_bytes(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA)))
    moments = merge_all(Moments.from_dict(p["moments"]) for p in parts if p.get("moments"))
    return {
        **record,
        "parts": parts,
        "errors": paths,
        "written": sum(p["rows"] for p in parts),
        "failed": record["failed"] + len(errors),
        "duplicates": record.get("duplicates", 0) + len(errors),
        "moments": moments.to_dict() if moments else None,
        "checked": True,
        "replaced": {o: n for o, n in replaced.items() if o in {e["path"] for e in record["parts"]}},
    }


def settle_duplicates(
    layout: Layout, commit_log: CommitLog, *, fmt: str, space: dict[str, Any], after_kill: bool
) -> int:
    """Steps 1-4 for every committed record not yet checked; returns how many keys were dropped."""
    records = commit_log.state()
    unchecked = [r for r in committed(records) if not r.get("checked")]
    if not unchecked and not after_kill:
        return 0
    read_keys = functools.partial(read_part_keys, layout.root, layout.storage_options, fmt)
    found = check_duplicates(
        url=layout.index_url,
        storage_options=layout.storage_options,
        read_keys=read_keys,
        new=[PartRef(r["shard"], p["path"]) for r in unchecked for p in r["parts"]],
        partitions=INDEX_PARTITIONS,
    )
    owner = {p["path"]: r for r in committed(records) for p in r["parts"]}
    replaced: dict[str, str | None] = {}
    finished = {old: new for r in committed(records) for old, new in r.get("replaced", {}).items() if old in found}
    touched = {owner[path]["shard"]: owner[path] for path in found if path in owner}
    updated = [
        drop_from_record(layout, fmt, LatentSpace.from_dict(space), r, found, replaced) for r in touched.values()
    ]
    updated += [{**r, "checked": True} for r in unchecked if r["shard"] not in touched]
    crash_point("duplicates-copied")
    if updated:
        commit_log.append(updated)
        crash_point("duplicates-logged")
    if replaced or finished:
        apply_drops(url=layout.index_url, storage_options=layout.storage_options, replaced={**finished, **replaced})
        layout.remove(sorted(replaced))
    dropped = sum(r["duplicates"] - touched[r["shard"]].get("duplicates", 0) for r in updated if r["shard"] in touched)
    if dropped:
        log.warning("%d row(s) held keys already kept elsewhere; recorded in the errors table", dropped)
    return dropped
