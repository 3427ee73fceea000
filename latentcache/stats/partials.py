"""Per-block partial results (Ray-free) and the driver's accumulator that merges them in any order.

A `Partial` is what one block of raw latents contributes: exact moments, its first rows (for the
first-batch estimate) and a small random sample of values (for the plot), chosen by priority so
that samples merge exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..cache.codecs import codec
from ..config import ConfigError
from ..latent_space import LatentSpace
from ..rows import TENSOR_COLUMNS
from ..seeding import block_rng
from .moments import Moments, merge_all


@dataclass(frozen=True)
class Partial:
    """What one block contributes: exact moments, its first rows (for the first-batch estimate) and a sample."""

    unit: str  # the bootstrap unit: the input shard the rows came from
    rows: int
    errors: int
    moments: Moments | None
    head: list[tuple[int, Moments]]  # (row position in its shard, that row's moments), first rows only
    sample: np.ndarray  # [C, k] raw values, chosen by `priority` (smallest kept)
    priority: np.ndarray  # [k]

    def to_row(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "rows": self.rows,
            "errors": self.errors,
            "moments": json.dumps(self.moments.to_dict()) if self.moments else None,
            "head": json.dumps([[pos, m.to_dict()] for pos, m in self.head]),
            "sample": self.sample.astype(np.float32).tobytes(),
            "channels": len(self.sample),
            "priority": self.priority.astype(np.float64).tobytes(),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Partial:
        moments = Moments.from_dict(json.loads(row["moments"])) if row["moments"] else None
        head = [(pos, Moments.from_dict(m)) for pos, m in json.loads(row["head"])]
        sample = np.frombuffer(row["sample"], np.float32).reshape(row["channels"], -1)
        return cls(
            row["unit"], row["rows"], row["errors"], moments, head, sample, np.frombuffer(row["priority"], np.float64)
        )

    @classmethod
    def failed(cls, unit: str, errors: int) -> Partial:
        return cls(unit, 0, errors, None, [], np.zeros((0, 0), np.float32), np.zeros(0))


def partial_of(
    unit: str, raw: np.ndarray, positions: np.ndarray, *, head: int, sample_size: int, seed: int, errors: int = 0
) -> Partial:
    """Raw latents [N, C, ...] of one unit (float64) -> its Partial."""
    first = np.argsort(positions, kind="stable")[:head]
    head_rows = [(int(positions[i]), Moments.of(raw[i : i + 1])) for i in first]
    rng = block_rng(seed, unit, int(positions.min()))
    values = np.moveaxis(raw, 1, 0).reshape(raw.shape[1], -1)
    priority = rng.random(values.shape[1])
    sample, priority = lowest(values, priority, sample_size)
    return Partial(unit, len(raw), errors, Moments.of(raw), head_rows, sample.astype(np.float32), priority)


def lowest(values: np.ndarray, priority: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k columns of `values` with the smallest priority: a uniform sample that merges exactly."""
    if len(priority) <= k:
        return values, priority
    keep = np.argpartition(priority, k)[:k]
    return values[:, keep], priority[keep]


def latent_groups(rows: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], np.ndarray]]:
    """Good encoded rows grouped by latent shape, with their latents as float32 through the stored codec."""
    by_shape: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for row in rows:
        by_shape.setdefault(tuple(row["latent_shape"]), []).append(row)
    out = []
    for shape, members in by_shape.items():
        store = codec(members[0]["store_dtype"])
        codes, params = store.store(np.stack([store.from_bytes(r["latent"], shape) for r in members]))
        out.append((members, store.decode(codes, params)))
    return out


def block_partials(table: pa.Table, *, space: dict[str, Any], head: int, sample_size: int, seed: int) -> pa.Table:
    """Encoded rows -> one Partial row per (shard, latent shape) of the block (the stats map stage)."""
    latent_space = LatentSpace.from_dict(space)
    columns = ["key", "shard", "index", "error", "latent_shape", "store_dtype", *TENSOR_COLUMNS]
    rows = [r for r in table.select(columns).to_pylist() if r["key"] is not None]
    out = []
    for unit in dict.fromkeys(r["shard"] for r in rows):
        good = [r for r in rows if r["shard"] == unit and r["error"] is None]
        errors = sum(1 for r in rows if r["shard"] == unit and r["error"] is not None)
        for group, stored in latent_groups(good):
            raw = latent_space.to_raw(stored.astype(np.float64))
            positions = np.array([r["index"] for r in group])
            out.append(partial_of(unit, raw, positions, head=head, sample_size=sample_size, seed=seed, errors=errors))
            errors = 0
        if errors:
            out.append(Partial.failed(unit, errors))
    return pa.Table.from_pylist([p.to_row() for p in out], schema=PARTIAL_SCHEMA)


PARTIAL_SCHEMA = pa.schema(
    [
        ("unit", pa.string()),
        ("rows", pa.int64()),
        ("errors", pa.int64()),
        ("moments", pa.string()),
        ("head", pa.string()),
        ("sample", pa.binary()),
        ("channels", pa.int64()),
        ("priority", pa.binary()),
    ]
)


# ---- the driver's accumulator ----------------------------------------------------------------


class Accumulator:
    """Merges Partials in any order: moments per unit, the global first rows, a bounded sample."""

    def __init__(self, *, head: int, sample_size: int, rank: dict[str, int]) -> None:
        self.head_size, self.sample_size, self.rank = head, sample_size, rank
        self.units: dict[str, Moments] = {}
        self.head: list[tuple[tuple[int, int], Moments]] = []
        self.sample: np.ndarray | None = None
        self.priority = np.zeros(0)
        self.rows = self.errors = 0

    def add(self, p: Partial) -> None:
        self.rows, self.errors = self.rows + p.rows, self.errors + p.errors
        if p.moments is None:
            return
        self.units[p.unit] = self.units[p.unit].merge(p.moments) if p.unit in self.units else p.moments
        order = self.rank.get(p.unit, len(self.rank))
        self.head = sorted(self.head + [((order, pos), m) for pos, m in p.head], key=lambda item: item[0])[
            : self.head_size
        ]
        values = p.sample if self.sample is None else np.concatenate([self.sample, p.sample], axis=1)
        self.sample, self.priority = lowest(values, np.concatenate([self.priority, p.priority]), self.sample_size)

    def total(self) -> Moments:
        if not self.units:
            raise ConfigError(
                f"no latents to describe: {self.errors} image(s) failed and none was encoded"
                if self.errors
                else "no latents to describe: the input (or the sample) is empty"
            )
        return merge_all(self.units[u] for u in sorted(self.units))
