"""`StatsConfig`: the flags of `latentcache stats`; the shared ones are taken from `EncodeConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, EncodeConfig, opt

_ENCODE_FIELDS = {f.name: f for f in dataclasses.fields(EncodeConfig)}


def like(name: str, **change: Any) -> Any:
    """The encode option of the same name (default, help, choices), so the two commands cannot drift."""
    f = _ENCODE_FIELDS[name]
    meta = {
        "default": f.default if f.default is not dataclasses.MISSING else f.default_factory(),  # type: ignore[misc]
        **f.metadata,
        **change,
    }
    return opt(meta["default"], meta["help"], choices=meta.get("choices"))


@dataclass(frozen=True, kw_only=True)
class StatsConfig:
    cache: str = opt(None, "Describe an existing cache (fsspec URL); the scaling its manifest records is undone.")
    input: str = like(
        "input", help="Describe a raw corpus instead: input shards (fsspec URL, glob or brace range); needs --model."
    )
    model: str = like("model")
    output: str = opt("stats.json", "Where the statistics document goes (fsspec URL).")
    plot: str = opt(None, "Also write per-channel histograms of the raw latents to this PNG.")
    posterior: str = opt(
        None,
        "Which latents to describe: the posterior's mode or a per-key sample (default: what the cache "
        "stores; mode for a corpus).",
        choices=("mode", "sample"),
    )
    seed: int = opt(0, "Seed of the row sample, of --posterior sample noise (per key, as encode) and of the bootstrap.")
    max_samples: int = opt(
        None, "Corpus mode: describe a uniform random sample of this many images drawn over all shards."
    )
    sample_fraction: float = opt(
        None, "Corpus mode: describe each image with this probability (seeded by --seed), over all shards."
    )
    bootstrap: int = opt(1000, "Bootstrap replicates (resampling shards) for the confidence interval; 0 turns it off.")
    confidence: float = opt(0.95, "Confidence level of the interval.")
    batch_size: int = like("batch_size", help="Encoder batch size, and the size of the 'first batch' estimate.")
    plot_samples: int = opt(100_000, "Values per channel kept (a uniform random sample) to draw the histograms.")
    input_format: str = like("input_format")
    image_column: str = like("image_column")
    key_column: str = like("key_column")
    caption_column: str = like("caption_column")
    storage_options: dict = like("storage_options")
    resolution: int = like("resolution")
    max_pixels: int = like("max_pixels")
    min_size: int = like("min_size")
    model_class: str = like("model_class")
    model_config: str = like("model_config")
    allow_pickle: bool = like("allow_pickle")
    dtype: str = like("dtype")
    no_upcast: bool = like("no_upcast")
    num_encoders: int = like("num_encoders")
    decode_cpus: float = like("decode_cpus")
    encoder_threads: int = like("encoder_threads")
    rows_per_block: int = like("rows_per_block")
    config: str = like("config")

    def __post_init__(self) -> None:
        validate_stats(self)

    @property
    def mode(self) -> str:
        return "cache" if self.cache else "corpus"

    def encode_config(self) -> EncodeConfig:
        """The encoder settings for corpus mode: fp32 storage, so nothing is lost before the statistics."""
        shared = {
            n: getattr(self, n)
            for n in _ENCODE_FIELDS
            if hasattr(self, n) and n not in ("output", "posterior", "config")
        }
        return EncodeConfig(**shared, output=self.output, posterior=self.posterior or "mode", store_dtype="fp32")


def validate_stats(cfg: StatsConfig) -> None:
    if bool(cfg.cache) == bool(cfg.input):
        raise ConfigError("give either --cache (an existing cache) or --input with --model (a raw corpus)")
    if cfg.input and not cfg.model:
        raise ConfigError("--input needs --model (the VAE whose latents to describe)")
    if cfg.cache and (cfg.max_samples is not None or cfg.sample_fraction is not None):
        raise ConfigError("--max-samples and --sample-fraction apply to a raw corpus (--input), not to --cache")
    if cfg.max_samples is not None and cfg.sample_fraction is not None:
        raise ConfigError("give --max-samples or --sample-fraction, not both")
    if cfg.max_samples is not None and cfg.max_samples <= 0:
        raise ConfigError(f"--max-samples must be positive, got {cfg.max_samples}")
    if cfg.sample_fraction is not None and not 0 < cfg.sample_fraction <= 1:
        raise ConfigError(f"--sample-fraction must be in (0, 1], got {cfg.sample_fraction}")
    if not 0 < cfg.confidence < 1:
        raise ConfigError(f"--confidence must be between 0 and 1, got {cfg.confidence}")
    for name in ("bootstrap", "batch_size", "plot_samples"):
        if getattr(cfg, name) < (0 if name == "bootstrap" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'bootstrap' else 'positive'}")
