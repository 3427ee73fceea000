"""Writing the cache: fragments per task, then one committed file per input shard.

As in Ray Data's `Datasink`, tasks write their own output and the driver commits:
1. `write_fragments` (a CPU task after the encoder) writes each block's rows, per shard, to a
   staging fragment and returns one small metadata row per fragment;
2. once the driver has seen every row of a shard (its marker says how many), `commit_shard`
   merges the shard's fragments into its final file (one atomic PUT/rename), writes its error
   rows, computes its statistics and deletes the fragments.
No reader ever sees a half-written file, and a shard is either committed whole or not at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .latent_space import LatentSpace
from .rows import CROP, ENCODED_SCHEMA, TENSOR_COLUMNS, is_marker
from .stats import Moments, merge_all

ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("reason", pa.string())])
FRAGMENT_META = pa.schema([
    ("shard", pa.string()), ("fragment", pa.string()), ("rows", pa.int64()),
    ("shard_rows", pa.int64()), ("shard_status", pa.string()), ("shard_error", pa.string()),
])
NONFINITE_REASON = "non-finite latent"  # how encode.py's error rows for NaN/Inf latents begin
NUMPY_STORE = {"fp16": np.float16, "fp32": np.float32, "bf16": np.int16}  # bf16 travels as its bit pattern


def shard_dir(staging: str, shard: str) -> str:
    return storage.join(staging, hashlib.sha1(shard.encode()).hexdigest()[:20])


def write_fragments(table: pa.Table, *, staging: str, storage_options: dict[str, Any]) -> pa.Table:
    """Writes the block's rows per shard to staging; returns one metadata row per fragment."""
    meta: list[dict[str, Any]] = []
    shards = table.column("shard").to_pylist()
    for shard in dict.fromkeys(shards):
        part = table.filter(pa.array([s == shard for s in shards]))
        url = storage.join(shard_dir(staging, shard), f"{uuid.uuid4().hex}.parquet")
        storage.write_bytes(url, parquet_bytes(part), storage_options)
        markers = part.filter(pa.array(is_marker(part)))
        marker = markers.to_pylist()[0] if markers.num_rows else {}
        meta.append({"shard": shard, "fragment": url, "rows": part.num_rows - markers.num_rows,
                     "shard_rows": marker.get("shard_rows"), "shard_status": marker.get("shard_status"),
                     "shard_error": marker.get("error")})
    return pa.Table.from_pylist(meta, schema=FRAGMENT_META)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


# ---- the latent column layouts ---------------------------------------------------------------


def fixed_shape_tensor_array(arr: np.ndarray) -> pa.Array:
    """The canonical Arrow extension type: ray.data.read_parquet gives [B, C, h, w] batches."""
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(arr))


def nested_list_array(arr: np.ndarray) -> pa.Array:
    """Nested fixed-size lists: Hugging Face datasets loads them; with_format('torch') gives [C, h, w]."""
    out: pa.Array = pa.array(np.ascontiguousarray(arr).reshape(-1))
    for size in reversed(arr.shape[1:]):
        out = pa.FixedSizeListArray.from_arrays(out, size)
    return out


TENSOR_LAYOUTS: dict[str, Callable[[np.ndarray], pa.Array]] = {
    "fixed_shape_tensor": fixed_shape_tensor_array,
    "nested": nested_list_array,
}


def column_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Either layout back to an ndarray [N, ...]."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(column.type, pa.FixedShapeTensorType):
        return column.to_numpy_ndarray()
    shape = []
    values = column
    while pa.types.is_fixed_size_list(values.type):
        shape.append(values.type.list_size)
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(len(column), *shape)


# ---- output formats --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRows:
    """One shape group of a shard, decoded: what a format writer stores."""

    tensors: dict[str, np.ndarray]  # latent [N, C, h, w] and friends, in the storage dtype
    rows: list[dict[str, Any]]  # key, shard, caption, original_*, crop_*, fallback
    store_dtype: str


def write_parquet(group: ShardRows, layout: str) -> bytes:
    columns: dict[str, pa.Array] = {"key": pa.array([r["key"] for r in group.rows], pa.string()),
                                    "shard": pa.array([r["shard"] for r in group.rows], pa.string())}
    for name, arr in group.tensors.items():
        columns[name] = TENSOR_LAYOUTS[layout](arr)
    columns["caption"] = pa.array([r["caption"] for r in group.rows], pa.string())
    for name, kind in CROP:
        columns[name] = pa.array([r[name] for r in group.rows], kind)
    return parquet_bytes(pa.table(columns))


def write_safetensors(group: ShardRows, layout: str) -> bytes:
    import torch
    from safetensors.torch import save

    def as_torch(name: str, arr: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
        return tensor.view(torch.bfloat16) if group.store_dtype == "bf16" and name != "codes" else tensor

    rows = [{k: r[k] for k in ("key", "caption", *(n for n, _ in CROP))} for r in group.rows]
    metadata = {"keys": json.dumps([r["key"] for r in group.rows]), "rows": json.dumps(rows),
                "shard": group.rows[0]["shard"] if group.rows else ""}
    return save({name: as_torch(name, arr) for name, arr in group.tensors.items()}, metadata=metadata)


FORMATS: dict[str, tuple[str, Callable[[ShardRows, str], bytes]]] = {
    "parquet": (".parquet", write_parquet),
    "safetensors": (".safetensors", write_safetensors),
}


# ---- commit: fragments -> one file per shard (and shape) -------------------------------------


def read_fragments(urls: list[str], storage_options: dict[str, Any]) -> pa.Table:
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u, storage_options))) for u in urls]
    table = pa.concat_tables(tables) if tables else ENCODED_SCHEMA.empty_table()
    table = table.filter(pa.array(~is_marker(table))) if table.num_rows else table
    return table.sort_by("index") if table.num_rows else table


