"""The source images: the input shards the cache was made from, read once, and the preprocessing the encoder ran."""

from __future__ import annotations

from .. import storage
from ..buckets import BucketPlanner
from ..config import EncodeConfig
from ..preprocess import PreprocessSpec
from ..reader import Cache
from ..sources import READERS as SAMPLE_READERS
from ..sources import ShardRef, SourceOptions, plan_shards
from .config import AuditConfig
from .findings import Findings
from .identity import recorded_config
from .integrity import CacheScan, check_input_keys


def source_options(cfg: AuditConfig, enc: EncodeConfig) -> SourceOptions:
    return SourceOptions(
        storage_options=cfg.storage_options,
        image_column=enc.image_column,
        key_column=enc.key_column,
        caption_column=enc.caption_column,
    )


def input_shards(cfg: AuditConfig, enc: EncodeConfig) -> list[ShardRef]:
    return plan_shards(cfg.input or enc.input, cfg.input_format or enc.input_format, cfg.storage_options)


def source_preprocessing(enc: EncodeConfig) -> tuple[PreprocessSpec, BucketPlanner]:
    """The preprocessing the encoder ran (as pipeline.encoded_dataset builds it): size, buckets, crops."""
    return (
        PreprocessSpec(
            resolution=enc.resolution, max_pixels=enc.max_pixels, min_size=enc.min_size, jpeg_draft=enc.jpeg_draft
        ),
        BucketPlanner.from_config(enc),
    )


def read_inputs(
    shards: list[ShardRef], options: SourceOptions, wanted: set[str], findings: Findings
) -> tuple[list[str], dict[str, bytes | None]]:
    """Every input key, and the image bytes of the wanted ones (one streaming pass per shard)."""
    keys: list[str] = []
    images: dict[str, bytes | None] = {}
    for shard in shards:
        try:
            for sample in SAMPLE_READERS[shard.format](shard, options):
                keys.append(sample.key)
                if sample.key in wanted:
                    images[sample.key] = sample.image
        except Exception as exc:  # noqa: BLE001 - a damaged shard: the keys read so far still count
            findings.notes.append(f"{shard.url}: input could not be read completely ({storage.describe(exc)})")
    return keys, images


def shards_of(keys: list[str], scan: CacheScan, cache: Cache, shards: list[ShardRef]) -> list[ShardRef]:
    """Only the input shards that hold sampled keys (matched by output name, so a moved input works)."""
    files = cache.files
    names = {rec["shard"]: name for name, rec in cache.manifest["shards"].items()}
    needed = {names.get(files[scan.where[k][0]].shard) for k in keys}
    return [s for s in shards if s.name in needed]


def gather_inputs(
    cfg: AuditConfig, cache: Cache, scan: CacheScan, errors: list[str], keys: list[str], findings: Findings
) -> dict[str, bytes | None]:
    """With --input: all input keys (the nothing-lost check); otherwise only the shards of sampled keys."""
    if not cfg.input and not keys:
        return {}
    enc = recorded_config(cache.manifest)
    try:
        shards = input_shards(cfg, enc)
    except (FileNotFoundError, ValueError) as exc:
        if cfg.input:
            raise
        findings.notes.append(f"recorded input unavailable ({storage.describe(exc)}): no source images to compare")
        return {}
    options = source_options(cfg, enc)
    input_keys, images = read_inputs(
        shards if cfg.input else shards_of(keys, scan, cache, shards), options, set(keys), findings
    )
    if cfg.input:
        check_input_keys(input_keys, scan, errors, findings)
    return images
