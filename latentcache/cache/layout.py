"""Every path under a cache's prefix: the only module that spells them (format version 2).

    data/<shard name>/part-<first row>-<id>.<ext>   the latents: final part files, written once
    __latentcache__/run.json                        identity of the run that owns the prefix
    __latentcache__/manifest.json                   identity, totals, pointer to the shard table
    __latentcache__/stats.json                      exact latent statistics of every committed row
    __latentcache__/errors/<id>.parquet             the errors dataset (one table: pq.read_table(dir))
    __latentcache__/log/                            commit log + checkpoints (the shard table)
    __latentcache__/index/                          cross-shard duplicate index

Why `__latentcache__`: Hugging Face `datasets` skips '.'- and '__'-prefixed folders but not a
single '_', and pyarrow/Ray skip '.' and '_': only '__' hides metadata from all of them while
staying visible to `ls`. A file under `data/` that no shard record names is not part of the cache.
"""

from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

from .. import storage

META = "__latentcache__"
DATA = "data"
V1_MARKERS = ("_state/run.json", "_manifest.json")  # what a format-1 cache has at its root


@dataclass(frozen=True)
class Layout:
    root: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials

    def url(self, relative: str) -> str:
        return storage.join(self.root, relative)

    def meta(self, *parts: str) -> str:
        return posixpath.join(META, *parts)

    @property
    def run(self) -> str:
        return self.meta("run.json")

    @property
    def manifest(self) -> str:
        return self.meta("manifest.json")

    @property
    def stats(self) -> str:
        return self.meta("stats.json")

    @property
    def errors_dir(self) -> str:
        return self.meta("errors")

    @property
    def log_url(self) -> str:
        return self.url(self.meta("log"))

    @property
    def index_url(self) -> str:
        return self.url(self.meta("index"))

    def part_path(self, name: str, first_index: int, ext: str, bucket: tuple[int, int] | None = None) -> str:
        """A new part's path; zero-padded first row, so that a listing and the duplicate index's
        keep-first order (shard, path) follow the rows' input order."""
        shape = f"{bucket[0]}x{bucket[1]}-" if bucket else ""
        return posixpath.join(DATA, name, f"part-{shape}{first_index:09d}-{uuid.uuid4().hex[:8]}{ext}")

    def errors_path(self) -> str:
        return posixpath.join(self.errors_dir, f"{uuid.uuid4().hex}.parquet")

    def read_bytes(self, relative: str) -> bytes:
        return storage.read_bytes(self.url(relative), self.storage_options)

    def write_bytes(self, relative: str, data: bytes) -> None:
        storage.write_bytes(self.url(relative), data, self.storage_options)

    def remove(self, relatives: list[str]) -> None:
        storage.remove([self.url(r) for r in relatives], self.storage_options)

    def listed(self, folder: str) -> list[str]:
        """Relative paths of the files under `folder` (one LIST per 1000 objects on a store)."""
        base = storage.url_to_fs(self.root, self.storage_options)[1].rstrip("/")
        return [
            posixpath.relpath(storage.url_to_fs(u, self.storage_options)[1], base)
            for u in storage.list_files(self.url(folder), self.storage_options)
        ]
