"""Who owns an output prefix: the run identity in `run.json`; stale and old-format caches refused."""

from __future__ import annotations

import json
from typing import Any

from .. import storage
from .layout import DATA, META, V1_MARKERS, Layout
from .records import FORMAT_VERSION, OldFormatError, StaleOutputError, identity_diff, old_format_message


def read_json(layout: Layout, relative: str) -> dict[str, Any] | None:
    try:
        return json.loads(layout.read_bytes(relative))
    except FileNotFoundError:
        return None


def old_version(layout: Layout) -> int | None:
    """1 when the prefix holds a format-1 cache (`_state/` + `_manifest.json` at the root), else None."""
    return 1 if any(storage.exists(layout.url(m), layout.storage_options) for m in V1_MARKERS) else None


def claim_output(layout: Layout, identity: dict[str, Any], *, overwrite: bool) -> None:
    """Refuses a prefix made differently or in another format (unless overwrite, which clears it)."""
    run = {**identity, "format_version": FORMAT_VERSION}
    old = read_json(layout, layout.run)
    if old is None and (version := old_version(layout)) is not None:
        if not overwrite:
            raise OldFormatError(old_format_message(layout.root, version))
        remove_v1(layout)
    elif old is not None and (diff := identity_diff(old, identity)):
        if not overwrite:
            raise StaleOutputError(
                f"{layout.root} already holds a cache made with a different {', '.join(diff)}; "
                "use another --output, or --overwrite to replace it"
            )
        remove_cache(layout)
    if old != run:
        layout.write_bytes(layout.run, json.dumps(run, indent=2, sort_keys=True).encode())


def remove_cache(layout: Layout) -> None:
    """Deletes what earlier runs wrote (data/ and the metadata folder), nothing else under the prefix."""
    layout.remove([p for folder in (DATA, META) for p in layout.listed(folder)])


def remove_v1(layout: Layout) -> None:
    """Deletes a format-1 cache: the files its shard records name, its state and its run outputs."""
    state = layout.listed("_state")
    records = [json.loads(layout.read_bytes(p)) for p in state if p.startswith("_state/shards/")]
    files = [f["path"] for r in records for f in r.get("files", [])]
    layout.remove(files + state + layout.listed("_staging") + ["_manifest.json", "_errors.parquet", "_stats.json"])
