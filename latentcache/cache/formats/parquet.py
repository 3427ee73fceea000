"""Parquet parts: one row per key; tensors as columns, codec params as `<tensor>.<param>` columns.

Layouts of a tensor column (`--tensor-layout`):
- `nested` (default): variable-size nested lists, `list<list<list<T>>>`. The same Arrow type
  whatever the shape, so `datasets.load_dataset("parquet", data_dir=CACHE)` loads every cache,
  aspect-bucketed ones included (Hugging Face casts every file to the first file's type).
- `fixed_shape_tensor`: Arrow's canonical tensor extension type. `ray.data.read_parquet(CACHE)`
  and pyarrow give [B, C, h, w] ndarrays; Hugging Face `datasets` cannot load it (no equivalent).
Measured with datasets 5.2 / Ray 2.60: no single column type serves both (see docs/cache-format.md).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .base import FILE_META_KEY, META_SCHEMA, PartData


def nested_lists(arr: np.ndarray) -> pa.Array:
    """[N, d1, d2, ...] -> list<list<...<T>>> with every level variable-size."""
    out: pa.Array = pa.array(np.ascontiguousarray(arr).reshape(-1))
    rows = arr.shape[0]
    for size in reversed(arr.shape[1:]):
        count = len(out) // size
        out = pa.ListArray.from_arrays(pa.array(np.arange(count + 1, dtype=np.int32) * size), out)
    assert len(out) == rows
    return out


def fixed_shape_tensor(arr: np.ndarray) -> pa.Array:
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(arr))


TENSOR_LAYOUTS = {"nested": nested_lists, "fixed_shape_tensor": fixed_shape_tensor}


def column_to_numpy(column: pa.ChunkedArray | pa.Array, shape: list[int] | None = None) -> np.ndarray:
    """Any tensor layout (fixed_shape_tensor, fixed-size or variable nested lists) -> ndarray [N, ...]."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(column.type, pa.FixedShapeTensorType):
        return column.to_numpy_ndarray()
    values, sizes = column, []
    while (
        pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type) or pa.types.is_large_list(values.type)
    ):
        if pa.types.is_fixed_size_list(values.type):
            sizes.append(values.type.list_size)
        else:  # variable lists: a part holds one shape, so the first row's lengths are every row's
            sizes.append(values.value_lengths()[0].as_py() if len(values) else 0)
        values = values.flatten()
    dims = shape or sizes or [len(values) // max(len(column), 1)]
    return values.to_numpy(zero_copy_only=False).reshape(len(column), *dims)


class ParquetFormat:
    name, ext = "parquet", ".parquet"

    def write(self, part: PartData) -> bytes:
        build = TENSOR_LAYOUTS[part.layout]
        columns = {"key": part.meta.column("key"), "shard": part.meta.column("shard")}
        columns.update({name: build(arr) for name, arr in part.tensors.items()})
        columns.update({name: nested_lists(arr.astype(np.float32)) for name, arr in part.params.items()})
        columns.update({f.name: part.meta.column(f.name) for f in META_SCHEMA if f.name not in ("key", "shard")})
        table = pa.table(columns).replace_schema_metadata({FILE_META_KEY: json.dumps(part.file_meta())})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue()

    def read(self, data: bytes, tensors: tuple[str, ...] | None = None) -> PartData:
        table = pq.read_table(io.BytesIO(data))
        info = json.loads(table.schema.metadata[FILE_META_KEY.encode()])
        names = [n for n in info["tensors"] if tensors is None or n in tensors]
        arrays = {
            n: column_to_numpy(table.column(n), info["tensors"][n]["shape"]).astype(
                info["tensors"][n]["dtype"], copy=False
            )
            for n in names
        }
        params = {
            n: column_to_numpy(table.column(n)) for n in table.column_names if "." in n and n.split(".", 1)[0] in names
        }
        meta = table.select([f.name for f in META_SCHEMA]).cast(META_SCHEMA)
        return PartData(arrays, params, meta, info["codec"]["name"], info["layout"])

    def read_keys(self, data: bytes) -> list[str]:
        return pq.read_table(io.BytesIO(data), columns=["key"]).column("key").to_pylist()
