"""The per-block writer task: encoded rows -> FINAL part files, written once, plus small metadata.

Runs after the encoder (a CPU task per block). For each shard in the block it writes one part per
latent shape, in the output format, straight to `data/<shard name>/`, and one errors part when the
block has error rows (none in the clean case). It returns one metadata row per shard: the driver
counts rows per shard and commits a shard by appending its record, naming these files, to the
commit log. Until then no reader sees them (readers go through records), and a killed run's
unnamed files are deleted by the next run (one listing).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..latent_space import LatentSpace
from ..rows import CROP, TENSOR_COLUMNS, is_marker, stack_binary
from .codecs import codec
from .formats import META_SCHEMA, PartData, get_format
from .layout import Layout
from .moments import Moments

ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("reason", pa.string())])
NONFINITE_REASON = "non-finite latent"  # how encode.py's error rows for NaN/Inf latents begin
BLOCK_META = pa.schema(
    [
        ("shard", pa.string()),
        ("rows", pa.int64()),
        ("parts", pa.string()),
        ("errors", pa.string()),
        ("error_rows", pa.int64()),
        ("error_index", pa.string()),
        ("nonfinite", pa.int64()),
        ("fp32_fallback", pa.int64()),
        ("shard_rows", pa.int64()),
        ("shard_status", pa.string()),
        ("shard_error", pa.string()),
    ]
)


@dataclass(frozen=True, kw_only=True)
class WriteSpec:
    root: str
    storage_options: dict[str, Any] = field(repr=False)  # may hold credentials
    format: str
    tensor_layout: str
    store_dtype: str
    space: dict[str, Any]
    bucketed: bool
    base: str  # the input shards' common folder: a shard's output name is its path below it

    @property
    def layout(self) -> Layout:
        return Layout(self.root, self.storage_options)


def shard_name(shard: str, base: str) -> str:
    """The output name of a shard id (sources.plan_shards names shards the same way)."""
    from ..sources import output_name

    return output_name(shard, base)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def part_moments(part: PartData, space: LatentSpace) -> dict[str, Any] | None:
    """Statistics of the raw latents exactly as a reader recovers them from the stored codes."""
    if "latent" not in part.tensors or not part.rows:
        return None
    return Moments.of(space.to_raw(part.floats().astype(np.float64))).to_dict()


def build_part(rows: pa.Table, spec: WriteSpec) -> PartData:
    """Same-shape good rows (sorted) -> the part: whole columns stacked in Arrow, no Python per row."""
    store, shape = codec(spec.store_dtype), tuple(rows.column("latent_shape")[0].as_py())
    everyone = np.arange(rows.num_rows)
    tensors, params = {}, {}
    for name in (n for n in TENSOR_COLUMNS if rows.column(n).null_count < rows.num_rows):
        column = rows.column(name)
        if name == "codes":  # int16 or int32 VQ indices, by their byte width
            width = 2 if len(column[0].as_py()) == 2 * int(np.prod(shape[1:])) else 4
            tensors[name] = stack_binary(column, everyone, shape[1:], np.dtype(f"<i{width}"))
        else:  # an 8-bit codec quantises here, where the rows' float32 values are
            sent = stack_binary(column, everyone, shape, store.sender.code_dtype)
            tensors[name], own = store.store(sent)
            params.update({f"{name}.{k}": v for k, v in own.items()})
    return PartData(tensors, params, rows.select(META_SCHEMA.names).cast(META_SCHEMA), store.name, spec.tensor_layout)


PART_GROUP = ("latent_shape", "bucket_height", "bucket_width")  # one part per latent shape (and bucket)


def part_groups(good: pa.Table) -> list[pa.Table]:
    """Good rows split by latent shape and bucket, each sorted by the row's index in its shard."""
    columns = [good.column(n).to_pylist() for n in PART_GROUP]  # small values: a few per row
    members: dict[tuple, list[int]] = {}
    for i, (shape, *bucket) in enumerate(zip(*columns)):
        members.setdefault((*shape, *bucket), []).append(i)
    groups = []
    for rows in members.values():
        group = good.take(pa.array(rows, pa.int64()))
        groups.append(group.take(pc.sort_indices(group, [("index", "ascending")])))
    return groups


def write_parts(shard: str, good: pa.Table, spec: WriteSpec) -> list[dict[str, Any]]:
    fmt, layout, space = get_format(spec.format), spec.layout, LatentSpace.from_dict(spec.space)
    parts = []
    for rows in part_groups(good):
        part, first = build_part(rows, spec), rows.slice(0, 1).to_pylist()[0]
        bucket = (first["bucket_height"], first["bucket_width"]) if spec.bucketed else None
        path = layout.part_path(shard_name(shard, spec.base), first["index"], fmt.ext, bucket)
        layout.write_bytes(path, fmt.write(part))
        parts.append(
            {"path": path, "rows": part.rows, "latent_shape": part.shape, "moments": part_moments(part, space)}
        )
    return parts


def write_errors(layout: Layout, shard: str, bad: pa.Table) -> str | None:
    if not bad.num_rows:
        return None
    path = layout.errors_path()
    table = pa.table(
        [bad.column("key"), pa.array([shard] * bad.num_rows, pa.string()), bad.column("error")], schema=ERRORS_SCHEMA
    )
    layout.write_bytes(path, parquet_bytes(table))
    return path


def write_block(table: pa.Table, *, spec: WriteSpec) -> pa.Table:
    """One block of encoded rows -> its part files; one metadata row per shard in the block."""
    table = table.drop_columns([n for n in ("pixels", "image") if n in table.column_names])
    markers, shards = is_marker(table), table.column("shard")
    return pa.Table.from_pylist(
        [
            shard_meta(table, shard, pc.equal(shards, shard).to_numpy(zero_copy_only=False), markers, spec)
            for shard in pc.unique(shards).to_pylist()
        ],  # first-seen order
        schema=BLOCK_META,
    )


def shard_meta(table: pa.Table, shard: str, mine: np.ndarray, markers: np.ndarray, spec: WriteSpec) -> dict[str, Any]:
    """Writes one shard's rows of the block (parts, errors part); returns its metadata row."""
    rows, marker = table.filter(mine & ~markers), table.filter(mine & markers).to_pylist()
    failed = rows.column("error").is_valid().to_numpy(zero_copy_only=False)
    bad, good = rows.filter(failed), rows.filter(~failed)
    reasons = bad.column("error").to_pylist()
    marker = marker[0] if marker else {}
    return {
        "shard": shard,
        "rows": rows.num_rows,
        "parts": json.dumps(write_parts(shard, good, spec) if good.num_rows else []),
        "errors": write_errors(spec.layout, shard, bad),
        "error_rows": bad.num_rows,
        "error_index": json.dumps(bad.column("index").to_pylist()),
        "nonfinite": sum(r.startswith(NONFINITE_REASON) for r in reasons),
        "fp32_fallback": pc.sum(pc.equal(good.column("fallback"), "fp32")).as_py() or 0,
        "shard_rows": marker.get("shard_rows"),
        "shard_status": marker.get("shard_status"),
        "shard_error": marker.get("error"),
    }


__all__ = [
    "BLOCK_META",
    "CROP",
    "ERRORS_SCHEMA",
    "WriteSpec",
    "write_block",
    "parquet_bytes",
    "part_moments",
]
