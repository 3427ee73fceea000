"""A percentile-bootstrap interval for scaling_factor and shift_factor, resampling shards."""

from __future__ import annotations

from typing import Any

import numpy as np

from .moments import Moments, merge_all


def resampled(count: np.ndarray, offset: np.ndarray, m2: np.ndarray) -> tuple[float, float, float]:
    """Chan's merge of pooled unit moments in closed form (means given as offsets from a centre,
    which keeps the sum of squares well conditioned): returns (count, mean offset, M2)."""
    n = count.sum()
    mean = (count * offset).sum() / n
    return float(n), float(mean), float(m2.sum() + (count * offset * offset).sum() - n * mean * mean)


def bootstrap_interval(units: list[Moments], *, replicates: int, confidence: float, seed: int) -> dict[str, Any] | None:
    """Percentile bootstrap: units drawn with replacement, merged, scaling_factor = 1/std per replicate."""
    if replicates <= 0 or len(units) < 2:
        return None
    pooled = [u.pooled() for u in units]
    count = np.array([p.count[0] for p in pooled], np.float64)
    centre = merge_all(pooled).mean[0]
    offset = np.array([p.mean[0] for p in pooled]) - centre
    m2 = np.array([p.m2[0] for p in pooled])
    rng = np.random.default_rng(seed)
    scaling, shift = np.empty(replicates), np.empty(replicates)
    for r in range(replicates):
        idx = rng.integers(0, len(units), len(units))
        n, mean, sq = resampled(count[idx], offset[idx], m2[idx])
        scaling[r], shift[r] = 1.0 / np.sqrt(max(sq, 0.0) / n), centre + mean
    tail = (1 - confidence) / 2
    bounds = {
        name: np.quantile(v, [tail, 1 - tail]).tolist()
        for name, v in (("scaling_factor", scaling), ("shift_factor", shift))
    }
    return {
        "level": confidence,
        "method": "percentile bootstrap",
        "unit": "shard",
        "units": len(units),
        "replicates": replicates,
        "seed": seed,
        **bounds,
        "scaling_factor_width": bounds["scaling_factor"][1] - bounds["scaling_factor"][0],
    }
