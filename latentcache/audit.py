"""`latentcache audit`: is the cache complete, uncorrupted, not stale, and how well does it reconstruct?

Integrity runs over the whole cache (cheap, one pass over every file): files exist and parse,
rows/shapes/dtypes are as the manifest records, no NaN/Inf, no duplicate keys, and, with
--input, every input key is in the cache or in `_errors` (nothing lost, nothing extra). The model
check rebuilds the run identity the encoder would record for the manifest's own config and the
given model (weights sha256, family, latent space, preprocessing) and diffs it with the manifest.

Reconstruction decodes a seeded sample of keys with the same VAE (latent-space convention undone,
one key at a time so memory stays bounded; exact banded or diffusers-tiled decode for large
latents), rebuilds the preprocessed source image from the input and scores the pair.

Everything lands in OUT/_audit/: metrics.parquet, summary.json, report.html.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from . import storage
from .buckets import BucketPlanner
from .config import ConfigError, EncodeConfig, opt
from .manifest import identity_diff
from .metrics import Lpips, distribution, json_number, lpips_status, pair_metrics
from .models import ModelError, ModelSpec, latent_space_for, load_vae, model_device, weights_sha256
from .preprocess import ImageError, PreprocessSpec, preprocess_image
from .reader import Cache, CacheFile, LatentBlock
from .rows import CROP
from .sinks import parquet_bytes
from .sources import ShardRef, SourceOptions, plan_shards, READERS as SAMPLE_READERS

log = logging.getLogger(__name__)

AUDIT_DIR = "_audit"
MAX_LISTED_FAILURES = 200  # per kind, in summary.json; the counts are always complete
AUTO_TILE_LATENT = 128  # latent side above which "auto" decodes in bands/tiles (1024 px for 8x VAEs)
# The reader widens bf16 to float32; every other stored dtype comes back as itself.
READ_DTYPES = {"fp16": np.float16, "fp32": np.float32, "bf16": np.float32}
IDENTITY_KINDS = {"model_sha256": "model_mismatch", "model_class": "model_mismatch",
                  "latent_space": "latent_space_mismatch", "preprocess": "preprocess_mismatch"}


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    cache: str = opt(None, "The cache to audit (the --output of encode; fsspec URL).")
    input: str = opt(None, "Input shards the cache was made from: enables the nothing-lost/nothing-extra check "
                           "(default for reconstruction: the input recorded in the manifest).")
    input_format: str = opt(None, "Input format (default: as recorded in the manifest).",
                            choices=("auto", "webdataset", "parquet", "folder"))
    model: str = opt(None, "VAE to check the cache against (sha256, latent space, preprocessing) and decode with "
                           "(default: the model recorded in the manifest, when it still exists).")
    model_class: str = opt("auto", "VAE class; auto reads the config's _class_name.", choices=("auto", "kl", "flux2", "dc", "qwenimage", "wan", "hunyuanimage", "tiny", "vq"))
    model_config: str = opt(None, "Local diffusers config directory for a single-file checkpoint.")
    allow_pickle: bool = opt(False, "Allow pickle-based checkpoints (.ckpt/.pt/.bin); they can run arbitrary code.")
    resolution: int = opt(None, "Expected preprocessing resolution; a cache made at another one fails the check.")
    sample: int = opt(32, "Keys to decode and score (seeded random sample; 0: integrity only).")
    seed: int = opt(0, "Seed of the reconstruction sample.")
    top_k: int = opt(4, "Worst and best keys shown side by side in the report.")
    decode_tiling: str = opt("auto", "Decode large latents in exact bands, diffusers tiles, or not at all.",
                             choices=("auto", "none", "exact", "diffusers"))
    decode_on: str = opt("auto", "Where to decode: auto uses Ray GPU actors when the cluster has GPUs and "
                                 "this process has none, else this process (its GPU when it has one).",
                         choices=("auto", "driver", "ray"))
    decode_batch: int = opt(8, "Latents of one shape decoded together.")
    storage_options: dict = opt({}, "JSON object of fsspec storage options for the cache and the input.")
    config: str = opt(None, "YAML file with the same keys as the flags; flags override it.")

    def __post_init__(self) -> None:
        if not self.cache:
            raise ConfigError("--cache is required")
        if self.sample < 0 or self.top_k < 1 or self.decode_batch < 1:
            raise ConfigError("--sample must be >= 0, --top-k and --decode-batch >= 1")


# ---- findings ----------------------------------------------------------------------------------


@dataclass
class Findings:
    """Integrity failures (each names its kind and what is wrong) and informational notes."""

    failures: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def fail(self, kind: str, detail: str) -> None:
        self.failures.append({"kind": kind, "detail": detail})

    def by_kind(self) -> dict[str, int]:
        return dict(Counter(f["kind"] for f in self.failures))

    def listed(self) -> list[dict[str, str]]:
        seen: Counter = Counter()
        out = []
        for f in self.failures:
            seen[f["kind"]] += 1
            if seen[f["kind"]] <= MAX_LISTED_FAILURES:
                out.append(f)
        return out


def examples(items: list[str], n: int = 5) -> str:
    return ", ".join(map(str, items[:n])) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# ---- integrity: per file -----------------------------------------------------------------------


def check_rows(block: LatentBlock, manifest: dict[str, Any]) -> list[str]:
    counts = {len(block.keys), *(len(t) for t in block.tensors.values())}
    if counts != {block.file.rows}:
        return [f"{block.file.path}: manifest records {block.file.rows} rows, file holds {sorted(counts)}"]
    return []


def check_shapes(block: LatentBlock, manifest: dict[str, Any]) -> list[str]:
    expected = block.file.latent_shape
    out = []
    for name, arr in block.tensors.items():
        shape = tuple(arr.shape[1:]) if name != "codes" else (expected[0], *arr.shape[1:])
        if shape != expected:
            out.append(f"{block.file.path}: {name} has shape {list(shape)}, manifest records {list(expected)}")
    return out


def check_dtypes(block: LatentBlock, manifest: dict[str, Any]) -> list[str]:
    expected = np.dtype(READ_DTYPES[manifest["store_dtype"]])
    return [f"{block.file.path}: {name} is {arr.dtype}, manifest records {manifest['store_dtype']}"
            for name, arr in block.tensors.items() if name != "codes" and arr.dtype != expected]


def check_finite(block: LatentBlock, manifest: dict[str, Any]) -> list[str]:
    out = []
    for name, arr in block.tensors.items():
        if np.issubdtype(arr.dtype, np.floating) and len(arr):
            bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
            keys = [k for k, b in zip(block.keys, bad) if b]
            if keys:
                out.append(f"{block.file.path}: {name} has NaN/Inf in {len(keys)} row(s): {examples(keys)}")
    return out


BLOCK_CHECKS: dict[str, Callable[[LatentBlock, dict[str, Any]], list[str]]] = {
    "row_count": check_rows,
    "shape": check_shapes,
    "dtype": check_dtypes,
    "non_finite": check_finite,
}


def read_block(cache: Cache, file: CacheFile, findings: Findings) -> LatentBlock | None:
    try:
        return cache.read(file)
    except FileNotFoundError:
        findings.fail("missing_file", f"{file.path}: listed in the manifest but absent")
    except Exception as exc:  # noqa: BLE001 - any parse error (truncation, garbage) means "unreadable"
        findings.fail("unreadable_file", f"{file.path}: {storage.describe(exc)}")
    return None


@dataclass
class CacheScan:
    """Where each key lives (file index, row) and its stored crop metadata, from one pass."""

    where: dict[str, tuple[int, int]] = field(default_factory=dict)
    crops: dict[str, dict[str, int | None]] = field(default_factory=dict)
    rows: int = 0


def scan_cache(cache: Cache, findings: Findings) -> CacheScan:
    scan = CacheScan()
    for index, file in enumerate(cache.files):
        block = read_block(cache, file, findings)
        if block is None:
            continue
        for kind, check in BLOCK_CHECKS.items():
            for detail in check(block, cache.manifest):
                findings.fail(kind, detail)
        record_keys(scan, block, index, findings)
    findings.checks += ["files", *BLOCK_CHECKS, "duplicate_key"]
    return scan


def record_keys(scan: CacheScan, block: LatentBlock, index: int, findings: Findings) -> None:
    crop_columns = {n: block.meta.get(n, [None] * len(block.keys)) for n, _ in CROP}
    for row, key in enumerate(block.keys):
        scan.rows += 1
        if key in scan.where:
            other = scan.where[key][0]
            findings.fail("duplicate_key", f"key {key!r} in {block.file.path} already in file #{other}")
            continue
        scan.where[key] = (index, row)
        scan.crops[key] = {n: c[row] for n, c in crop_columns.items()}


# ---- integrity: the manifest as a whole ----------------------------------------------------------


def check_complete(cache: Cache, findings: Findings) -> None:
    m = cache.manifest
    if not m.get("complete", False):
        findings.fail("incomplete", "manifest says the run is incomplete")
    for shard, reason in (m.get("failed_shards") or {}).items():
        findings.fail("incomplete", f"shard {shard} failed: {reason}")


def check_counts(cache: Cache, findings: Findings) -> None:
    for name, rec in cache.manifest["shards"].items():
        if rec["input"] != rec["written"] + rec["failed"]:
            findings.fail("counts", f"shard {name}: input {rec['input']} != written {rec['written']} + failed {rec['failed']}")
        in_files = sum(f["rows"] for f in rec["files"])
        if in_files != rec["written"]:
            findings.fail("counts", f"shard {name}: files list {in_files} rows but {rec['written']} were written")


def error_keys(cache: Cache, findings: Findings) -> list[str]:
    try:
        return [k for k in cache.errors().column("key").to_pylist() if k is not None]
    except FileNotFoundError:
        findings.fail("missing_file", "_errors.parquet: absent")
    except Exception as exc:  # noqa: BLE001
        findings.fail("unreadable_file", f"_errors.parquet: {storage.describe(exc)}")
    return []


def check_input_keys(input_keys: list[str], scan: CacheScan, errors: list[str], findings: Findings) -> None:
    """Nothing lost (every input key is cached or an error row), nothing extra (no key from elsewhere)."""
    accounted = set(scan.where) | set(errors)
    missing = sorted(set(input_keys) - accounted)
    extra = sorted(set(scan.where) - set(input_keys))
    for key in missing:
        findings.fail("missing_key", f"input key {key!r} is neither in the cache nor in _errors")
    for key in extra:
        findings.fail("extra_key", f"cache key {key!r} is not in the input")
    findings.checks.append("input_keys")


# ---- integrity: model and preprocessing (stale cache) --------------------------------------------


def recorded_config(manifest: dict[str, Any], **overrides: Any) -> EncodeConfig:
    """The manifest's encode config as today's `EncodeConfig` (fields it does not know are dropped)."""
    known = {f.name for f in dataclasses.fields(EncodeConfig)}
    values = {k: v for k, v in manifest.get("config", {}).items() if k in known}
    return EncodeConfig(**{**values, **overrides})


def expected_identity(cfg: AuditConfig, manifest: dict[str, Any], vae: Any, family: str) -> dict[str, Any]:
    """The identity `latentcache encode` would record today for the manifest's config and this model."""
    from .pipeline import identity  # the encoder's own definition, so the two can never drift apart

    overrides = {"model": cfg.model or manifest["model"], "model_class": cfg.model_class,
                 "model_config": cfg.model_config, "allow_pickle": cfg.allow_pickle}
    enc = recorded_config(manifest, **overrides, **({"resolution": cfg.resolution} if cfg.resolution is not None else {}))
    ident = identity(enc, weights_sha256(enc.model), family, latent_space_for(vae, enc).to_dict())
    return json.loads(json.dumps(ident))  # tuples -> lists, as the manifest stores them


