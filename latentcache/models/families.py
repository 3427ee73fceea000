"""The registry of VAE families: everything that differs between diffusers' VAE classes, one entry each.

A family says how to run its diffusers class on pixels [B, 3, H, W] (a video VAE gets one frame,
[B, 3, 1, H, W]) and what comes out: the raw latent z [B, C, h, w] with, for KL models, the
posterior's std, or VQ codebook indices; how to decode a raw latent back to pixels (plainly, with
diffusers' tiles, or in exact bands); its spatial factor; and its latent-space convention, the
per-family part of what the family's diffusers pipeline hands its transformer as the image latent.
Nothing here re-implements a VAE: every step is the diffusers model's own method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..latent_space import LatentSpace


@dataclass(frozen=True)
class Encoded:
    """One batch through the encoder, in raw (unscaled) latent space, float32."""

    mean: torch.Tensor
    std: torch.Tensor | None = None
    codes: torch.Tensor | None = None


def _encode_kl(vae: Any, x: torch.Tensor) -> Encoded:
    dist = vae.encode(x).latent_dist
    return Encoded(mean=dist.mean, std=dist.std)


def _encode_one_frame(vae: Any, x: torch.Tensor) -> Encoded:
    """A video VAE on an image: one frame in, the single latent frame out (the pipelines' image path)."""
    dist = vae.encode(x.unsqueeze(2)).latent_dist
    return Encoded(mean=dist.mean[:, :, 0], std=dist.std[:, :, 0])


def _encode_tiny(vae: Any, x: torch.Tensor) -> Encoded:
    return Encoded(mean=vae.encode(x).latents)


def _encode_dc(vae: Any, x: torch.Tensor) -> Encoded:
    return Encoded(mean=vae.encode(x).latent)  # DC-AE is deterministic: no posterior


def _encode_vq(vae: Any, x: torch.Tensor) -> Encoded:
    h = vae.encode(x).latents
    _, _, (_, _, indices) = vae.quantize(h)
    return Encoded(mean=h, codes=indices.reshape(h.shape[0], h.shape[2], h.shape[3]))


def _blocks_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _tiny_factor(vae: Any) -> int:
    return int(vae.spatial_scale_factor)


def _dc_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.encoder_block_out_channels) - 1)


def _video_factor(vae: Any) -> int:
    """Qwen-Image and Wan: one spatial halving per entry of temperal_downsample; Wan 2.2 folds
    patch_size x patch_size pixels into channels before the encoder (AutoencoderKLWan._encode)."""
    return 2 ** len(vae.config.temperal_downsample) * (getattr(vae.config, "patch_size", None) or 1)


def _ratio_factor(vae: Any) -> int:
    return int(vae.config.spatial_compression_ratio)


def _tile_by_size(vae: Any, tile: int, overlap: float, factor: int) -> None:
    """AutoencoderKL-style tiling attributes (KL, Tiny, Flux.2, HunyuanImage)."""
    vae.enable_tiling()
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // factor
    vae.tile_overlap_factor = overlap


