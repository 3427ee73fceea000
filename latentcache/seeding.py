"""Everything seeded by a key: the same result on every machine, batch size, worker and rerun.

One construction underneath: sha256 of the NUL-joined parts, first 8 bytes little-endian. The
encoder's posterior noise, the training reader's per-epoch redraw, random crops and the stats
row sample all derive from it, each with its own parts so their streams never coincide.
torch is imported only inside the noise functions: crop and sampling workers never pay for it.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def hash64(*parts: Any) -> int:
    """64 stable bits from sha256 of the parts joined by NUL (str() of each part)."""
    text = "\0".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def key_seed(seed: int, key: str) -> int:
    """A 63-bit seed per (run seed, key), within torch.Generator.manual_seed's range."""
    return hash64(seed, key) >> 1


def epoch_key(key: str, epoch: int) -> str:
    """The noise key of a row's redraw in a training epoch: apart from the key's encode-time noise."""
    return f"{key}\0epoch={epoch}"


def per_key_noise(keys: list[str], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise [B, *shape], one generator per key, drawn on CPU in float32 so devices agree."""
    import torch

    shape = tuple(int(s) for s in shape)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(key_seed(seed, k))) for k in keys])


def posterior_sample(mean: Any, std: Any, keys: list[str], seed: int) -> Any:
    """The one posterior draw, mean + std * eps with eps = per_key_noise(keys): torch tensors stay
    on their device, numpy arrays stay numpy (in the mean's dtype)."""
    eps = per_key_noise(keys, tuple(mean.shape[1:]), seed)
    if isinstance(mean, np.ndarray):
        return mean + std * eps.numpy().astype(mean.dtype)
    return mean + std * eps.to(mean.device)


def crop_rng(seed: int, key: str) -> np.random.Generator:
    """A generator per (seed, key) for random crops; the "crop" tag keeps it apart from the noise."""
    return np.random.default_rng(hash64("crop", seed, key))


def row_priority(seed: int, shard: str, key: str) -> float:
    """A stable uniform number in [0, 1) per (seed, shard, key): the stats row sample's coin."""
    return (hash64(seed, shard, key) >> 11) / 2.0**53  # 53 bits: exact in a float, never 1.0


def block_rng(seed: int, unit: str, first_position: int) -> np.random.Generator:
    """The generator of one block's value sample (stats plot), by its shard and first row."""
    return np.random.default_rng(hash64(seed, unit, first_position))
