"""`AuditConfig`: the flags of `latentcache audit`."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, opt


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    cache: str = opt(None, "The cache to audit (the --output of encode; fsspec URL).")
    input: str = opt(
        None,
        "Input shards the cache was made from: enables the nothing-lost/nothing-extra check "
        "(default for reconstruction: the input recorded in the manifest).",
    )
    input_format: str = opt(
        None,
        "Input format (default: as recorded in the manifest).",
        choices=("auto", "webdataset", "parquet", "folder"),
    )
    model: str = opt(
        None,
        "VAE to check the cache against (sha256, latent space, preprocessing) and decode with "
        "(default: the model recorded in the manifest, when it still exists).",
    )
    model_class: str = opt(
        "auto",
        "VAE class; auto reads the config's _class_name.",
        choices=("auto", "kl", "flux2", "dc", "qwenimage", "wan", "hunyuanimage", "tiny", "vq"),
    )
    model_config: str = opt(None, "Local diffusers config directory for a single-file checkpoint.")
    allow_pickle: bool = opt(False, "Allow pickle-based checkpoints (.ckpt/.pt/.bin); they can run arbitrary code.")
    resolution: int = opt(None, "Expected preprocessing resolution; a cache made at another one fails the check.")
    sample: int = opt(32, "Keys to decode and score (seeded random sample; 0: integrity only).")
    seed: int = opt(0, "Seed of the reconstruction sample.")
    top_k: int = opt(4, "Worst and best keys shown side by side in the report.")
    decode_tiling: str = opt(
        "auto",
        "Decode large latents in exact bands, diffusers tiles, or not at all.",
        choices=("auto", "none", "exact", "diffusers"),
    )
    decode_on: str = opt(
        "auto",
        "Where to decode: auto uses Ray GPU actors when the cluster has GPUs and "
        "this process has none, else this process (its GPU when it has one).",
        choices=("auto", "driver", "ray"),
    )
    decode_batch: int = opt(8, "Latents of one shape decoded together.")
    compare: str = opt(
        None,
        "Another cache of the same input (e.g. the fp32 one) to measure this one against: latent "
        "relative L2 and decoded PSNR/SSIM change per sampled key (summary.json, report.html).",
    )
    storage_options: dict = opt({}, "JSON object of fsspec storage options for the cache and the input.")
    config: str = opt(None, "YAML file with the same keys as the flags; flags override it.")

    def __post_init__(self) -> None:
        if not self.cache:
            raise ConfigError("--cache is required")
        if self.sample < 0 or self.top_k < 1 or self.decode_batch < 1:
            raise ConfigError("--sample must be >= 0, --top-k and --decode-batch >= 1")
