"""Exact, mergeable per-channel statistics: (count, mean, M2) merged with Chan's formula in float64.

Blocks are summarised independently (per shard, per batch) and merged on the driver in any
order and grouping; the result equals numpy's mean/std over all elements to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import reduce
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Moments:
    """Per-channel count, mean and sum of squared deviations (M2)."""

    count: np.ndarray  # [C] int64
    mean: np.ndarray  # [C] float64
    m2: np.ndarray  # [C] float64

    @classmethod
    def of(cls, latents: np.ndarray) -> Moments:
        """Moments of a block [N, C, ...] (any float dtype), computed in float64."""
        x = np.asarray(latents, dtype=np.float64)
        x = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
        mean = x.mean(axis=1)
        return cls(np.full(x.shape[0], x.shape[1], np.int64), mean, ((x - mean[:, None]) ** 2).sum(axis=1))

    @property
    def channels(self) -> int:
        return len(self.count)

    def merge(self, other: Moments) -> Moments:
        """Chan et al.'s parallel update: exact for any split of the data."""
        if self.channels != other.channels:
            raise ValueError(f"cannot merge statistics of {self.channels} and {other.channels} channels")
        n = self.count + other.count
        safe_n = np.maximum(n, 1)
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / safe_n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / safe_n)
        return Moments(n, mean, m2)

    def pooled(self) -> Moments:
        """All channels merged into one."""
        return reduce(
            Moments.merge,
            (Moments(self.count[c : c + 1], self.mean[c : c + 1], self.m2[c : c + 1]) for c in range(self.channels)),
        )

    def std(self) -> np.ndarray:
        """Population std (ddof=0), as numpy's default."""
        return np.sqrt(self.m2 / np.maximum(self.count, 1))

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count.tolist(), "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Moments:
        return cls(
            np.asarray(data["count"], np.int64),
            np.asarray(data["mean"], np.float64),
            np.asarray(data["m2"], np.float64),
        )


def merge_all(parts: Iterable[Moments]) -> Moments | None:
    parts = list(parts)
    return reduce(Moments.merge, parts) if parts else None


def summary(moments: Moments) -> dict[str, Any]:
    """Per-channel and global mean/std with the suggested latent-space constants."""
    total = moments.pooled()
    mean, std = float(total.mean[0]), float(total.std()[0])
    return {
        "count": int(total.count[0]),
        "count_per_channel": moments.count.tolist(),
        "channel_mean": moments.mean.tolist(),
        "channel_std": moments.std().tolist(),
        "mean": mean,
        "std": std,
        "suggested": {
            "scaling_factor": 1.0 / std if std > 0 else None,
            "shift_factor": mean,
            "latents_mean": moments.mean.tolist(),
            "latents_std": moments.std().tolist(),
        },
    }
