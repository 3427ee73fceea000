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
import pyarrow.parquet as pq

from ..latent_space import LatentSpace
from ..rows import CROP, TENSOR_COLUMNS, is_marker
from .codecs import codec
from .formats import PartData, get_format, meta_table
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


def build_part(rows: list[dict[str, Any]], spec: WriteSpec) -> PartData:
    store, shape = codec(spec.store_dtype), tuple(rows[0]["latent_shape"])
    tensors, params = {}, {}
    for name in (n for n in TENSOR_COLUMNS if rows[0][n] is not None):
        if name == "codes":
            width = 2 if len(rows[0][name]) == 2 * int(np.prod(shape[1:])) else 4
            tensors[name] = np.stack([np.frombuffer(r[name], f"<i{width}").reshape(shape[1:]) for r in rows])
        else:  # an 8-bit codec quantises here, where the row's float32 values are
            tensors[name], own = store.store(np.stack([store.from_bytes(r[name], shape) for r in rows]))
            params.update({f"{name}.{k}": v for k, v in own.items()})
    return PartData(tensors, params, meta_table(rows), store.name, spec.tensor_layout)


@dataclass(frozen=True)
class ShapeGroup:
    """Good rows of one latent shape, their tensors decoded to float32 and stacked [N, ...]."""

    tensors: dict[str, np.ndarray]
    rows: list[dict[str, Any]]
    store_dtype: str


def group_rows(rows: list[dict[str, Any]]) -> dict[tuple[int, ...], ShapeGroup]:
    """Good encoded rows grouped by latent shape (what the stats stage reads; `codes` stay out)."""
    by_shape: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for row in rows:
        by_shape.setdefault(tuple(row["latent_shape"]), []).append(row)
    groups = {}
    for shape, members in by_shape.items():
        store = codec(members[0]["store_dtype"])
        names = [n for n in TENSOR_COLUMNS if n != "codes" and members[0][n] is not None]
        tensors = {n: store.decode(np.stack([store.from_bytes(r[n], shape) for r in members])) for n in names}
        groups[shape] = ShapeGroup(tensors, members, store.name)
    return groups


def write_parts(shard: str, good: list[dict[str, Any]], spec: WriteSpec) -> list[dict[str, Any]]:
    by_shape: dict[tuple, list[dict[str, Any]]] = {}
    for row in good:
        by_shape.setdefault(tuple(row["latent_shape"]) + (row["bucket_height"], row["bucket_width"]), []).append(row)
    fmt, layout, space = get_format(spec.format), spec.layout, LatentSpace.from_dict(spec.space)
    parts = []
    for rows in by_shape.values():
        rows.sort(key=lambda r: r["index"])
        part = build_part(rows, spec)
        bucket = (rows[0]["bucket_height"], rows[0]["bucket_width"]) if spec.bucketed else None
        path = layout.part_path(shard_name(shard, spec.base), rows[0]["index"], fmt.ext, bucket)
        layout.write_bytes(path, fmt.write(part))
        parts.append(
            {"path": path, "rows": part.rows, "latent_shape": part.shape, "moments": part_moments(part, space)}
        )
    return parts


def write_errors(layout: Layout, rows: list[dict[str, Any]]) -> str | None:
    if not rows:
        return None
    path = layout.errors_path()
    layout.write_bytes(path, parquet_bytes(pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)))
    return path


def write_block(table: pa.Table, *, spec: WriteSpec) -> pa.Table:
    """One block of encoded rows -> its part files; one metadata row per shard in the block."""
    markers, shards = is_marker(table), table.column("shard").to_pylist()
    rows = table.drop_columns([n for n in ("pixels", "image") if n in table.column_names]).to_pylist()
    out = []
    for shard in dict.fromkeys(shards):
        mine = [r for r, s, m in zip(rows, shards, markers) if s == shard and not m]
        marker = next((r for r, s, m in zip(rows, shards, markers) if s == shard and m), {})
        bad = [r for r in mine if r["error"] is not None]
        errors = write_errors(spec.layout, [{"key": r["key"], "shard": shard, "reason": r["error"]} for r in bad])
        good = [r for r in mine if r["error"] is None]
        out.append(
            {
                "shard": shard,
                "rows": len(mine),
                "parts": json.dumps(write_parts(shard, good, spec)),
                "errors": errors,
                "error_rows": len(bad),
                "error_index": json.dumps([r["index"] for r in bad]),
                "nonfinite": sum(r["error"].startswith(NONFINITE_REASON) for r in bad),
                "fp32_fallback": sum(r["fallback"] == "fp32" for r in good),
                "shard_rows": marker.get("shard_rows"),
                "shard_status": marker.get("shard_status"),
                "shard_error": marker.get("error"),
            }
        )
    return pa.Table.from_pylist(out, schema=BLOCK_META)


__all__ = [
    "BLOCK_META",
    "CROP",
    "ERRORS_SCHEMA",
    "WriteSpec",
    "group_rows",
    "write_block",
    "parquet_bytes",
    "part_moments",
]