def check_identity(cfg: AuditConfig, manifest: dict[str, Any], vae: Any, family: str, findings: Findings) -> None:
    expected = expected_identity(cfg, manifest, vae, family)
    for key in identity_diff(manifest, expected):
        findings.fail(IDENTITY_KINDS.get(key, "config_mismatch"),
                      f"{key}: cache has {json.dumps(manifest.get(key), sort_keys=True)}, "
                      f"{cfg.model or manifest['model']} gives {json.dumps(expected.get(key), sort_keys=True)}")
    findings.checks.append("model_identity")


def model_spec(cfg: AuditConfig, manifest: dict[str, Any], findings: Findings) -> ModelSpec | None:
    """--model, else the recorded model while it still exists (a hub id only from the local cache)."""
    if cfg.model:
        return ModelSpec(model=cfg.model, model_class=cfg.model_class, model_config=cfg.model_config,
                         allow_pickle=cfg.allow_pickle)
    recorded = manifest.get("model")
    if recorded and (os.path.exists(recorded) or weights_sha256(recorded)):
        findings.notes.append(f"no --model given: using the model recorded in the manifest, {recorded}")
        return ModelSpec(model=recorded, model_class=cfg.model_class, model_config=cfg.model_config,
                         allow_pickle=cfg.allow_pickle)
    findings.notes.append(f"no --model given and the recorded model {recorded} is not available: "
                          "model check and reconstruction skipped")
    return None


