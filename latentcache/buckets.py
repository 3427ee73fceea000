"""Aspect-ratio buckets: which (height, width) each image is cropped to, and where the crop sits.

The bucket set is either generated (kohya sd-scripts' rule: every width from --bucket-min to
--bucket-max in --bucket-step, with the tallest height that keeps the area within --bucket-area,
both orientations and the square) or an explicit YAML list of [h, w]. Each image goes to the
bucket nearest its aspect ratio in log space, so 2:1 and 1:2 are equally far from 1:1.

`BucketPlanner` is the `preprocess.Planner` the pipeline hands to `preprocess_batch`; it is a
plain frozen dataclass, so Ray pickles it to the decode tasks. Random crops draw from a
generator seeded by (seed, key) only, so reruns, batch sizes and worker counts all agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from .errors import UserError
from .preprocess import PreprocessSpec, preprocess_batch
from .seeding import crop_rng

Bucket = tuple[int, int]  # (height, width) in pixels
VAE_MULTIPLE = 8  # every diffusers VAE downsamples by a multiple of 8
# Same-ratio sizes chosen by --bucket-no-upscale step in multiples of 16, so latents of f8 VAEs
# stay even (2x2-patch transformers such as SD3 and Flux need that).
SIDE_MULTIPLE = 16


class BucketSettings(Protocol):
    """The bucket options of a command's config (`config.EncodeConfig` has them all), read-only."""

    @property
    def resolution(self) -> int: ...
    @property
    def buckets(self) -> bool | list: ...
    @property
    def bucket_area(self) -> str | None: ...
    @property
    def bucket_step(self) -> int: ...
    @property
    def bucket_min(self) -> int | None: ...
    @property
    def bucket_max(self) -> int | None: ...
    @property
    def bucket_no_upscale(self) -> bool: ...
    @property
    def crop(self) -> str: ...
    @property
    def flip(self) -> str: ...
    @property
    def seed(self) -> int: ...


class BucketError(UserError, ValueError):
    """A bucket setting is wrong; the message names the flag. (Its own class, not config.ConfigError:
    config validates buckets through this module, so this module must not import config.)"""


def parse_area(text: str) -> Bucket:
    """'1024x1024' -> (1024, 1024)."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise BucketError(f"--bucket-area must look like 1024x1024 (HxW, positive integers), got {text!r}")
    return int(parts[0]), int(parts[1])


def generate_buckets(area: int, *, step: int, min_side: int, max_side: int) -> list[Bucket]:
    """kohya sd-scripts' bucket set for a pixel area: sides in multiples of `step` within [min, max]."""
    buckets: set[Bucket] = set()
    side = math.isqrt(area) // step * step
    if min_side <= side <= max_side:
        buckets.add((side, side))
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            buckets.update({(height, width), (width, height)})
    return sort_buckets(buckets)


def sort_buckets(buckets: Any) -> list[Bucket]:
    """Tall to wide, then small to large: a stable order for manifests and docs."""
    return sorted({(int(h), int(w)) for h, w in buckets}, key=lambda b: (-b[0] / b[1], b[0] * b[1]))


def nearest_bucket(height: int, width: int, buckets: tuple[Bucket, ...] | list[Bucket]) -> Bucket:
    """The bucket nearest the image's aspect ratio in log space; ties go to the closest area."""
    ratio, area = math.log(height / width), math.log(height * width)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), abs(math.log(b[0] * b[1]) - area), b))


