"""`audit --compare OTHER`: what a stored dtype costs, measured between two caches of the same input.

For the audit's seeded sample of keys it reads the latent of each key in both caches (raw space,
through each cache's codec, so int8/fp8 are dequantised as every reader does it), and reports the
relative L2 distance ||this - other|| / ||other||. When the audit decoded the sample, the other
cache's latents are decoded with the same VAE and the images compared: PSNR/SSIM between the two
decodes, and the change of each key's PSNR/SSIM against its preprocessed source (this - other).
`other` is the reference (say the fp32 cache); the bytes per latent of both caches are given too.
The comparison is a measurement: it never fails the audit; keys missing from OTHER are counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import storage
from ..models import ModelSpec
from ..reader import Cache
from .config import AuditConfig
from .decode import DECODE_PLACES, decode_where
from .findings import Findings
from .identity import recorded_config
from .metrics import distribution, json_number, psnr, ssim
from .reconstruction import Pair, Reconstruction

METRICS = ("latent_rel_l2", "latent_max_abs", "psnr_between", "ssim_between", "psnr_delta", "ssim_delta")


def raw_latents(cache: Cache, keys: list[str]) -> dict[str, np.ndarray]:
    """Raw float64 latents of those keys found in the cache (one pass over its files)."""
    wanted, out = set(keys), {}
    for block in cache.blocks(("latent",)):
        for row, key in enumerate(block.keys):
            if key in wanted and key not in out:
                out[key] = cache.space.to_raw(block.tensors["latent"][row].astype(np.float64))
    return out


def stored_bytes(cache: Cache) -> int:
    """Bytes of the part files the cache's records name (one listing of data/)."""
    fs, root = storage.url_to_fs(cache.root, cache.storage_options)
    sizes = {path: info["size"] for path, info in fs.find(root.rstrip("/") + "/data", detail=True).items()}
    return sum(sizes.get(root.rstrip("/") + "/" + f.path, 0) for f in cache.files)


def latent_metrics(this: np.ndarray, other: np.ndarray) -> dict[str, float]:
    diff = this - other
    return {
        "latent_rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(other), 1e-30)),
        "latent_max_abs": float(np.abs(diff).max()),
    }


def image_metrics(pair: Pair, other_image: np.ndarray) -> dict[str, float | None]:
    """Between the two decodes, and each decode's score against the source (when it was rebuilt)."""
    out: dict[str, float | None] = {
        "psnr_between": psnr(other_image, pair.reconstruction),
        "ssim_between": ssim(other_image, pair.reconstruction),
        "psnr_delta": None,
        "ssim_delta": None,
    }
    if pair.status == "ok":
        out["psnr_delta"] = psnr(pair.original, pair.reconstruction) - psnr(pair.original, other_image)
        out["ssim_delta"] = ssim(pair.original, pair.reconstruction) - ssim(pair.original, other_image)
    return out


def decode_other(
    cfg: AuditConfig, cache: Cache, spec: ModelSpec | None, latents: dict[str, np.ndarray], recon: Reconstruction
) -> dict[str, np.ndarray]:
    """The other cache's latents decoded like this cache's sample was (nothing when it was not decoded)."""
    keys = [p.key for p in recon.pairs if p.key in latents]
    if spec is None or not keys:
        return {}
    raw = {k: latents[k].astype(np.float32) for k in keys}
    return DECODE_PLACES[decode_where(cfg)](raw, spec, cfg, recorded_config(cache.manifest).tile_threshold)


def compare_rows(
    keys: list[str],
    this: dict[str, np.ndarray],
    other: dict[str, np.ndarray],
    pairs: dict[str, Pair],
    images: dict[str, np.ndarray],
) -> list[dict[str, Any]]:
    rows = []
    for key in keys:
        row: dict[str, Any] = {"key": key, **dict.fromkeys(METRICS)}
        if key not in other:
            row["status"] = "missing_in_other"
        elif this[key].shape != other[key].shape:
            row["status"] = f"shape_mismatch: {list(this[key].shape)} vs {list(other[key].shape)}"
        else:
            row.update(status="ok", **latent_metrics(this[key], other[key]))
            if key in images and key in pairs:
                row.update(image_metrics(pairs[key], images[key]))
        rows.append(row)
    return rows


def compare_caches(
    cfg: AuditConfig, cache: Cache, keys: list[str], spec: ModelSpec | None, recon: Reconstruction, findings: Findings
) -> dict[str, Any] | None:
    """summary["compare"]: per-key rows and their distributions (None without --compare)."""
    if not cfg.compare:
        return None
    other = Cache(cfg.compare, storage_options=cfg.storage_options)
    if other.manifest.get("model_sha256") != cache.manifest.get("model_sha256"):
        findings.notes.append(f"--compare {cfg.compare} was encoded with another model: the comparison mixes models")
    this_latents, other_latents = raw_latents(cache, keys), raw_latents(other, keys)
    images = decode_other(cfg, cache, spec, other_latents, recon)
    rows = compare_rows(keys, this_latents, other_latents, {p.key: p for p in recon.pairs}, images)
    ok = [r for r in rows if r["status"] == "ok"]
    return {
        "other": cfg.compare,
        "store_dtype": cache.manifest.get("store_dtype"),
        "other_store_dtype": other.manifest.get("store_dtype"),
        "codec": cache.manifest.get("codec"),
        "space": "raw latents (the latent-space convention undone), other = reference",
        "keys": len(rows),
        "compared": len(ok),
        "missing_in_other": sum(r["status"] == "missing_in_other" for r in rows),
        "bytes_per_latent": bytes_per_latent(cache),
        "other_bytes_per_latent": bytes_per_latent(other),
        "metrics": {name: distribution([r[name] for r in ok if r[name] is not None]) for name in METRICS},
        "per_key": [{k: json_number(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
    }


def bytes_per_latent(cache: Cache) -> float | None:
    rows = sum(f.rows for f in cache.files)
    return stored_bytes(cache) / rows if rows else None


def compare_lines(comparison: dict[str, Any] | None) -> list[str]:
    """What the CLI prints about --compare."""
    if not comparison:
        return []
    lines = [
        f"compare: {comparison['store_dtype']} against {comparison['other_store_dtype']} ({comparison['other']}), "
        f"{comparison['compared']} of {comparison['keys']} sampled keys"
    ]
    for name, dist in comparison["metrics"].items():
        if dist:
            lines.append("  " + name + ": " + "  ".join(f"{k} {number(dist[k])}" for k in ("mean", "median", "max")))
    if comparison["bytes_per_latent"] and comparison["other_bytes_per_latent"]:
        this, other = comparison["bytes_per_latent"], comparison["other_bytes_per_latent"]
        lines.append(f"  bytes per latent: {this:.0f} vs {other:.0f} ({this / other:.3f}x)")
    return lines


def number(value: Any) -> str:
    """A metric as printed: identical decodes have PSNR "inf" (a string in strict JSON)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