# ---- reconstruction: sources -----------------------------------------------------------------


def source_options(cfg: AuditConfig, enc: EncodeConfig) -> SourceOptions:
    return SourceOptions(storage_options=cfg.storage_options, image_column=enc.image_column,
                         key_column=enc.key_column, caption_column=enc.caption_column)


def input_shards(cfg: AuditConfig, enc: EncodeConfig) -> list[ShardRef]:
    return plan_shards(cfg.input or enc.input, cfg.input_format or enc.input_format, cfg.storage_options)


def source_preprocessing(enc: EncodeConfig) -> tuple[PreprocessSpec, BucketPlanner]:
    """The preprocessing the encoder ran (as pipeline.encoded_dataset builds it): size, buckets, crops."""
    return (PreprocessSpec(resolution=enc.resolution, max_pixels=enc.max_pixels, min_size=enc.min_size),
            BucketPlanner.from_config(enc))


def read_inputs(shards: list[ShardRef], options: SourceOptions, wanted: set[str],
                findings: Findings) -> tuple[list[str], dict[str, bytes | None]]:
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


# ---- reconstruction: decode ----------------------------------------------------------------------


def to_uint8_hwc(x: Any) -> np.ndarray:
    """Decoder output in [-1, 1], [B, 3, H, W] -> uint8 [B, H, W, 3], as pipelines post-process."""
    import torch

    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _plain(vae: Any, z: Any) -> Any:
    if hasattr(vae, "disable_tiling"):  # an earlier large latent may have switched tiling on
        vae.disable_tiling()
    return vae.decode(z).sample