def same_ratio_fit(bucket: Bucket, height: int, width: int) -> Bucket:
    """--bucket-no-upscale: the largest size of the bucket's exact ratio that fits inside the image.

    Sizes are k * unit, unit being the ratio in lowest terms times SIDE_MULTIPLE. An image smaller
    than the unit itself gets the unit (the least upscaling that keeps the ratio); a bucket that
    has no smaller size of its ratio is kept.
    """
    bh, bw = bucket
    if height >= bh and width >= bw:
        return bucket
    g = math.gcd(bh, bw)
    unit_h, unit_w = bh // g * SIDE_MULTIPLE, bw // g * SIDE_MULTIPLE
    most = bh // unit_h
    if most == 0:
        return bucket
    k = max(1, min(most, height // unit_h, width // unit_w))
    return k * unit_h, k * unit_w


@dataclass(frozen=True, kw_only=True)
class BucketPlanner:
    """`preprocess.Planner`: (key, height, width) -> (target height, target width, crop mode, rng)."""

    buckets: tuple[Bucket, ...]
    crop: str = "center"
    no_upscale: bool = False
    seed: int = 0

    def bucket_for(self, height: int, width: int) -> Bucket:
        bucket = nearest_bucket(height, width, self.buckets)
        return same_ratio_fit(bucket, height, width) if self.no_upscale else bucket

    def __call__(self, key: str, height: int, width: int) -> tuple[int, int, str, np.random.Generator | None]:
        bh, bw = self.bucket_for(height, width)
        return bh, bw, self.crop, crop_rng(self.seed, key) if self.crop == "random" else None

    @classmethod
    def from_config(cls, cfg: BucketSettings) -> BucketPlanner:
        return cls(buckets=tuple(bucket_set(cfg)), crop=cfg.crop, no_upscale=cfg.bucket_no_upscale, seed=cfg.seed)


# ---- the bucket set of a run, and its validation ---------------------------------------------


def side_range(cfg: BucketSettings, area: int) -> tuple[int, int]:
    """--bucket-min/--bucket-max, by default half and twice the square side (rounded to the step)."""
    side, step = math.isqrt(area), cfg.bucket_step
    low = cfg.bucket_min if cfg.bucket_min is not None else max(step, side // 2 // step * step)
    high = cfg.bucket_max if cfg.bucket_max is not None else max(low, side * 2 // step * step)
    return low, high


def bucket_set(cfg: BucketSettings) -> list[Bucket]:
    """The run's buckets: the explicit list, the generated set, or the one square of --resolution."""
    if isinstance(cfg.buckets, list):
        return sort_buckets(cfg.buckets)
    if not cfg.buckets:
        return [(cfg.resolution, cfg.resolution)]
    h, w = parse_area(cfg.bucket_area) if cfg.bucket_area else (cfg.resolution, cfg.resolution)
    low, high = side_range(cfg, h * w)
    return generate_buckets(h * w, step=cfg.bucket_step, min_side=low, max_side=high)


def validate_bucket_config(cfg: BucketSettings) -> None:
    """Clear one-line errors for every bucket setting; called from config.validate_encode."""
    if cfg.bucket_step <= 0 or cfg.bucket_step % VAE_MULTIPLE:
        raise BucketError(f"--bucket-step must be a positive multiple of {VAE_MULTIPLE}, got {cfg.bucket_step}")
    given = [n for n in ("bucket_area", "bucket_min", "bucket_max") if getattr(cfg, n) is not None]
    if given and cfg.buckets is not True:
        raise BucketError(f"--{given[0].replace('_', '-')} needs --buckets (a generated bucket set)")
    if isinstance(cfg.buckets, list):
        check_bucket_list(cfg.buckets)
    elif cfg.buckets:
        check_generated(cfg)


def check_bucket_list(buckets: list) -> None:
    if not buckets:
        raise BucketError("buckets: the list is empty; give [[h, w], ...] or true")
    for item in buckets:
        ok = isinstance(item, list) and len(item) == 2 and all(type(v) is int and v > 0 for v in item)
        if not ok or any(v % VAE_MULTIPLE for v in item):
            raise BucketError(
                f"buckets: each entry must be [height, width], positive multiples of {VAE_MULTIPLE}; got {item!r}"
            )


def check_generated(cfg: BucketSettings) -> None:
    h, w = parse_area(cfg.bucket_area) if cfg.bucket_area else (cfg.resolution, cfg.resolution)
    low, high = side_range(cfg, h * w)
    for name, value in (("bucket_min", low), ("bucket_max", high)):
        if value <= 0 or value % cfg.bucket_step:
            flag = "--" + name.replace("_", "-")
            raise BucketError(f"{flag} must be a positive multiple of --bucket-step {cfg.bucket_step}, got {value}")
    if low > high:
        raise BucketError(f"--bucket-min {low} is larger than --bucket-max {high}")
    if not bucket_set(cfg):
        raise BucketError(
            f"no bucket of area {h}x{w} has both sides within [{low}, {high}]; widen --bucket-min/--bucket-max"
        )


def bucket_identity(cfg: BucketSettings) -> dict[str, Any]:
    """What the manifest's preprocess entry records, so a changed bucket setting is a stale cache."""
    return {
        "crop": cfg.crop,
        "crop_seed": cfg.seed if cfg.crop == "random" else None,
        "buckets": [list(b) for b in bucket_set(cfg)] if cfg.buckets else None,
        "bucket_no_upscale": cfg.bucket_no_upscale,
        "flip": cfg.flip,
    }


# ---- keeping a block's shapes together ---------------------------------------------------------


def sort_by_shape(table: pa.Table) -> pa.Table:
    """Rows of one shape next to each other, error and marker rows last (stable).

    Ray cuts the encoder's fixed-size batches from each block in order, so after this a batch
    holds a few shapes instead of up to batch-size many, and the VAE runs on larger groups.
    """
    return table.sort_by([("height", "ascending"), ("width", "ascending")]) if table.num_rows else table


def preprocess_bucketed(table: pa.Table, spec: PreprocessSpec, planner: BucketPlanner) -> pa.Table:
    """The decode stage of a bucketed run: preprocess_batch, then rows grouped by bucket."""
    return sort_by_shape(preprocess_batch(table, spec, planner))
