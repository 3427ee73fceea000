"""`latentcache encode`'s configuration: one frozen dataclass, filled from YAML and then from flags.

The plumbing (`opt`, argparse, YAML) lives in `options.py`; it is re-exported here for the commands.
"""

from __future__ import annotations

from dataclasses import dataclass

from .buckets import validate_bucket_config
from .cache.codecs import CODECS
from .options import HELP_GROUPS, ConfigError, add_dataclass_arguments, build_config, opt, public_dict

__all__ = [
    "HELP_GROUPS",
    "ConfigError",
    "EncodeConfig",
    "add_dataclass_arguments",
    "build_config",
    "opt",
    "public_dict",
]

DTYPES = ("fp32", "fp16", "bf16")
STORE_DTYPES = tuple(CODECS)  # the cache's codec registry: fp32, fp16, bf16, int8, fp8


@dataclass(frozen=True, kw_only=True)
class EncodeConfig:
    input: str = opt(
        None,
        "Required. Input shards: fsspec URL, glob, or brace range such as shards/shard-{00000..00099}.tar.",
        group="input",
    )
    output: str = opt(None, "Required. Output directory or prefix (fsspec URL) for the cache.", group="output")
    model: str = opt(
        None,
        "Required. VAE: diffusers model directory, hub id (local HF cache), or single-file .safetensors.",
        group="model",
    )
    input_format: str = opt(
        "auto",
        "Input format; auto picks from the URL.",
        choices=("auto", "webdataset", "parquet", "folder"),
        group="input",
    )
    image_column: str = opt(
        "image", "Parquet input: column holding image bytes (or a struct with a 'bytes' field).", group="input"
    )
    key_column: str = opt(
        "key", "Parquet input: column holding the sample key (row number when absent).", group="input"
    )
    caption_column: str = opt("caption", "Parquet input: column holding the caption (none when absent).", group="input")
    storage_options: dict = opt(
        {},
        'JSON object of fsspec storage options, e.g. \'{"endpoint_url": "http://..."}\'.',
        secret=True,
        group="input",
    )
    resolution: int = opt(
        256,
        "Square target side R: resize the shorter side to R (bicubic, antialiased), center-crop RxR.",
        group="preprocessing",
    )
    jpeg_draft: bool = opt(
        False,
        "Decode JPEGs at least 2x the target at 1/2, 1/4 or 1/8 scale in the DCT domain "
        "(faster; see docs/benchmarks.md).",
        group="preprocessing",
    )
    max_pixels: int = opt(
        89_478_485, "Decompression-bomb guard: images with more pixels become error rows.", group="preprocessing"
    )
    min_size: int = opt(
        0, "Images whose shorter side is below this become error rows (0: upscale them instead).", group="preprocessing"
    )
    buckets: bool | list = opt(
        False,
        "Aspect-ratio buckets: generated from --bucket-area/--bucket-step (flag, or YAML true), "
        "or a YAML list of [h, w].",
        group="preprocessing",
    )
    bucket_area: str = opt(
        None,
        "Target pixel area HxW of generated buckets, e.g. 1024x1024 (default: --resolution squared).",
        group="preprocessing",
    )
    bucket_step: int = opt(64, "Side step of generated buckets (a multiple of 8).", group="preprocessing")
    bucket_min: int = opt(None, "Smallest bucket side (default: half the area's square side).", group="preprocessing")
    bucket_max: int = opt(None, "Largest bucket side (default: twice the area's square side).", group="preprocessing")
    bucket_no_upscale: bool = opt(
        False,
        "Never upscale: an image smaller than its bucket gets the largest bucket of the same ratio that fits.",
        group="preprocessing",
    )
    crop: str = opt(
        "center",
        "Crop position after resizing to cover the target; random is seeded per key by --seed.",
        choices=("center", "random"),
        group="preprocessing",
    )
    flip: str = opt(
        "none",
        "With both, also store latent_flipped: the latent of the horizontally flipped crop.",
        choices=("none", "both"),
        group="preprocessing",
    )
    model_class: str = opt(
        "auto",
        "VAE class; auto reads the config's _class_name.",
        choices=("auto", "kl", "flux2", "dc", "qwenimage", "wan", "hunyuanimage", "tiny", "vq"),
        group="model",
    )
    model_config: str = opt(
        None, "Local diffusers config directory for a single-file checkpoint (works offline).", group="model"
    )
    model_subfolder: str = opt(
        None, "Subfolder of --model that holds the VAE, e.g. vae in a full pipeline repo.", group="model"
    )
    allow_pickle: bool = opt(
        False, "Allow pickle-based checkpoints (.ckpt/.pt/.bin); they can run arbitrary code.", group="model"
    )
    posterior: str = opt(
        "mode",
        "Latent to store: the posterior's mode, or a sample drawn per key from --seed.",
        choices=("mode", "sample"),
        group="latents",
    )
    store_posterior: bool = opt(
        False, "Also store posterior_mean and posterior_std (scaled) so trainers can resample.", group="latents"
    )
    seed: int = opt(
        0,
        "Seed for --posterior sample and --crop random; the same key and seed always give the same result.",
        group="latents",
    )
    scaling_factor: float = opt(
        None, "Override the model config's scaling_factor (default: the model config's).", group="latents"
    )
    shift_factor: float = opt(
        None, "Override the model config's shift_factor (default: the model config's).", group="latents"
    )
    latents_mean: list = opt(
        None, "Override per-channel latents_mean (JSON list; default: the model config's).", group="latents"
    )
    latents_std: list = opt(
        None, "Override per-channel latents_std (JSON list; default: the model config's).", group="latents"
    )
    vq_output: str = opt(
        "latent",
        "VQModel: store the pre-quantisation latent, the codebook indices, or both.",
        choices=("latent", "codes", "both"),
        group="latents",
    )
    dtype: str = opt("fp32", "Compute dtype of the encoder.", choices=DTYPES, group="model")
    no_upcast: bool = opt(False, "Run fp16 even on models whose config sets force_upcast.", group="model")
    store_dtype: str = opt(
        "fp16",
        "Dtype of stored latents (bf16 only with --format safetensors; int8/fp8: per-row, "
        "per-channel 8-bit codes + float32 params, see docs/cache-format.md).",
        choices=STORE_DTYPES,
        group="latents",
    )
    batch_size: int = opt(16, "Images per encoder batch.", group="performance")
    slicing: bool = opt(
        False, "Encode one image at a time inside a batch (diffusers enable_slicing).", group="performance"
    )
    tiling: str = opt(
        "auto",
        "Tiled encoding: exact (band by band, equal to the full encode at bounded memory), "
        "diffusers (approximate), none; auto = exact above --tile-threshold pixels.",
        choices=("auto", "exact", "diffusers", "none"),
        group="performance",
    )
    tile_threshold: int = opt(
        1 << 20,
        "With --tiling auto, images with more pixels than this are encoded exactly in bands.",
        group="performance",
    )
    band_mb: float = opt(64.0, "Exact tiling: working memory of one band, in MB.", group="performance")
    tile_size: int = opt(512, "Tile size in pixels for --tiling diffusers.", group="performance")
    tile_overlap: float = opt(0.25, "Tile overlap fraction for --tiling diffusers.", group="performance")
    channels_last: bool = opt(
        False,
        "Run the encoder in channels_last memory format (the default on CPU; opt-in on GPUs).",
        group="performance",
    )
    no_channels_last: bool = opt(
        False, "Keep the CPU encoder in contiguous NCHW format instead of channels_last.", group="performance"
    )
    compile: bool = opt(
        False, "torch.compile the encoder (one compile per image shape; pays off on long runs).", group="performance"
    )
    format: str = opt(
        "parquet", "Output file format, one file per input shard.", choices=("parquet", "safetensors"), group="output"
    )
    tensor_layout: str = opt(
        "nested",
        "Parquet latent layout: nested lists (any reader, Hugging Face datasets, any shapes) or the canonical "
        "Arrow tensor (ray.data.read_parquet gives [B, C, h, w]).",
        choices=("nested", "fixed_shape_tensor"),
        group="output",
    )
    num_encoders: int = opt(None, "Encoder actors; default: one per GPU, or 1 on CPU.", group="cluster")
    decode_cpus: float = opt(1.0, "CPUs reserved by each decode/preprocess task.", group="cluster")
    encoder_cpus: float = opt(
        None,
        "CPUs reserved by each encoder actor; default: 1 beside a GPU, 0 on CPU (its torch threads "
        "share the cores with decoding instead of holding one back).",
        group="cluster",
    )
    encoder_threads: int = opt(None, "torch threads per CPU encoder actor; default: the node's cores.", group="cluster")
    rows_per_block: int = opt(
        64, "Rows per block read from a shard (bounds memory per read task).", group="performance"
    )
    overwrite: bool = opt(
        False, "Replace an output whose manifest names a different model or preprocessing.", group="output"
    )
    config: str = opt(None, "YAML file with the same keys as the flags; flags override it.", group="input")

    def __post_init__(self) -> None:
        validate_encode(self)