def _diffusers_tiled(vae: Any, z: Any) -> Any:
    vae.enable_tiling()
    return vae.decode(z).sample


def _exact(vae: Any, z: Any) -> Any:
    from .tiling import exact_decode

    return exact_decode(vae, z)


DECODERS: dict[str, Callable[[Any, Any], Any]] = {"none": _plain, "diffusers": _diffusers_tiled, "exact": _exact}


class Decoder:
    """The VAE on one device; raw latents [B, C, h, w] -> uint8 images [B, H, W, 3]. Also a Ray actor class."""

    def __init__(self, *, model: ModelSpec, tiling: str) -> None:
        self.device = model_device()
        vae, self.family = load_vae(model)
        self.vae = vae.to(self.device)  # load_vae gives float32
        self.tiling = tiling

    def mode(self, z: Any) -> str:
        if self.tiling != "auto":
            return self.tiling
        if max(z.shape[-2:]) <= AUTO_TILE_LATENT:
            return "none"
        from .tiling import exact_tiling_support

        return "exact" if exact_tiling_support(self.vae, "decoder")[0] else "diffusers"

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """Raw latents [B, C, h, w] of one shape -> uint8 images [B, H, W, 3]."""
        import torch

        z = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            return to_uint8_hwc(self.family.decode(self.vae, z, tiling=self.mode(z)))


