"""Reconstruction: decode a seeded sample of keys, rebuild their preprocessed sources, score the pairs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ..buckets import BucketPlanner
from ..models import ModelSpec, model_device
from ..preprocess import ImageError, PreprocessSpec, preprocess_image
from ..reader import Cache
from .config import AuditConfig
from .decode import DECODE_PLACES, decode_where
from .findings import Findings
from .identity import recorded_config
from .inputs import source_preprocessing
from .integrity import CacheScan
from .metrics import Lpips, lpips_status, pair_metrics


def sample_keys(keys: list[str], n: int, seed: int) -> list[str]:
    """The same keys for the same cache, n and seed, whatever order the files were read in."""
    ordered = sorted(keys)
    rng = np.random.default_rng(seed)
    return [ordered[i] for i in sorted(rng.choice(len(ordered), size=min(n, len(ordered)), replace=False))]


def load_latents(cache: Cache, scan: CacheScan, keys: list[str]) -> dict[str, np.ndarray]:
    """Raw latents (convention undone, float32) of the keys, reading each needed file once."""
    files = cache.files
    by_file: dict[int, list[str]] = {}
    for key in keys:
        by_file.setdefault(scan.where[key][0], []).append(key)
    out = {}
    for index, members in by_file.items():
        block = cache.read(files[index], ("latent",))
        for key in members:
            stored = block.tensors["latent"][scan.where[key][1]].astype(np.float64)
            out[key] = cache.space.to_raw(stored).astype(np.float32)
    return out


@dataclass(frozen=True)
class Pair:
    key: str
    original: np.ndarray | None  # uint8 [H, W, 3], the preprocessed source
    reconstruction: np.ndarray
    status: str
    crop_matches: bool | None


def rebuild_source(
    key: str, data: bytes | None, prep: tuple[PreprocessSpec, BucketPlanner], stored_crop: dict[str, int | None]
) -> tuple[np.ndarray | None, str, bool | None]:
    """The preprocessed source image, and whether its crop metadata still equals the stored one."""
    try:
        pixels, meta = preprocess_image(data, prep[0], key=key, planner=prep[1])
    except ImageError as exc:
        return None, f"source_error: {exc}", None
    same = all(v is None or getattr(meta, n, v) == v for n, v in stored_crop.items())
    return pixels.transpose(1, 2, 0), "ok", same


def make_pairs(
    keys: list[str],
    images: dict[str, bytes | None],
    decoded: dict[str, np.ndarray],
    scan: CacheScan,
    prep: tuple[PreprocessSpec, BucketPlanner],
) -> list[Pair]:
    pairs = []
    for key in keys:
        if key not in images:
            pairs.append(Pair(key, None, decoded[key], "source_missing", None))
            continue
        original, status, crop_ok = rebuild_source(key, images[key], prep, scan.crops[key])
        if original is not None and original.shape != decoded[key].shape:
            status = f"shape_mismatch: source {original.shape}, reconstruction {decoded[key].shape}"
        pairs.append(Pair(key, original, decoded[key], status, crop_ok))
    return pairs


def score(pairs: list[Pair], metrics: dict[str, Callable[..., float]]) -> list[dict[str, Any]]:
    rows = []
    for p in pairs:
        ok = p.status == "ok"
        row = {
            "key": p.key,
            "status": p.status,
            "crop_matches": p.crop_matches,
            "height": p.reconstruction.shape[0],
            "width": p.reconstruction.shape[1],
        }
        row.update({name: fn(p.original, p.reconstruction) if ok else None for name, fn in metrics.items()})
        rows.append(row)
    return rows


METRICS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("file", pa.string()),
        ("status", pa.string()),
        ("crop_matches", pa.bool_()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("psnr", pa.float64()),
        ("ssim", pa.float64()),
        ("lpips", pa.float64()),
    ]
)


def metrics_table(rows: list[dict[str, Any]], cache: Cache, scan: CacheScan) -> pa.Table:
    files = cache.files
    full = [
        {**r, "file": files[scan.where[r["key"]][0]].path, "shard": files[scan.where[r["key"]][0]].shard} for r in rows
    ]
    return pa.Table.from_pylist(full, schema=METRICS_SCHEMA)


@dataclass
class Reconstruction:
    rows: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    decode: dict[str, Any] = field(default_factory=dict)


def reconstruct(
    cfg: AuditConfig,
    cache: Cache,
    scan: CacheScan,
    spec: ModelSpec | None,
    keys: list[str],
    images: dict[str, bytes | None],
    findings: Findings,
) -> Reconstruction:
    if not keys or spec is None:
        return Reconstruction()
    if cache.manifest.get("model_class") == "vq" and cache.manifest.get("vq_output") == "codes":
        findings.notes.append("the cache stores VQ codes only: reconstruction skipped")
        return Reconstruction()
    where, enc = decode_where(cfg), recorded_config(cache.manifest)
    started = time.time()
    decoded = DECODE_PLACES[where](load_latents(cache, scan, keys), spec, cfg, enc.tile_threshold)
    seconds = time.time() - started
    pairs = make_pairs(keys, images, decoded, scan, source_preprocessing(enc))
    status = lpips_status()
    rows = score(pairs, pair_metrics(Lpips() if status.available else None))
    return Reconstruction(
        rows,
        pairs,
        {
            "where": where,
            "tiling": cfg.decode_tiling,
            "seconds": round(seconds, 2),
            "device": "ray actors" if where == "ray" else str(model_device()),
        },
    )