def split_duplicates(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Keep the first row of each key (by index); the rest become error rows."""
    first: dict[str, int] = {}
    kept, dups = [], []
    for row in rows:
        if row["key"] in first:
            dups.append({**row, "error": f"duplicate key in shard (first at index {first[row['key']]}); kept the first"})
        else:
            first[row["key"]] = row["index"]
            kept.append(row)
    return kept, dups


def decode_tensor(data: bytes, shape: list[int], store_dtype: str, name: str) -> np.ndarray:
    if name == "codes":
        dtype = np.int16 if len(data) == 2 * int(np.prod(shape[1:])) else np.int32
        return np.frombuffer(data, dtype=dtype).reshape(shape[1:])
    return np.frombuffer(data, dtype=NUMPY_STORE[store_dtype]).reshape(shape)


def group_rows(rows: list[dict[str, Any]]) -> dict[tuple[int, ...], ShardRows]:
    """Good rows grouped by latent shape, tensors decoded into stacked arrays."""
    by_shape: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for row in rows:
        by_shape.setdefault(tuple(row["latent_shape"]), []).append(row)
    groups = {}
    for shape, members in by_shape.items():
        names = [n for n in TENSOR_COLUMNS if members[0][n] is not None]
        store = members[0]["store_dtype"]
        tensors = {n: np.stack([decode_tensor(r[n], list(shape), store, n) for r in members]) for n in names}
        groups[shape] = ShardRows(tensors, members, store)
    return groups


def output_name(name: str, group: ShardRows, by_bucket: bool) -> str:
    """`<shard>` or `<shard>_<H>x<W>`, H x W being the rows' bucket (the crop size in pixels)."""
    first = group.rows[0]
    return f"{name}_{first['bucket_height']}x{first['bucket_width']}" if by_bucket else name


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (int16) -> float32: a bf16 is the top half of the float32 with the same bits."""
    return (bits.astype(np.uint16).astype(np.uint32) << 16).view(np.float32)


def shard_moments(group: ShardRows, space: LatentSpace) -> Moments | None:
    """Statistics of the raw latents exactly as a reader recovers them from the stored values."""
    if "latent" not in group.tensors:
        return None
    stored = group.tensors["latent"]
    stored = bf16_bits_to_float(stored) if group.store_dtype == "bf16" else stored
    return Moments.of(space.to_raw(stored.astype(np.float64)))


@dataclass(frozen=True, kw_only=True)
class CommitSpec:
    output: str
    format: str
    tensor_layout: str
    space: dict[str, Any]
    storage_options: dict[str, Any] = field(repr=False)  # may hold credentials
    bucketed: bool = False  # name every file <shard>_<H>x<W>, even when a shard has one bucket


def commit_shard(*, shard: str, name: str, fragments: list[str], spec: CommitSpec) -> dict[str, Any]:
    """Fragments of one shard -> its final file(s) and error rows. Returns the shard's record."""
    suffix, writer = FORMATS[spec.format]
    table = read_fragments(fragments, spec.storage_options)
    rows = table.to_pylist()
    good, dups = split_duplicates([r for r in rows if r["error"] is None])
    failed = [r for r in rows if r["error"] is not None] + dups
    groups = group_rows(good)
    space = LatentSpace.from_dict(spec.space)
    files = []
    for shape, group in groups.items():
        relative = output_name(name, group, len(groups) > 1 or spec.bucketed) + suffix
        storage.write_bytes(storage.join(spec.output, relative), writer(group, spec.tensor_layout), spec.storage_options)
        files.append({"path": relative, "rows": len(group.rows), "latent_shape": list(shape)})
    errors = pa.Table.from_pylist([{"key": r["key"], "shard": shard, "reason": r["error"]} for r in failed], schema=ERRORS_SCHEMA)
    storage.write_bytes(storage.join(spec.output, "_state", "errors", name + ".parquet"), parquet_bytes(errors), spec.storage_options)
    # The keys this commit kept, never changed afterwards: dedupe.py checks keys across shards with them.
    keys = pa.table({"key": pa.array([r["key"] for r in good], pa.string())})
    storage.write_bytes(storage.join(spec.output, "_state", "keys", name + ".parquet"), parquet_bytes(keys), spec.storage_options)
    moments = merge_all(m for m in (shard_moments(g, space) for g in groups.values()) if m is not None)
    storage.remove(fragments, spec.storage_options)
    return {"shard": shard, "name": name, "files": files, "written": len(good), "failed": len(failed),
            "fp32_fallback": sum(1 for r in good if r["fallback"] == "fp32"),
            "nonfinite": sum(1 for r in failed if r["error"].startswith(NONFINITE_REASON)),
            "moments": moments.to_dict() if moments else None}
