"""Run configuration: one frozen dataclass per command, filled from YAML and then from flags.

Each field carries its own help text and choices, so the YAML keys, the CLI flags and `--help`
come from one place and cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .cache.codecs import CODECS


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and why."""


def opt(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None, secret: bool = False) -> Any:
    """`secret`: left out of the config's repr, so a logged or raised config never shows credentials."""
    meta = {"help": help, "choices": choices, "flag": flag, "secret": secret}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, repr=not secret)
    return field(default=default, metadata=meta, repr=not secret)


DTYPES = ("fp32", "fp16", "bf16")
STORE_DTYPES = tuple(CODECS)  # the cache's codec registry: fp32, fp16, bf16, int8, fp8


@dataclass(frozen=True, kw_only=True)
class EncodeConfig:
    input: str = opt(None, "Input shards: fsspec URL, glob, or brace range such as shards/shard-{00000..00099}.tar.")
    output: str = opt(None, "Output directory or prefix (fsspec URL) for the cache.")
    model: str = opt(None, "VAE: diffusers model directory, hub id (local HF cache), or single-file .safetensors.")
    input_format: str = opt("auto", "Input format; auto picks from the URL.", choices=("auto", "webdataset", "parquet", "folder"))
    image_column: str = opt("image", "Parquet input: column holding image bytes (or a struct with a 'bytes' field).")
    key_column: str = opt("key", "Parquet input: column holding the sample key (row number when absent).")
    caption_column: str = opt("caption", "Parquet input: column holding the caption (none when absent).")
    storage_options: dict = opt({}, "JSON object of fsspec storage options, e.g. '{\"endpoint_url\": \"http://...\"}'.", secret=True)
    resolution: int = opt(256, "Square target side R: resize the shorter side to R (bicubic, antialiased), center-crop RxR.")
    max_pixels: int = opt(89_478_485, "Decompression-bomb guard: images with more pixels become error rows.")
    min_size: int = opt(0, "Images whose shorter side is below this become error rows (0: upscale them instead).")
    buckets: bool | list = opt(False, "Aspect-ratio buckets: generated from --bucket-area/--bucket-step (flag, or YAML true), or a YAML list of [h, w].")
    bucket_area: str = opt(None, "Target pixel area HxW of generated buckets, e.g. 1024x1024 (default: --resolution squared).")
    bucket_step: int = opt(64, "Side step of generated buckets (a multiple of 8).")
    bucket_min: int = opt(None, "Smallest bucket side (default: half the area's square side).")
    bucket_max: int = opt(None, "Largest bucket side (default: twice the area's square side).")
    bucket_no_upscale: bool = opt(False, "Never upscale: an image smaller than its bucket gets the largest bucket of the same ratio that fits.")
    crop: str = opt("center", "Crop position after resizing to cover the target; random is seeded per key by --seed.", choices=("center", "random"))
    flip: str = opt("none", "With both, also store latent_flipped: the latent of the horizontally flipped crop.", choices=("none", "both"))
    model_class: str = opt("auto", "VAE class; auto reads the config's _class_name.", choices=("auto", "kl", "tiny", "vq"))
    model_config: str = opt(None, "Local diffusers config directory for a single-file checkpoint (works offline).")
    model_subfolder: str = opt(None, "Subfolder of --model that holds the VAE, e.g. vae in a full pipeline repo.")
    allow_pickle: bool = opt(False, "Allow pickle-based checkpoints (.ckpt/.pt/.bin); they can run arbitrary code.")
    posterior: str = opt("mode", "Latent to store: the posterior's mode, or a sample drawn per key from --seed.", choices=("mode", "sample"))
    store_posterior: bool = opt(False, "Also store posterior_mean and posterior_std (scaled) so trainers can resample.")
    seed: int = opt(0, "Seed for --posterior sample and --crop random; the same key and seed always give the same result.")
    scaling_factor: float = opt(None, "Override the model config's scaling_factor.")
    shift_factor: float = opt(None, "Override the model config's shift_factor.")
    latents_mean: list = opt(None, "Override per-channel latents_mean (JSON list).")
    latents_std: list = opt(None, "Override per-channel latents_std (JSON list).")
    vq_output: str = opt("latent", "VQModel: store the pre-quantisation latent, the codebook indices, or both.", choices=("latent", "codes", "both"))
    dtype: str = opt("fp32", "Compute dtype of the encoder.", choices=DTYPES)
    no_upcast: bool = opt(False, "Run fp16 even on models whose config sets force_upcast.")
    store_dtype: str = opt("fp16", "Dtype of stored latents (bf16 only with --format safetensors; int8/fp8: per-row, "
                                   "per-channel 8-bit codes + float32 params, see docs/cache-format.md).",
                           choices=STORE_DTYPES)
    batch_size: int = opt(16, "Images per encoder batch.")
    slicing: bool = opt(False, "Encode one image at a time inside a batch (diffusers enable_slicing).")
    tiling: str = opt("auto", "Tiled encoding: exact (band by band, equal to the full encode at bounded memory), "
                      "diffusers (approximate), none; auto = exact above --tile-threshold pixels.",
                      choices=("auto", "exact", "diffusers", "none"))
    tile_threshold: int = opt(1 << 20, "With --tiling auto, images with more pixels than this are encoded exactly in bands.")
    band_mb: float = opt(64.0, "Exact tiling: working memory of one band, in MB.")
    tile_size: int = opt(512, "Tile size in pixels for --tiling diffusers.")
    tile_overlap: float = opt(0.25, "Tile overlap fraction for --tiling diffusers.")
    channels_last: bool = opt(False, "Run the encoder in channels_last memory format (faster convs on many GPUs/CPUs).")
    compile: bool = opt(False, "torch.compile the encoder (one compile per image shape; pays off on long runs).")
    format: str = opt("parquet", "Output file format, one file per input shard.", choices=("parquet", "safetensors"))
    tensor_layout: str = opt("nested", "Parquet latent layout: nested lists (any reader, Hugging Face datasets, any shapes) or the canonical Arrow tensor (ray.data.read_parquet gives [B, C, h, w]).", choices=("nested", "fixed_shape_tensor"))
    num_encoders: int = opt(None, "Encoder actors; default: one per GPU, or 1 on CPU.")
    decode_cpus: float = opt(1.0, "CPUs reserved by each decode/preprocess task.")
    encoder_threads: int = opt(None, "torch threads per CPU encoder actor; default: the node's cores.")
    rows_per_block: int = opt(64, "Rows per block read from a shard (bounds memory per read task).")
    overwrite: bool = opt(False, "Replace an output whose manifest names a different model or preprocessing.")
    config: str = opt(None, "YAML file with the same keys as the flags; flags override it.")

    def __post_init__(self) -> None:
        validate_encode(self)


