"""Cache mode (`--cache`): read the stored latents and undo the scaling the manifest records, on the driver."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm import tqdm

from ..config import ConfigError
from ..latent_space import LatentSpace
from ..reader import Cache, CacheError
from ..seeding import posterior_sample
from .config import StatsConfig
from .partials import Accumulator, partial_of


def posterior_reader(cache: Any, posterior: str, seed: int) -> tuple[tuple[str, ...], Callable[[Any], np.ndarray]]:
    """(columns to read, block -> raw latents [N, C, ...] in float64) for the requested posterior."""
    stored = cache.manifest.get("posterior", "mode")
    to_raw = lambda arr: cache.space.to_raw(arr.astype(np.float64))
    if posterior == stored:
        return ("latent",), lambda block: to_raw(_tensor(block, "latent"))
    if not cache.has_posterior:
        raise ConfigError(
            f"{cache.root} stores --posterior {stored} latents without the posterior "
            f"(encode with --store-posterior), so it cannot describe --posterior {posterior}"
        )
    if posterior == "mode":  # a Gaussian's mode is its mean
        return ("posterior_mean",), lambda block: to_raw(_tensor(block, "posterior_mean"))
    return ("posterior_mean", "posterior_std"), functools.partial(_sampled_latents, cache.space, seed)


def _sampled_latents(space: LatentSpace, seed: int, block: Any) -> np.ndarray:
    mean = space.to_raw(_tensor(block, "posterior_mean").astype(np.float64))
    std = _tensor(block, "posterior_std").astype(np.float64) / space.std_to_model(np.ones(mean.shape[1:]))
    return posterior_sample(mean, std, block.keys, seed)


def _tensor(block: Any, name: str) -> np.ndarray:
    if name not in block.tensors:
        raise ConfigError(
            f"{block.file.path} has no {name!r} column (a codes-only VQ cache has no latents to describe)"
        )
    return block.tensors[name]


def cache_mode(cfg: StatsConfig, progress: bool) -> tuple[Accumulator, dict[str, Any]]:
    try:
        cache = Cache(cfg.cache, storage_options=cfg.storage_options)
    except CacheError as exc:
        raise ConfigError(str(exc)) from None
    posterior = cfg.posterior or cache.manifest.get("posterior", "mode")
    columns, raw_of = posterior_reader(cache, posterior, cfg.seed)
    units = list(dict.fromkeys(f.shard for f in cache.files))
    acc = Accumulator(head=cfg.batch_size, sample_size=cfg.plot_samples, rank={u: i for i, u in enumerate(units)})
    seen: dict[str, int] = {}
    for block in tqdm(cache.blocks(columns), total=len(cache.files), unit="file", desc="stats", disable=not progress):
        raw = raw_of(block)
        start = seen.get(block.file.shard, 0)
        seen[block.file.shard] = start + len(raw)
        acc.add(
            partial_of(
                block.file.shard,
                raw,
                np.arange(start, start + len(raw)),
                head=cfg.batch_size,
                sample_size=cfg.plot_samples,
                seed=cfg.seed,
            )
        )
    acc.errors = sum(s.get("failed") or 0 for s in cache.manifest["shards"].values())
    return acc, {
        "mode": "cache",
        "source": cfg.cache,
        "model": cache.manifest.get("model"),
        "posterior": posterior,
        "current_latent_space": cache.space.to_dict(),
        "sampling": {"method": "all rows of the cache"},
    }
