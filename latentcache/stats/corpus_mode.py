"""Corpus mode (`--input` + `--model`): the encode pipeline up to the encoder, nothing written.

Rows are sampled before decoding by a seeded hash of (shard, key), so the sample is uniform over
all shards. Ray comes in through `pipeline`, the one module that places work.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from tqdm import tqdm

from .. import pipeline
from ..config import EncodeConfig
from ..latent_space import LatentSpace
from ..models import ModelSpec, check_options, latent_space_for, load_vae
from ..sources import SourceOptions, plan_shards, preflight
from .config import StatsConfig
from .partials import Accumulator, Partial, block_partials
from .sampling import lowest_priorities, select_rows


def corpus_mode(cfg: StatsConfig, progress: bool) -> tuple[Accumulator, dict[str, Any]]:
    ecfg = cfg.encode_config()
    shards = plan_shards(ecfg.input, ecfg.input_format, ecfg.storage_options)
    preflight(shards, SourceOptions.from_config(ecfg))
    vae, family = load_vae(ModelSpec.from_config(ecfg))
    check_options(family, ecfg, vae)
    space = latent_space_for(vae, ecfg)
    del vae
    pipeline.ensure_ray()
    threshold, sampling = sample_threshold_job(cfg, ecfg, shards, progress)
    acc = Accumulator(head=cfg.batch_size, sample_size=cfg.plot_samples, rank={s.id: i for i, s in enumerate(shards)})
    stats_job(cfg, ecfg, shards, space, threshold, acc, progress)
    return acc, {
        "mode": "corpus",
        "source": cfg.input,
        "model": cfg.model,
        "posterior": ecfg.posterior,
        "current_latent_space": space.to_dict(),
        "shards": len(shards),
        "sampling": sampling,
    }


def sample_threshold_job(
    cfg: StatsConfig, ecfg: EncodeConfig, shards: list, progress: bool
) -> tuple[float, dict[str, Any]]:
    """The row-sample threshold: none, --sample-fraction itself, or the (N+1)-th smallest u for --max-samples."""
    rule = "a row is kept iff u(seed, shard, key) < threshold, u a sha256-derived uniform number in [0, 1)"
    if cfg.sample_fraction is not None:
        return cfg.sample_fraction, {
            "method": "bernoulli",
            "fraction": cfg.sample_fraction,
            "seed": cfg.seed,
            "threshold": cfg.sample_fraction,
            "rule": rule,
        }
    if cfg.max_samples is None:
        return 1.0, {"method": "all rows"}
    smallest = np.zeros(0)
    bar = tqdm(unit="key", desc="sampling", disable=not progress)
    for row in pipeline.iter_mapped(
        pipeline.read_dataset(ecfg, shards),
        functools.partial(lowest_priorities, seed=cfg.seed, keep=cfg.max_samples + 1),
    ):
        smallest = np.append(smallest, row["u"])
        if len(smallest) > 4 * (cfg.max_samples + 1):
            smallest = np.partition(smallest, cfg.max_samples)[: cfg.max_samples + 1]
        bar.update()
    bar.close()
    threshold = (
        1.0 if len(smallest) <= cfg.max_samples else float(np.partition(smallest, cfg.max_samples)[cfg.max_samples])
    )
    return threshold, {
        "method": "bottom-k (uniform without replacement)",
        "max_samples": cfg.max_samples,
        "seed": cfg.seed,
        "threshold": threshold,
        "rule": rule + "; the threshold keeps the max_samples "
        "smallest u over all shards (found by a keys-only pass over the shards)",
    }


def stats_job(
    cfg: StatsConfig,
    ecfg: EncodeConfig,
    shards: list,
    space: LatentSpace,
    threshold: float,
    acc: Accumulator,
    progress: bool,
) -> None:
    """read -> sample -> preprocess -> encode -> Partials, merged on the driver as they arrive."""
    select = functools.partial(select_rows, seed=cfg.seed, threshold=threshold) if threshold < 1.0 else None
    placement = pipeline.plan_placement(ecfg)
    ds = pipeline.encoded_dataset(ecfg, shards, placement, select=select)
    stage = functools.partial(
        block_partials, space=space.to_dict(), head=cfg.batch_size, sample_size=cfg.plot_samples, seed=cfg.seed
    )
    bar = tqdm(total=cfg.max_samples, unit="img", desc="stats", disable=not progress)
    for row in pipeline.iter_mapped(ds, stage, concurrency=placement.writers):
        partial = Partial.from_row(row)
        acc.add(partial)
        bar.update(partial.rows + partial.errors)
    bar.close()