def _tile_by_stride(vae: Any, tile: int, overlap: float, factor: int) -> None:
    """Height/width/stride tiling (DC-AE, Qwen-Image, Wan); the stride stays a multiple of the factor."""
    stride = max(factor, (tile - round(tile * overlap)) // factor * factor)
    vae.enable_tiling(
        tile_sample_min_height=tile,
        tile_sample_min_width=tile,
        tile_sample_stride_height=stride,
        tile_sample_stride_width=stride,
    )


def _space_from_config(vae: Any, overrides: dict[str, Any]) -> LatentSpace:
    return LatentSpace.from_model_config(vae.config, **overrides)


def _space_one_frame(vae: Any, overrides: dict[str, Any]) -> LatentSpace:
    return LatentSpace.from_model_config(vae.config, **overrides, frame_axis=True)


def _space_flux2(vae: Any, overrides: dict[str, Any]) -> LatentSpace:
    """Flux2Pipeline._encode_vae_image: patchify 2x2, then (z - bn.running_mean) / sqrt(bn.running_var + eps)."""
    patch = tuple(vae.config.patch_size)
    if patch[0] != patch[1]:
        raise ValueError(f"AutoencoderKLFlux2 with a non-square patch_size {patch} is not supported")
    eps = float(vae.config.batch_norm_eps)
    # float32 as the pipeline computes it, so the recorded std is the one it divides by
    std = torch.sqrt(vae.bn.running_var.float() + eps)
    mean = overrides.get("latents_mean") or vae.bn.running_mean.float().tolist()
    std = overrides.get("latents_std") or std.tolist()
    return LatentSpace(
        convention="patch_bn",
        scaling_factor=float(overrides.get("scaling_factor") or 1.0),
        latents_mean=tuple(map(float, mean)),
        latents_std=tuple(map(float, std)),
        patch_size=patch[0],
        batch_norm_eps=eps,
    )


@dataclass(frozen=True)
class Family:
    """What latentcache needs to know about one diffusers VAE class."""

    name: str
    class_name: str
    encode: Callable[[Any, torch.Tensor], Encoded]  # pixels [B, 3, H, W] in [-1, 1] -> raw latent
    downsample: Callable[[Any], int]  # pixels per raw latent cell, per side
    stochastic: bool  # has a posterior (mode/sample/std); False: a deterministic latent
    space: Callable[[Any, dict[str, Any]], LatentSpace] = _space_from_config
    input_rank: int = 4  # 5: a video VAE, given one frame [B, C, 1, H, W]
    tile: Callable[[Any, int, float, int], None] | None = None  # diffusers' own tiled encoder/decoder
    exact_tiling: bool = False  # its encoder/decoder are diffusers' Encoder/Decoder: latentcache.tiling runs them
    convention: str = ""  # for the docs' model table

    @property
    def tiles(self) -> bool:
        return self.tile is not None

    def resolution_multiple(self, vae: Any) -> int:
        """Image sides must be multiples of this: the VAE's factor times any patch the convention folds."""
        return self.downsample(vae) * (self.latent_space(vae).patch_size or 1)

    def latent_space(self, vae: Any, **overrides: Any) -> LatentSpace:
        return self.space(vae, {k: v for k, v in overrides.items() if v is not None})

    def decode(self, vae: Any, raw: torch.Tensor, tiling: str = "none") -> torch.Tensor:
        """Raw latents [B, C, h, w] -> pixels [B, 3, H, W] in [-1, 1]; tiling: none, diffusers or exact."""
        if tiling == "exact" and self.exact_tiling:
            from ..tiling import exact_decode

            return exact_decode(vae, raw)
        if tiling != "none" and self.tiles:
            vae.enable_tiling()
        elif hasattr(vae, "disable_tiling"):  # an earlier large latent may have switched tiling on
            vae.disable_tiling()
        if self.input_rank == 5:
            return vae.decode(raw.unsqueeze(2)).sample[:, :, 0]
        return vae.decode(raw).sample


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "kl",
            "AutoencoderKL",
            _encode_kl,
            _blocks_factor,
            stochastic=True,
            tile=_tile_by_size,
            exact_tiling=True,
            convention="scale, or shift_scale (SD3, Flux.1), or per_channel (latents_mean/std)",
        ),
        Family(
            "flux2",
            "AutoencoderKLFlux2",
            _encode_kl,
            _blocks_factor,
            stochastic=True,
            space=_space_flux2,
            tile=_tile_by_size,
            exact_tiling=True,
            convention="patch_bn: 2x2 patchify, BatchNorm running stats",
        ),
        Family(
            "dc",
            "AutoencoderDC",
            _encode_dc,
            _dc_factor,
            stochastic=False,
            tile=_tile_by_stride,
            convention="scale (deterministic latent * scaling_factor)",
        ),
        Family(
            "qwenimage",
            "AutoencoderKLQwenImage",
            _encode_one_frame,
            _video_factor,
            stochastic=True,
            space=_space_one_frame,
            input_rank=5,
            tile=_tile_by_stride,
            convention="per_channel: (z - latents_mean) / latents_std, one frame",
        ),
        Family(
            "wan",
            "AutoencoderKLWan",
            _encode_one_frame,
            _video_factor,
            stochastic=True,
            space=_space_one_frame,
            input_rank=5,
            tile=_tile_by_stride,
            convention="per_channel: (z - latents_mean) / latents_std, one frame",
        ),
        Family(
            "hunyuanimage",
            "AutoencoderKLHunyuanImage",
            _encode_kl,
            _ratio_factor,
            stochastic=True,
            tile=_tile_by_size,
            convention="scale (z * scaling_factor)",
        ),
        Family(
            "tiny",
            "AutoencoderTiny",
            _encode_tiny,
            _tiny_factor,
            stochastic=False,
            tile=_tile_by_size,
            convention="scale",
        ),
        Family("vq", "VQModel", _encode_vq, _blocks_factor, stochastic=False, convention="scale"),
    )
}
FAMILY_BY_CLASS = {f.class_name: f for f in FAMILIES.values()}


def family_of(vae: Any) -> Family:
    return FAMILY_BY_CLASS[type(vae).__name__]
