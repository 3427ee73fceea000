"""Reading a cache back (stats, audit, the training readers): through its records, never a listing.

`Cache.files` are the part files the shard table names; `Cache.read` gives a `LatentBlock` of
stacked arrays in the stored space (codec values as numpy can hold them: bf16 as float32) plus
per-row metadata. `LatentSpace` from the manifest undoes the scaling.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from ..latent_space import LatentSpace
from ..rows import CROP, TENSOR_COLUMNS
from .claim import old_version, read_json
from .formats import get_format
from .layout import Layout
from .log import CommitLog
from .records import FORMAT_VERSION, committed, old_format_message
from .writer import ERRORS_SCHEMA

META_COLUMNS = ("key", "shard", "caption", *(name for name, _ in CROP))


class CacheError(UserError, RuntimeError):
    """The cache is missing, incomplete, in another format or unreadable; the message says which."""


@dataclass(frozen=True)
class CacheFile:
    path: str  # relative to the cache root
    shard: str
    rows: int
    latent_shape: tuple[int, ...]


@dataclass(frozen=True)
class LatentBlock:
    """One part file, decoded: tensors [N, ...] in the stored space, and metadata per row."""

    file: CacheFile
    tensors: dict[str, np.ndarray]
    meta: dict[str, list]

    @property
    def keys(self) -> list[str]:
        return self.meta["key"]


class Cache:
    """A latent cache at an fsspec URL: its manifest and its shard table (the committed records)."""

    def __init__(self, root: str, *, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root.rstrip("/")
        self.storage_options = storage_options or {}
        self.layout = Layout(self.root, self.storage_options)
        manifest = read_json(self.layout, self.layout.manifest)
        if manifest is None:
            version = old_version(self.layout)
            raise CacheError(
                old_format_message(root, version)
                if version
                else f"{root} has no {self.layout.manifest}: not a latentcache output, or its run never finished"
            )
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CacheError(old_format_message(root, manifest.get("format_version")))
        self.all_records = CommitLog(url=self.layout.log_url, storage_options=self.storage_options).state()
        self.records = {r["shard"]: r for r in committed(self.all_records)}
        # `shards` by output name, as format 1's manifest listed them (audit and data read it there)
        self.manifest = {**manifest, "shards": {r["name"]: {**r, "files": r["parts"]} for r in self.records.values()}}
        self.space = LatentSpace.from_dict(manifest["latent_space"])
        self.format = manifest["format"]

    def url(self, relative: str) -> str:
        return self.layout.url(relative)

    @property
    def files(self) -> list[CacheFile]:
        return [
            CacheFile(p["path"], r["shard"], p["rows"], tuple(p["latent_shape"]))
            for r in sorted(self.records.values(), key=lambda r: r["shard"])
            for p in r["parts"]
        ]

    @property
    def has_posterior(self) -> bool:
        return bool(self.manifest.get("store_posterior"))

    def read(self, file: CacheFile, columns: tuple[str, ...] = TENSOR_COLUMNS) -> LatentBlock:
        part = get_format(self.format).read(self.layout.read_bytes(file.path), columns)
        store = part.get_codec()
        tensors = {
            n: t
            if n == "codes"
            else store.as_array(t, {k.split(".", 1)[1]: v for k, v in part.params.items() if k.startswith(n + ".")})
            for n, t in part.tensors.items()
        }
        return LatentBlock(file, tensors, {n: part.meta.column(n).to_pylist() for n in META_COLUMNS})

    def blocks(self, columns: tuple[str, ...] = TENSOR_COLUMNS) -> Iterator[LatentBlock]:
        for file in self.files:
            yield self.read(file, columns)

    def errors(self) -> pa.Table:
        """Every error row of the committed and failed shards, as one table."""
        paths = sorted({p for r in self.all_records.values() for p in r.get("errors", [])})
        tables = [pq.read_table(io.BytesIO(self.layout.read_bytes(p))) for p in paths]
        return pa.concat_tables([ERRORS_SCHEMA.empty_table(), *tables]).cast(ERRORS_SCHEMA)
