"""What was run and what was written: the run identity, shard records, `_manifest.json`.

Layout under the output prefix:
    _state/run.json              the identity of the run that owns this prefix (stale-output check)
    _state/shards/<name>.json    one record per committed shard (the resume unit)
    _state/errors/<name>.parquet error rows per committed shard
    _state/keys/<name>.parquet   the keys a shard's commit kept (the cross-shard duplicate check)
    _staging/                    fragments of shards in flight; removed at start and end
    _manifest.json, _errors.parquet, _stats.json   written at the end of every run
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from typing import Any

from . import storage
from .errors import UserError

IDENTITY_KEYS = ("model_sha256", "model_class", "latent_space", "preprocess", "posterior", "seed",
                 "store_dtype", "format", "tensor_layout", "vq_output", "store_posterior")


class StaleOutputError(UserError):
    """The output prefix holds a cache made with a different model, convention or preprocessing."""


@dataclass(frozen=True)
class CacheLayout:
    output: str
    storage_options: dict[str, Any] = field(repr=False)  # may hold credentials

    def url(self, *parts: str) -> str:
        return storage.join(self.output, *parts)

    @property
    def staging(self) -> str:
        return self.url("_staging")

    def record_url(self, name: str) -> str:
        return self.url("_state", "shards", name + ".json")

    def read_json(self, *parts: str) -> Any:
        return json.loads(storage.read_bytes(self.url(*parts), self.storage_options))

    def write_json(self, data: Any, *parts: str) -> None:
        storage.write_bytes(self.url(*parts), json.dumps(data, indent=2, sort_keys=True).encode(), self.storage_options)

    def committed_records(self) -> dict[str, dict[str, Any]]:
        """Shard id -> record, for every shard already committed under this prefix."""
        records = {}
        for url in storage.list_files(self.url("_state", "shards"), self.storage_options):
            if url.endswith(".json"):
                record = json.loads(storage.read_bytes(url, self.storage_options))
                records[record["shard"]] = record
        return records

    def clear_staging(self) -> None:
        """Removes the fragments of shards in flight and any partial file a killed writer left."""
        storage.remove_tree(self.staging, self.storage_options)
        storage.remove_partial_files(self.output, self.storage_options)


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [k for k in IDENTITY_KEYS if old.get(k) != new.get(k)]


def claim_output(layout: CacheLayout, identity: dict[str, Any], *, overwrite: bool) -> None:
    """Refuses a prefix made differently (unless overwrite, which clears it); records our identity."""
    if storage.exists(layout.url("_state", "run.json"), layout.storage_options):
        old = layout.read_json("_state", "run.json")
        diff = identity_diff(old, identity)
        if diff and not overwrite:
            raise StaleOutputError(
                f"{layout.output} already holds a cache made with a different {', '.join(diff)}; "
                "use another --output, or --overwrite to replace it")
        if diff:
            remove_cache(layout)
    layout.write_json(identity, "_state", "run.json")


def remove_cache(layout: CacheLayout) -> None:
    """Deletes what an earlier run wrote (its shard files and state), nothing else under the prefix."""
    records = layout.committed_records().values()
    files = [layout.url(f["path"]) for r in records for f in r["files"]]
    files += [layout.url(n) for n in ("_manifest.json", "_errors.parquet", "_stats.json")]
    files += storage.list_files(layout.url("_state"), layout.storage_options)
    storage.remove(files, layout.storage_options)
    layout.clear_staging()


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("latentcache", "torch", "diffusers", "ray", "pyarrow", "safetensors", "fsspec", "pillow", "numpy")
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions
