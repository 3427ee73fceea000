"""What a run asks of its model, checked against the family: options, dtype, tiling, latent space."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..latent_space import LatentSpace
from .families import Family, family_of
from .loading import ModelError

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Where the hub cache lives and whether to go online: the encoder actors must see what the driver saw.
# Tokens are deliberately not forwarded (runtime_env values are visible in Ray's dashboard).
HUB_ENV_VARS = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_ENDPOINT",
)


def check_options(family: Family, cfg: Any, vae: Any = None) -> None:
    """Options this family cannot honour are errors, never silently ignored (cfg: EncodeConfig or EncodeSpec).
    With the loaded `vae`, image sides are checked against the family's resolution multiple too."""
    rules = (
        (cfg.posterior == "sample" and not family.stochastic, "--posterior sample needs a model with a posterior"),
        (cfg.store_posterior and not family.stochastic, "--store-posterior needs a model with a posterior"),
        (cfg.vq_output != "latent" and family.name != "vq", f"--vq-output {cfg.vq_output} needs a VQModel"),
        (cfg.tiling == "diffusers" and not family.tiles, "--tiling diffusers needs a model diffusers can tile"),
        (
            cfg.tiling == "exact" and not family.exact_tiling,
            "--tiling exact needs a VAE built from diffusers' Encoder/Decoder (AutoencoderKL, AutoencoderKLFlux2)",
        ),
    )
    for broken, message in rules:
        if broken:
            raise ModelError(f"{message}; this model is a {family.class_name}")
    if vae is not None:
        check_sides(family, cfg, vae)


def check_sides(family: Family, cfg: Any, vae: Any) -> None:
    """--resolution and every bucket side a multiple of what this VAE (and its convention's patches) needs."""
    from ..buckets import bucket_set

    multiple = family.resolution_multiple(vae)
    sides = {cfg.resolution} | {side for bucket in bucket_set(cfg) for side in bucket}
    bad = sorted(side for side in sides if side % multiple)
    if bad:
        raise ModelError(
            f"this {family.class_name} needs image sides that are multiples of {multiple}, but "
            f"--resolution/--buckets give {', '.join(map(str, bad))}"
        )
    if getattr(cfg, "bucket_no_upscale", False) and 16 % multiple:
        raise ModelError(
            f"--bucket-no-upscale sizes step in 16 px; this {family.class_name} needs multiples of "
            f"{multiple}: list the buckets you want instead"
        )


def compute_dtype(config: Any, dtype: str, no_upcast: bool) -> torch.dtype:
    """The encoder's dtype: fp16 on a force_upcast model runs in fp32, as diffusers pipelines do."""
    wanted = TORCH_DTYPES[dtype]
    if wanted == torch.float16 and getattr(config, "force_upcast", False) and not no_upcast:
        return torch.float32
    return wanted


def enable_tiling(vae: Any, family: Family, *, tile_size: int, overlap: float) -> None:
    """diffusers' own tiled encoder, with our tile size (pixels) and overlap (fraction of a tile)."""
    if not family.tiles:
        raise ModelError(f"--tiling diffusers: diffusers has no tiled encoder for {family.class_name}")
    factor = family.downsample(vae)
    if tile_size % factor:
        raise ModelError(f"--tiling diffusers: {family.class_name} needs a --tile-size that is a multiple of {factor}")
    family.tile(vae, tile_size, overlap, factor)


def hub_env() -> dict[str, str]:
    """The hub settings of this process, for the encoder actors' runtime_env."""
    return {name: os.environ[name] for name in HUB_ENV_VARS if name in os.environ}


def latent_space_for(vae: Any, cfg: Any, family: Family | None = None) -> LatentSpace:
    """The run's convention: the family's (from the VAE's config or buffers), with the run's overrides."""
    family = family or family_of(vae)
    return family.latent_space(
        vae,
        scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor,
        latents_mean=cfg.latents_mean,
        latents_std=cfg.latents_std,
    )