def validate_encode(cfg: EncodeConfig) -> None:
    for name in ("input", "output", "model"):
        if not getattr(cfg, name):
            raise ConfigError(f"--{name.replace('_', '-')} is required")
    positive = {"resolution": cfg.resolution, "batch_size": cfg.batch_size, "rows_per_block": cfg.rows_per_block,
                "tile_size": cfg.tile_size}
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if cfg.resolution % 8:
        raise ConfigError(f"--resolution must be a multiple of 8, got {cfg.resolution}")
    if not 0 <= cfg.tile_overlap < 1:
        raise ConfigError(f"--tile-overlap must be a fraction of a tile in [0, 1), got {cfg.tile_overlap}")
    from .buckets import validate_bucket_config  # buckets imports this module

    validate_bucket_config(cfg)
    if cfg.store_dtype == "bf16" and cfg.format != "safetensors":
        raise ConfigError("--store-dtype bf16 needs --format safetensors (Parquet has no bfloat16)")
    if cfg.num_encoders is not None and cfg.num_encoders <= 0:
        raise ConfigError(f"--num-encoders must be positive, got {cfg.num_encoders}")
    for name in ("latents_mean", "latents_std"):
        value = getattr(cfg, name)
        if value is not None and not all(isinstance(v, (int, float)) for v in value):
            raise ConfigError(f"--{name.replace('_', '-')} must be a list of numbers")


# ---- building argparse from a dataclass, and merging YAML < flags ----------------------------


def _base_type(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) or tp


def _value_kind(tp: Any, value: Any) -> Any:
    """The union member a value is (`bool | list` takes YAML `true` or a list), else the base type."""
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    return next((m for m in members if m is not type(None) and type(value) is m), _base_type(tp))


def _json_arg(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON: {exc.msg}") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"expected a JSON {kind.__name__}")
        return value

    parse.__name__ = f"JSON {kind.__name__}"
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field; defaults are suppressed so that only flags the user typed override YAML."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _base_type(hints[f.name])
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata["help"] + ("" if default in (None, False, {}, []) else f" (default: {default})")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            parser.add_argument(flag, action="store_true", **kwargs)
        elif kind in (dict, list):
            parser.add_argument(flag, type=_json_arg(kind), **kwargs)
        else:
            parser.add_argument(flag, type=kind, choices=f.metadata.get("choices"), **kwargs)


def load_yaml(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type, flags: dict[str, Any]) -> Any:
    """Defaults < YAML (--config) < flags. Unknown YAML keys and wrong types are errors."""
    values = load_yaml(flags["config"]) if flags.get("config") else {}
    values.update(flags)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        check_value(name, value, _value_kind(hints[name], value), known[name].metadata.get("choices"))
    return cls(**values)


def check_value(name: str, value: Any, kind: type, choices: tuple | None) -> None:
    flag = "--" + name.replace("_", "-")
    if value is None:
        return
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{flag}: expected {kind.__name__}, got {value!r}")
    if choices and value not in choices:
        raise ConfigError(f"{flag}: {value!r} is not one of {', '.join(map(str, choices))}")


def public_dict(cfg: Any) -> dict[str, Any]:
    """The config as recorded in a manifest: storage options are left out (they may hold secrets)."""
    data = dataclasses.asdict(cfg)
    data.pop("storage_options", None)
    data.pop("config", None)
    return data