def shape_batches(latents: dict[str, np.ndarray], size: int) -> list[list[str]]:
    """Keys in batches of at most `size` latents of one shape (aspect buckets differ in shape)."""
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for key, z in latents.items():
        by_shape.setdefault(z.shape, []).append(key)
    return [keys[i:i + size] for keys in by_shape.values() for i in range(0, len(keys), size)]


def decode_on_driver(latents: dict[str, np.ndarray], model: ModelSpec, cfg: AuditConfig) -> dict[str, np.ndarray]:
    decoder = Decoder(model=model, tiling=cfg.decode_tiling)
    out: dict[str, np.ndarray] = {}
    for keys in shape_batches(latents, cfg.decode_batch):
        out.update(zip(keys, decoder.decode(np.stack([latents[k] for k in keys]))))
    return out


def decode_job(latents: dict[str, np.ndarray], model: ModelSpec, cfg: AuditConfig) -> dict[str, np.ndarray]:
    """Ray wiring, kept apart: one decoder actor per GPU (one CPU actor without GPUs), batches spread over them."""
    import ray
    from ray.util import ActorPool

    from .pipeline import ensure_ray

    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(Decoder)
    actors = [actor.remote(model=model, tiling=cfg.decode_tiling) for _ in range(max(gpus, 1))]
    batches = shape_batches(latents, cfg.decode_batch)
    images = ActorPool(actors).map(lambda a, keys: a.decode.remote(np.stack([latents[k] for k in keys])), batches)
    out = {key: img for keys, imgs in zip(batches, images) for key, img in zip(keys, imgs)}
    for a in actors:
        ray.kill(a)
    return out


def decode_where(cfg: AuditConfig) -> str:
    if cfg.decode_on != "auto":
        return cfg.decode_on
    import torch

    if torch.cuda.is_available() or not os.environ.get("RAY_ADDRESS"):
        return "driver"
    from .pipeline import ensure_ray
    import ray

    ensure_ray()
    return "ray" if ray.cluster_resources().get("GPU", 0) else "driver"


DECODE_PLACES = {"driver": decode_on_driver, "ray": decode_job}


# ---- reconstruction: the sample --------------------------------------------------------------


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


def rebuild_source(key: str, data: bytes | None, prep: tuple[PreprocessSpec, BucketPlanner],
                   stored_crop: dict[str, int | None]) -> tuple[np.ndarray | None, str, bool | None]:
    """The preprocessed source image, and whether its crop metadata still equals the stored one."""
    try:
        pixels, meta = preprocess_image(data, prep[0], key=key, planner=prep[1])
    except ImageError as exc:
        return None, f"source_error: {exc}", None
    same = all(v is None or getattr(meta, n, v) == v for n, v in stored_crop.items())
    return pixels.transpose(1, 2, 0), "ok", same


def make_pairs(keys: list[str], images: dict[str, bytes | None], decoded: dict[str, np.ndarray],
               scan: CacheScan, prep: tuple[PreprocessSpec, BucketPlanner]) -> list[Pair]:
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
        row = {"key": p.key, "status": p.status, "crop_matches": p.crop_matches,
               "height": p.reconstruction.shape[0], "width": p.reconstruction.shape[1]}
        row.update({name: fn(p.original, p.reconstruction) if ok else None for name, fn in metrics.items()})
        rows.append(row)
    return rows


