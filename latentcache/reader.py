"""Reading a cache back: the manifest, its files, and their rows, for stats, audit and training.

Whatever wrote the cache (Parquet in either layout, or safetensors), a reader gets the same
thing: `CacheFile` entries from the manifest and, per file, a `LatentBlock` of stacked arrays in
the stored space plus per-row metadata. `LatentSpace` from the manifest undoes the scaling.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .errors import UserError
from .latent_space import LatentSpace
from .rows import CROP, TENSOR_COLUMNS
from .sinks import column_to_numpy

META_COLUMNS = ("key", "shard", "caption", *(name for name, _ in CROP))


class CacheError(UserError):
    """The cache is missing, incomplete or unreadable; the message says which part."""


@dataclass(frozen=True)
class CacheFile:
    path: str  # relative to the cache root
    shard: str
    rows: int
    latent_shape: tuple[int, ...]


@dataclass(frozen=True)
class LatentBlock:
    """One cache file, decoded: tensors [N, ...] in the stored space, and metadata per row."""

    file: CacheFile
    tensors: dict[str, np.ndarray]
    meta: dict[str, list]

    @property
    def keys(self) -> list[str]:
        return self.meta["key"]


class Cache:
    """A latent cache at an fsspec URL, described by its `_manifest.json`."""

    def __init__(self, root: str, *, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root.rstrip("/")
        self.storage_options = storage_options or {}
        try:
            self.manifest = json.loads(storage.read_bytes(self.url("_manifest.json"), self.storage_options))
        except FileNotFoundError:
            raise CacheError(f"{root} has no _manifest.json: not a latentcache output, or its run never finished") from None
        self.space = LatentSpace.from_dict(self.manifest["latent_space"])
        self.format = self.manifest["format"]

    def url(self, relative: str) -> str:
        return storage.join(self.root, relative)

    @property
    def files(self) -> list[CacheFile]:
        return [CacheFile(f["path"], shard["shard"], f["rows"], tuple(f["latent_shape"]))
                for shard in self.manifest["shards"].values() for f in shard["files"]]

    @property
    def has_posterior(self) -> bool:
        return bool(self.manifest.get("store_posterior"))

    def read(self, file: CacheFile, columns: tuple[str, ...] = TENSOR_COLUMNS) -> LatentBlock:
        data = storage.read_bytes(self.url(file.path), self.storage_options)
        return READERS[self.format](file, data, columns)

    def blocks(self, columns: tuple[str, ...] = TENSOR_COLUMNS) -> Iterator[LatentBlock]:
        for file in self.files:
            yield self.read(file, columns)

    def errors(self) -> pa.Table:
        return pq.read_table(io.BytesIO(storage.read_bytes(self.url("_errors.parquet"), self.storage_options)))


def read_parquet_block(file: CacheFile, data: bytes, columns: tuple[str, ...]) -> LatentBlock:
    table = pq.read_table(io.BytesIO(data))
    tensors = {name: column_to_numpy(table.column(name)) for name in columns if name in table.column_names}
    meta = {name: table.column(name).to_pylist() for name in META_COLUMNS if name in table.column_names}
    return LatentBlock(file, tensors, meta)


def read_safetensors_block(file: CacheFile, data: bytes, columns: tuple[str, ...]) -> LatentBlock:
    import torch
    from safetensors.torch import load

    header_rows = json.loads(_safetensors_metadata(data)["rows"])
    loaded = load(data)
    tensors = {}
    for name in columns:
        if name in loaded:
            t = loaded[name]
            tensors[name] = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    meta = {name: [r.get(name) for r in header_rows] for name in META_COLUMNS if name != "shard"}
    meta["shard"] = [file.shard] * len(header_rows)
    return LatentBlock(file, tensors, meta)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__", {})


READERS = {"parquet": read_parquet_block, "safetensors": read_safetensors_block}
