"""What a format stores: one part = same-shape rows of one shard, as codes, codec params and metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ...rows import CROP
from ..codecs import Codec, codec

META_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("caption", pa.string()), *CROP])
FILE_META_KEY = "latentcache"  # Parquet schema metadata / safetensors __metadata__ entry


@dataclass(frozen=True)
class PartData:
    """Rows of one part: `tensors` hold codes [N, ...] (VQ `codes` are integers, not codec codes),
    `params` the codec's arrays as `<tensor>.<param>` -> [N, C] float32, `meta` one row per key."""

    tensors: dict[str, np.ndarray]
    params: dict[str, np.ndarray]
    meta: pa.Table
    codec: str
    layout: str = "nested"

    @property
    def rows(self) -> int:
        return self.meta.num_rows

    @property
    def keys(self) -> list[str]:
        return self.meta.column("key").to_pylist()

    @property
    def shape(self) -> list[int]:
        """The latent shape [C, h, w] (a codes-only VQ part: [1, h, w])."""
        if "latent" in self.tensors:
            return list(self.tensors["latent"].shape[1:])
        return [1, *self.tensors["codes"].shape[1:]]

    def take(self, mask: list[bool]) -> PartData:
        rows = np.flatnonzero(np.asarray(mask, dtype=bool))
        return PartData(
            {n: t[rows] for n, t in self.tensors.items()},
            {n: p[rows] for n, p in self.params.items()},
            self.meta.take(pa.array(rows, pa.int64())),
            self.codec,
            self.layout,
        )

    def floats(self, name: str = "latent") -> np.ndarray:
        """A codec tensor decoded to float32 (what every reader gets back)."""
        params = {k.split(".", 1)[1]: v for k, v in self.params.items() if k.startswith(name + ".")}
        return self.get_codec().decode(self.tensors[name], params)

    def get_codec(self) -> Codec:
        return codec(self.codec)

    def file_meta(self) -> dict[str, Any]:
        from ..records import FORMAT_VERSION

        return {
            "format_version": FORMAT_VERSION,
            "codec": self.get_codec().describe(),
            "layout": self.layout,
            "tensors": {
                n: {"shape": list(t.shape[1:]), "dtype": np.dtype(t.dtype).name} for n, t in self.tensors.items()
            },
        }


def meta_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in META_SCHEMA} for r in rows], schema=META_SCHEMA)