METRICS_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("file", pa.string()), ("status", pa.string()),
                            ("crop_matches", pa.bool_()), ("height", pa.int32()), ("width", pa.int32()),
                            ("psnr", pa.float64()), ("ssim", pa.float64()), ("lpips", pa.float64())])


def metrics_table(rows: list[dict[str, Any]], cache: Cache, scan: CacheScan) -> pa.Table:
    files = cache.files
    full = [{**r, "file": files[scan.where[r["key"]][0]].path, "shard": files[scan.where[r["key"]][0]].shard}
            for r in rows]
    return pa.Table.from_pylist(full, schema=METRICS_SCHEMA)


# ---- the audit ---------------------------------------------------------------------------------


@dataclass
class Reconstruction:
    rows: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    decode: dict[str, Any] = field(default_factory=dict)


def reconstruct(cfg: AuditConfig, cache: Cache, scan: CacheScan, spec: ModelSpec | None, keys: list[str],
                images: dict[str, bytes | None], findings: Findings) -> Reconstruction:
    if not keys or spec is None:
        return Reconstruction()
    if cache.manifest.get("model_class") == "vq" and cache.manifest.get("vq_output") == "codes":
        findings.notes.append("the cache stores VQ codes only: reconstruction skipped")
        return Reconstruction()
    where = decode_where(cfg)
    started = time.time()
    decoded = DECODE_PLACES[where](load_latents(cache, scan, keys), spec, cfg)
    seconds = time.time() - started
    pairs = make_pairs(keys, images, decoded, scan, source_preprocessing(recorded_config(cache.manifest)))
    status = lpips_status()
    rows = score(pairs, pair_metrics(Lpips() if status.available else None))
    return Reconstruction(rows, pairs, {"where": where, "tiling": cfg.decode_tiling, "seconds": round(seconds, 2),
                                        "device": "ray actors" if where == "ray" else str(model_device())})


def run_audit(cfg: AuditConfig) -> dict[str, Any]:
    """Audits cfg.cache; writes OUT/_audit/{metrics.parquet,summary.json,report.html}; returns the summary."""
    from .report import render_report

    started = time.time()
    cache = Cache(cfg.cache, storage_options=cfg.storage_options)
    findings = Findings()
    scan = scan_cache(cache, findings)
    check_complete(cache, findings)
    check_counts(cache, findings)
    errors = error_keys(cache, findings)
    spec = check_model(cfg, cache.manifest, model_spec(cfg, cache.manifest, findings), findings)
    keys = sample_keys(list(scan.where), cfg.sample, cfg.seed) if spec is not None else []
    images = gather_inputs(cfg, cache, scan, errors, keys, findings)
    recon = reconstruct(cfg, cache, scan, spec, keys, images, findings)
    table = metrics_table(recon.rows, cache, scan)
    summary = build_summary(cfg, cache, scan, errors, findings, recon, time.time() - started)
    write_outputs(cache, summary, table, render_report(summary, recon.rows, recon.pairs, cfg.top_k))
    summary["seconds"] = round(time.time() - started, 2)
    return summary


def check_model(cfg: AuditConfig, manifest: dict[str, Any], spec: ModelSpec | None,
                findings: Findings) -> ModelSpec | None:
    """The stale-cache check; returns the spec to decode with, or None when the model is unusable."""
    if spec is None:
        return None
    try:
        vae, family = load_vae(spec)
    except ModelError as exc:
        if cfg.model:
            raise
        findings.notes.append(f"recorded model cannot be loaded ({exc}): model check and reconstruction skipped")
        return None
    check_identity(dataclasses.replace(cfg, model=spec.model), manifest, vae, family.name, findings)
    return spec


