"""The latent-space convention: how a VAE's raw latent z becomes what the diffusion model sees.

Every convention diffusers uses is an affine map per channel, stored = (z - offset_c) * scale_c:
- "scale"       (SD1/2, SDXL):   offset 0,          scale s
- "shift_scale" (SD3, Flux):     offset shift,      scale s
- "per_channel" (latents_mean/std configs, as diffusers' SDXL pipeline applies them):
                                 offset mean_c,     scale s / std_c
Writing them as one map means the encoder, the stats job, the reader and the audit share one
implementation of "scale" and "unscale", so a cache cannot be scaled twice or unscaled wrongly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CONVENTIONS = ("scale", "shift_scale", "per_channel")


@dataclass(frozen=True, kw_only=True)
class LatentSpace:
    convention: str
    scaling_factor: float
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"unknown latent convention {self.convention!r}; known: {', '.join(CONVENTIONS)}")
        if self.convention == "per_channel" and (self.latents_mean is None or self.latents_std is None):
            raise ValueError("the per_channel convention needs latents_mean and latents_std")
        if self.convention == "per_channel" and len(self.latents_mean) != len(self.latents_std):
            raise ValueError("latents_mean and latents_std must have the same length")

    @classmethod
    def from_model_config(cls, config: Any, **overrides: Any) -> "LatentSpace":
        """Reads the convention from a diffusers config; non-None overrides win."""

        def pick(name: str, default: Any = None) -> Any:
            if overrides.get(name) is not None:
                return overrides[name]
            return getattr(config, name, None) if not isinstance(config, dict) else config.get(name, default)

        mean, std = pick("latents_mean"), pick("latents_std")
        shift = pick("shift_factor")
        scaling = pick("scaling_factor")
        scaling = 1.0 if scaling is None else float(scaling)
        if mean is not None and std is not None:
            return cls(convention="per_channel", scaling_factor=scaling,
                       latents_mean=tuple(map(float, mean)), latents_std=tuple(map(float, std)))
        # AutoencoderTiny's config carries shift_factor 0.0: that is plain scaling, and is recorded as such.
        if shift is not None and (float(shift) != 0.0 or overrides.get("shift_factor") is not None):
            return cls(convention="shift_scale", scaling_factor=scaling, shift_factor=float(shift))
        return cls(convention="scale", scaling_factor=scaling)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatentSpace":
        fields = {k: data.get(k) for k in ("convention", "scaling_factor", "shift_factor", "latents_mean", "latents_std")}
        for name in ("latents_mean", "latents_std"):
            if fields[name] is not None:
                fields[name] = tuple(fields[name])
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["formula"] = self.formula()
        return data

    def formula(self) -> str:
        return {
            "scale": "stored = z * scaling_factor",
            "shift_scale": "stored = (z - shift_factor) * scaling_factor",
            "per_channel": "stored = (z - latents_mean[c]) * scaling_factor / latents_std[c]",
        }[self.convention]

    def affine(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """(offset_c, scale_c) in float64 for a latent with `channels` channels."""
        if self.convention == "per_channel":
            if len(self.latents_mean) != channels:
                raise ValueError(f"latents_mean has {len(self.latents_mean)} entries but the latent has {channels} channels")
            offset = np.asarray(self.latents_mean, dtype=np.float64)
            scale = self.scaling_factor / np.asarray(self.latents_std, dtype=np.float64)
            return offset, scale
        shift = self.shift_factor if self.convention == "shift_scale" else 0.0
        return np.full(channels, shift, dtype=np.float64), np.full(channels, self.scaling_factor, dtype=np.float64)

    def to_model(self, z: Any) -> Any:
        """Raw latent(s) [..., C, h, w] -> the stored, model-ready space."""
        offset, scale = self._broadcast(z)
        return (z - offset) * scale

    def to_raw(self, stored: Any) -> Any:
        """Stored latent(s) [..., C, h, w] -> raw VAE latents, ready for vae.decode."""
        offset, scale = self._broadcast(stored)
        return stored / scale + offset

    def std_to_model(self, std: Any) -> Any:
        """A posterior std in raw space -> in the stored space (the offset does not apply)."""
        _, scale = self._broadcast(std)
        return std * scale

    def decoder_config(self) -> dict[str, Any]:
        """The VAE config values a trainer must use to decode these latents."""
        values: dict[str, Any] = {"scaling_factor": self.scaling_factor}
        if self.convention == "shift_scale":
            values["shift_factor"] = self.shift_factor
        if self.convention == "per_channel":
            values["latents_mean"] = list(self.latents_mean)
            values["latents_std"] = list(self.latents_std)
        return values

    def _broadcast(self, x: Any) -> tuple[Any, Any]:
        channels = x.shape[-3]
        offset, scale = (a.reshape(-1, 1, 1) for a in self.affine(channels))
        if type(x).__module__.startswith("torch"):  # a tensor: keep its device, compute in its dtype
            import torch

            return (torch.as_tensor(offset, dtype=x.dtype, device=x.device),
                    torch.as_tensor(scale, dtype=x.dtype, device=x.device))
        return offset, scale  # numpy: float64, so unscaling a cache is exact to float64 rounding
