"""The rows that flow between stages, as Arrow schemas: the contract between modules.

    raw      (sources)    key, shard, index, image, caption, error, shard_rows, shard_status
    pixels   (preprocess) raw - image + pixels, height, width, original_*, crop_*, bucket_*
    encoded  (encode)     pixels - pixels + latent, posterior_mean, posterior_std, codes, latent_flipped,
                          latent_shape, fallback

Every stage passes every row through, error rows and each shard's marker row included, so the
driver can reconcile counts per shard. Tensors travel as raw bytes plus a shape: rows of
different shapes (aspect buckets) and null rows (errors) share one block without extension types.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

PASSTHROUGH = [
    ("key", pa.string()),
    ("shard", pa.string()),
    ("index", pa.int64()),
    ("caption", pa.string()),
    ("error", pa.string()),
    ("shard_rows", pa.int64()),  # marker rows only: samples in the shard
    ("shard_status", pa.string()),  # marker rows only: "ok", "damaged" (container cut; rows kept), "failed"
]
CROP = [
    ("original_height", pa.int32()),
    ("original_width", pa.int32()),
    ("crop_top", pa.int32()),
    ("crop_left", pa.int32()),
    ("crop_left_flipped", pa.int32()),  # crop_left of the mirrored image: SDXL's crop coords for latent_flipped
    ("bucket_height", pa.int32()),  # the crop's size: SDXL's target_size
    ("bucket_width", pa.int32()),
]
RAW_SCHEMA = pa.schema(PASSTHROUGH[:3] + [("image", pa.binary())] + PASSTHROUGH[3:])
PIXEL_SCHEMA = pa.schema(PASSTHROUGH + CROP + [("pixels", pa.binary()), ("height", pa.int32()), ("width", pa.int32())])
TENSOR_COLUMNS = ("latent", "posterior_mean", "posterior_std", "codes", "latent_flipped")
ENCODED_SCHEMA = pa.schema(
    PASSTHROUGH
    + CROP
    + [(name, pa.binary()) for name in TENSOR_COLUMNS]
    + [("latent_shape", pa.list_(pa.int32())), ("store_dtype", pa.string()), ("fallback", pa.string())]
)


def is_marker(table: pa.Table) -> np.ndarray:
    """Boolean mask of the marker rows (one per shard, after its samples)."""
    return table.column("key").is_null().to_numpy(zero_copy_only=False)


def good_mask(table: pa.Table) -> np.ndarray:
    """Rows that carry a sample without an error."""
    errors = table.column("error").is_null().to_numpy(zero_copy_only=False)
    return errors & ~is_marker(table)


def carry(table: pa.Table, schema: pa.Schema, new: dict[str, pa.Array]) -> pa.Table:
    """Builds the next stage's table: columns from `new`, the rest passed through (or null)."""
    columns = []
    for f in schema:
        if f.name in new:
            columns.append(pa.array(new[f.name], type=f.type) if not isinstance(new[f.name], pa.Array) else new[f.name])
        elif f.name in table.column_names:
            columns.append(table.column(f.name).cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


# ---- whole-column moves: Arrow/numpy instead of Python loops over rows ----------------------


def stack_binary(
    column: pa.ChunkedArray | pa.Array, rows: np.ndarray, shape: tuple[int, ...], dtype: Any = np.uint8
) -> np.ndarray:
    """The rows' equal-sized binary values as one writable [n, *shape] array: one copy in Arrow, no per-row Python."""
    picked = column.take(pa.array(rows, pa.int64()))
    picked = picked.combine_chunks() if isinstance(picked, pa.ChunkedArray) else picked
    offsets = np.frombuffer(picked.buffers()[1], dtype=np.int32)[picked.offset : picked.offset + len(picked) + 1]
    data = np.frombuffer(picked.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.view(dtype).reshape(len(rows), *shape).copy()


def binary_rows(arr: np.ndarray) -> pa.BinaryArray:
    """[n, ...] array -> n binary values, each one row's bytes, built from the array's buffer in one go."""
    arr = np.ascontiguousarray(arr)
    n = arr.shape[0]
    row_bytes = arr.nbytes // n if n else 0
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * row_bytes).tobytes())
    return pa.BinaryArray.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(arr.reshape(-1).view(np.uint8))])


def scatter_rows(values: pa.Array, rows: np.ndarray, n: int) -> pa.Array:
    """An n-row column holding values[j] at rows[j] and null elsewhere (Arrow's take, no per-row Python)."""
    where = np.full(n, len(values), dtype=np.int64)
    where[rows] = np.arange(len(rows))
    return pa.concat_arrays([values, pa.nulls(1, values.type)]).take(pa.array(where))