def gather_inputs(cfg: AuditConfig, cache: Cache, scan: CacheScan, errors: list[str], keys: list[str],
                  findings: Findings) -> dict[str, bytes | None]:
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
    input_keys, images = read_inputs(shards if cfg.input else shards_of(keys, scan, cache, shards), options,
                                     set(keys), findings)
    if cfg.input:
        check_input_keys(input_keys, scan, errors, findings)
    return images


def build_summary(cfg: AuditConfig, cache: Cache, scan: CacheScan, errors: list[str], findings: Findings,
                  recon: Reconstruction, seconds: float) -> dict[str, Any]:
    scored = [r for r in recon.rows if r["status"] == "ok"]
    lp = lpips_status()
    return {
        "cache": cfg.cache, "ok": not findings.failures,
        "counts": {"files": len(cache.files), "rows_recorded": sum(f.rows for f in cache.files), "rows_read": scan.rows,
                   "keys": len(scan.where), "error_rows": len(errors), "sampled": len(recon.rows),
                   "scored": len(scored)},
        "checks": findings.checks, "failures_by_kind": findings.by_kind(), "failures": findings.listed(),
        "notes": findings.notes,
        "metrics": {name: distribution([r[name] for r in scored]) for name in ("psnr", "ssim", "lpips")
                    if name != "lpips" or lp.available},
        "lpips": {"available": lp.available, "reason": lp.reason},
        "sample": {"requested": cfg.sample, "seed": cfg.seed,
                   "status": dict(Counter(r["status"].split(":")[0] for r in recon.rows)),
                   "crop_mismatches": sum(1 for r in recon.rows if r["crop_matches"] is False)},
        "decode": recon.decode, "model": cfg.model or cache.manifest.get("model"),
        "manifest_model_sha256": cache.manifest.get("model_sha256"),
        "latent_space": cache.manifest.get("latent_space"), "preprocess": cache.manifest.get("preprocess"),
        "seconds": round(seconds, 2),
    }


def write_outputs(cache: Cache, summary: dict[str, Any], table: pa.Table, html: str) -> None:
    opts = cache.storage_options
    storage.write_bytes(cache.url(f"{AUDIT_DIR}/metrics.parquet"), parquet_bytes(table), opts)
    storage.write_bytes(cache.url(f"{AUDIT_DIR}/summary.json"),
                        json.dumps(summary, indent=2, default=json_number, allow_nan=False).encode(), opts)
    storage.write_bytes(cache.url(f"{AUDIT_DIR}/report.html"), html.encode(), opts)
    summary["outputs"] = {name: cache.url(f"{AUDIT_DIR}/{name}") for name in ("metrics.parquet", "summary.json", "report.html")}


def format_summary(summary: dict[str, Any]) -> str:
    """The lines the CLI prints: verdict, failures by kind, metric distributions, where the outputs are."""
    c = summary["counts"]
    lines = [f"audit: {'PASSED' if summary['ok'] else 'FAILED'}  ({c['files']} files, {c['keys']} keys, "
             f"{c['error_rows']} error rows, {summary['seconds']}s)"]
    lines += [f"  FAILED {kind}: {n}" for kind, n in sorted(summary["failures_by_kind"].items())]
    lines += [f"    {f['kind']}: {f['detail']}" for f in summary["failures"][:20]]
    for name, dist in summary["metrics"].items():
        if dist:
            lines.append(f"{name}: mean {fmt_metric(dist['mean'])}  median {fmt_metric(dist['median'])}  "
                         f"p5 {fmt_metric(dist['p5'])}  over {dist['count']} keys")
    lines.append(summary["lpips"]["reason"])
    lines += [f"note: {n}" for n in summary["notes"]]
    lines += [f"{name}: {url}" for name, url in summary.get("outputs", {}).items()]
    return "\n".join(lines)


def fmt_metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
