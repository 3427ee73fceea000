"""Exact band-by-band execution of the diffusers AutoencoderKL encoder and decoder.

diffusers' `enable_tiling()` normalises, attends and pads per tile, so its result differs from
the untiled pass. Here every op runs over horizontal bands of full rows while whole maps live
in device memory, pinned host memory or a temp file; GroupNorm uses statistics gathered over the
whole map, and the mid-block attention attends over all tokens. The result equals
`vae.quant_conv(vae.encoder(x))` / `vae.decode(z).sample` up to float rounding, at a memory
footprint set by the band size (plus the attention K/V at 1/8 resolution).

Memory: with store="file" a run holds one or two bands (band_mb each, roughly), the mid-block
K and V for every token (2 x tokens x channels, on the device) and the output. With "auto" a map
stays in device memory when it takes under half of what is free, else pinned host memory (CUDA),
else an unlinked temp file (TMPDIR). Inference only: runs under torch.no_grad().
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from ._ops import BandContext
from ._plan import Step, UnsupportedModelError, decoder_plan, encoder_plan, run_plan
from ._store import STORE_MODES

__all__ = ["UnsupportedModelError", "exact_decode", "exact_encode_moments", "exact_tiling_support"]

Part = Literal["encoder", "decoder", "both"]
_PLANS: dict[str, tuple[Callable[[nn.Module], list[Step]], ...]] = {
    "encoder": (encoder_plan,),
    "decoder": (decoder_plan,),
    "both": (encoder_plan, decoder_plan),
}


def exact_tiling_support(vae: nn.Module, part: Part = "both") -> tuple[bool, str]:
    """(True, "") when `part` of the VAE can run exactly in bands, else (False, reason)."""
    try:
        _check_vae(vae)
        for build in _PLANS[part]:
            build(vae)
    except UnsupportedModelError as err:
        return False, str(err)
    return True, ""


def exact_encode_moments(
    vae: nn.Module,
    pixels: torch.Tensor,
    *,
    band_mb: float = 64.0,
    band_rows: int | None = None,
    store: str = "auto",
) -> torch.Tensor:
    """Moments [B, 2*C, H/8, W/8] equal to vae.quant_conv(vae.encoder(pixels)) (no quant_conv: vae.encoder(pixels)).

    pixels: [B, 3, H, W] in [-1, 1]. band_mb bounds the working memory of one band; band_rows
    forces the band height in output rows (testing); store is "auto", "device", "host" or "file".
    Raises UnsupportedModelError when exact_tiling_support(vae, "encoder") is False.
    """
    _check_vae(vae)
    return _run(vae, encoder_plan(vae), pixels, band_mb, band_rows, store)


def exact_decode(
    vae: nn.Module,
    latents: torch.Tensor,
    *,
    band_mb: float = 64.0,
    band_rows: int | None = None,
    store: str = "auto",
) -> torch.Tensor:
    """The same as vae.decode(latents).sample, for raw (already unscaled) latents."""
    _check_vae(vae)
    return _run(vae, decoder_plan(vae), latents, band_mb, band_rows, store)


def _check_vae(vae: nn.Module) -> None:
    if getattr(vae, "_hf_hook", None) is not None:
        raise UnsupportedModelError("forward hooks (e.g. accelerate offload) on the VAE itself")


def _run(
    vae: nn.Module, steps: Sequence[Step], x: torch.Tensor, band_mb: float, band_rows: int | None, store: str
) -> torch.Tensor:
    _check_args(x, band_mb, band_rows, store)
    weight = next(vae.parameters())
    ctx = BandContext(weight.device, weight.dtype, int(band_mb * 2**20), band_rows, store)
    with torch.no_grad():
        x = x.to(device=weight.device, dtype=weight.dtype)
        return run_plan(ctx, steps, ctx.wrap_input(x))


def _check_args(x: torch.Tensor, band_mb: float, band_rows: int | None, store: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    if band_mb <= 0 or (band_rows is not None and band_rows < 1):
        raise ValueError("band_mb must be > 0 and band_rows >= 1")
    if store not in STORE_MODES:
        raise ValueError(f"store must be one of {STORE_MODES}, got {store!r}")