def validate_encode(cfg: EncodeConfig) -> None:
    for name in ("input", "output", "model"):
        if not getattr(cfg, name):
            raise ConfigError(f"--{name.replace('_', '-')} is required")
    positive = {
        "resolution": cfg.resolution,
        "batch_size": cfg.batch_size,
        "rows_per_block": cfg.rows_per_block,
        "tile_size": cfg.tile_size,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if cfg.resolution % 8:
        raise ConfigError(f"--resolution must be a multiple of 8, got {cfg.resolution}")
    if not 0 <= cfg.tile_overlap < 1:
        raise ConfigError(f"--tile-overlap must be a fraction of a tile in [0, 1), got {cfg.tile_overlap}")
    validate_bucket_config(cfg)
    if cfg.store_dtype == "bf16" and cfg.format != "safetensors":
        raise ConfigError("--store-dtype bf16 needs --format safetensors (Parquet has no bfloat16)")
    if cfg.num_encoders is not None and cfg.num_encoders <= 0:
        raise ConfigError(f"--num-encoders must be positive, got {cfg.num_encoders}")
    if cfg.encoder_cpus is not None and cfg.encoder_cpus < 0:
        raise ConfigError(f"--encoder-cpus must be 0 or more, got {cfg.encoder_cpus}")
    for name in ("latents_mean", "latents_std"):
        value = getattr(cfg, name)
        if value is not None and not all(isinstance(v, (int, float)) for v in value):
            raise ConfigError(f"--{name.replace('_', '-')} must be a list of numbers")
