"""The corpus-mode row sample: a stable coin per (seed, shard, key), so the sample is uniform over all shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..seeding import row_priority


def row_priorities(table: pa.Table, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(u per row, mask of sample rows); shard markers get u = 0 and are not sample rows."""
    keys, shards = table.column("key").to_pylist(), table.column("shard").to_pylist()
    u = np.array([0.0 if k is None else row_priority(seed, s, k) for k, s in zip(keys, shards)])
    return u, np.array([k is not None for k in keys], dtype=bool)


def select_rows(table: pa.Table, *, seed: int, threshold: float) -> pa.Table:
    """Raw rows -> the sampled ones (u < threshold); shard markers pass, so counts still reconcile."""
    u, is_row = row_priorities(table, seed)
    return table.filter(pa.array(~is_row | (u < threshold)))


def lowest_priorities(table: pa.Table, *, seed: int, keep: int) -> pa.Table:
    """Raw rows -> the `keep` smallest row priorities of the block (the --max-samples pre-pass)."""
    u, is_row = row_priorities(table, seed)
    u = u[is_row]
    return pa.table({"u": np.sort(u)[:keep] if len(u) > keep else u})
