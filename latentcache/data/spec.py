"""One definition of "the latent of a row", shared by the torch and Ray readers: which draw, in which space."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..latent_space import LatentSpace
from ..reader import Cache, CacheError, LatentBlock
from ..seeding import epoch_key, per_key_noise, posterior_sample

SPACES: dict[str, Callable[[LatentSpace, np.ndarray], np.ndarray]] = {
    "model": lambda space, z: z,  # as stored: what the diffusion model trains on
    "raw": lambda space, z: space.to_vae_input(z.astype(np.float64)).astype(np.float32),  # ready for vae.decode
}
POSTERIOR = ("posterior_mean", "posterior_std")


@dataclass(frozen=True, kw_only=True)
class LatentSpec:
    """What a reader hands the trainer: which draw, in which space."""

    resample: bool = False
    seed: int = 0
    space: str = "model"

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {self.space!r}")

    @property
    def columns(self) -> tuple[str, ...]:
        return POSTERIOR if self.resample else ("latent",)

    def check(self, cache: Cache) -> None:
        """A clear error up front, not a KeyError in a DataLoader worker."""
        if self.resample and not cache.has_posterior:
            raise CacheError(
                f"{cache.root} has no posterior: resample=True needs a cache encoded with --store-posterior "
                f"(re-encode with it, or read with resample=False)"
            )
        if not self.resample and cache.manifest.get("vq_output") == "codes":
            raise CacheError(
                f"{cache.root} stores VQ codebook indices only (--vq-output codes); there is no latent to read"
            )

    def latents(self, tensors: dict[str, np.ndarray], keys: list[str], space: LatentSpace, epoch: int) -> np.ndarray:
        """float32 [N, C, h, w] for these rows."""
        if self.resample:
            mean, std = (tensors[name].astype(np.float32) for name in POSTERIOR)
            z = posterior_sample(mean, std, [epoch_key(key, epoch) for key in keys], self.seed)
        else:
            z = tensors["latent"].astype(np.float32)
        return SPACES[self.space](space, z)


def epoch_noise(keys: list[str], shape: tuple[int, ...], seed: int, epoch: int) -> np.ndarray:
    """Standard normal noise per (seed, key, epoch): the eps of a training-time redraw."""
    return per_key_noise([epoch_key(key, epoch) for key in keys], tuple(shape), seed).numpy()


def open_cache(cache: Cache | str, storage_options: dict[str, Any] | None = None) -> Cache:
    return cache if isinstance(cache, Cache) else Cache(str(cache), storage_options=storage_options)


def decoder_config(cache: Cache | str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The VAE config values a trainer must set to decode this cache's latents (scaling_factor, ...)."""
    return open_cache(cache, storage_options).space.decoder_config()


def rows_of(block: LatentBlock, latents: np.ndarray, start: int = 0) -> Iterator[dict[str, Any]]:
    """Per-row dicts: the latent tensor plus every metadata field the file carries."""
    for i in range(len(latents)):
        # Fields a writer left empty (no buckets, no flip) are left out: default_collate cannot batch None.
        row = {name: values[start + i] for name, values in block.meta.items() if values[start + i] is not None}
        row["caption"] = row.get("caption") or ""
        row["latent"] = torch.from_numpy(latents[i])
        yield row
