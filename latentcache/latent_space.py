"""The latent-space convention: how a VAE's raw latent z becomes what the diffusion model sees.

Every convention diffusers pipelines use is an affine map per channel, stored = (y - offset_c) * scale_c,
where y is z itself or, for Flux.2, z folded into 2x2 patches first:
- "scale"       (SD1/2, SDXL, DC-AE, HunyuanImage 2.1): offset 0,      scale s
- "shift_scale" (SD3, Flux.1):                           offset shift,  scale s
- "per_channel" (latents_mean/std configs: Qwen-Image, Wan; as diffusers' pipelines apply them):
                                                         offset mean_c, scale s / std_c
- "patch_bn"    (Flux.2): y = patchify_2x2(z) (Flux2Pipeline._patchify_latents), then offset
                bn.running_mean_c, scale 1 / sqrt(bn.running_var_c + batch_norm_eps)
                (Flux2Pipeline._encode_vae_image); latents_mean/std hold those per-patch-channel values.
Writing them as one map means the encoder, the stats job, the reader and the audit share one
implementation of "scale" and "unscale", so a cache cannot be scaled twice or unscaled wrongly.

`to_raw` gives the VAE's latent [..., C, h, w]; a video VAE used for images (Qwen-Image, Wan) takes
one frame more, `to_vae_input` adds it ([..., C, 1, h, w]: exactly what `vae.decode` takes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CONVENTIONS = ("scale", "shift_scale", "per_channel", "patch_bn")
_OPTIONAL = {"patch_size": None, "batch_norm_eps": None, "frame_axis": False}  # absent from older manifests


@dataclass(frozen=True, kw_only=True)
class LatentSpace:
    convention: str
    scaling_factor: float
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    patch_size: int | None = None  # patch_bn: side of the patches folded into channels before the affine
    batch_norm_eps: float | None = None  # patch_bn: what latents_std already includes (for the record)
    frame_axis: bool = False  # vae.decode takes [B, C, 1, h, w] (one frame of a video VAE)

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"unknown latent convention {self.convention!r}; known: {', '.join(CONVENTIONS)}")
        per_channel = self.convention in ("per_channel", "patch_bn")
        if per_channel and (self.latents_mean is None or self.latents_std is None):
            raise ValueError(f"the {self.convention} convention needs latents_mean and latents_std")
        if per_channel and len(self.latents_mean) != len(self.latents_std):
            raise ValueError("latents_mean and latents_std must have the same length")
        if self.convention == "patch_bn" and not self.patch_size:
            raise ValueError("the patch_bn convention needs patch_size")

    @classmethod
    def from_model_config(cls, config: Any, **overrides: Any) -> LatentSpace:
        """Reads the convention from a diffusers config; non-None overrides win."""

        def pick(name: str, default: Any = None) -> Any:
            if overrides.get(name) is not None:
                return overrides[name]
            return getattr(config, name, None) if not isinstance(config, dict) else config.get(name, default)

        mean, std = pick("latents_mean"), pick("latents_std")
        shift = pick("shift_factor")
        scaling = pick("scaling_factor")
        scaling = 1.0 if scaling is None else float(scaling)
        frame_axis = bool(overrides.get("frame_axis", False))
        if mean is not None and std is not None:
            return cls(
                convention="per_channel",
                scaling_factor=scaling,
                frame_axis=frame_axis,
                latents_mean=tuple(map(float, mean)),
                latents_std=tuple(map(float, std)),
            )
        # AutoencoderTiny's config carries shift_factor 0.0: that is plain scaling, and is recorded as such.
        if shift is not None and (float(shift) != 0.0 or overrides.get("shift_factor") is not None):
            return cls(
                convention="shift_scale", scaling_factor=scaling, shift_factor=float(shift), frame_axis=frame_axis
            )
        return cls(convention="scale", scaling_factor=scaling, frame_axis=frame_axis)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatentSpace:
        names = ("convention", "scaling_factor", "shift_factor", "latents_mean", "latents_std")
        fields = {k: data.get(k) for k in names} | {k: data.get(k, default) for k, default in _OPTIONAL.items()}
        for name in ("latents_mean", "latents_std"):
            if fields[name] is not None:
                fields[name] = tuple(fields[name])
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        # Fields at their default are left out: a cache written before they existed keeps its identity.
        data = {k: v for k, v in asdict(self).items() if k not in _OPTIONAL or v != _OPTIONAL[k]}
        data["formula"] = self.formula()
        return data

    def formula(self) -> str:
        text = {
            "scale": "stored = z * scaling_factor",
            "shift_scale": "stored = (z - shift_factor) * scaling_factor",
            "per_channel": "stored = (z - latents_mean[c]) * scaling_factor / latents_std[c]",
            "patch_bn": f"stored = (patchify_{self.patch_size}x{self.patch_size}(z)[c] - latents_mean[c]) * "
            "scaling_factor / latents_std[c]; latents_mean = bn.running_mean, "
            "latents_std = sqrt(bn.running_var + batch_norm_eps) (Flux2Pipeline._encode_vae_image)",
        }[self.convention]
        return text + ("; vae.decode takes z[:, :, None] (one frame)" if self.frame_axis else "")

    def affine(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """(offset_c, scale_c) in float64 for a (patchified) latent with `channels` channels."""
        if self.convention in ("per_channel", "patch_bn"):
            if len(self.latents_mean) != channels:
                raise ValueError(
                    f"latents_mean has {len(self.latents_mean)} entries but the latent has {channels} channels"
                )
            offset = np.asarray(self.latents_mean, dtype=np.float64)
            scale = self.scaling_factor / np.asarray(self.latents_std, dtype=np.float64)
            return offset, scale
        shift = self.shift_factor if self.convention == "shift_scale" else 0.0
        return np.full(channels, shift, dtype=np.float64), np.full(channels, self.scaling_factor, dtype=np.float64)

    def to_model(self, z: Any) -> Any:
        """Raw latent(s) [..., C, h, w] -> the stored, model-ready space."""
        y = patchify(z, self.patch_size) if self.patch_size else z
        offset, scale = self._broadcast(y)
        return (y - offset) * scale

    def to_raw(self, stored: Any) -> Any:
        """Stored latent(s) [..., C', h', w'] -> raw VAE latents [..., C, h, w]."""
        offset, scale = self._broadcast(stored)
        y = stored / scale + offset
        return unpatchify(y, self.patch_size) if self.patch_size else y

    def to_vae_input(self, stored: Any) -> Any:
        """Stored latents [N, C', h', w'] -> exactly what vae.decode takes (the frame axis added for video VAEs)."""
        raw = self.to_raw(stored)
        return raw[:, :, None] if self.frame_axis else raw

    def std_to_model(self, std: Any) -> Any:
        """A posterior std in raw space -> in the stored space (the offset does not apply)."""
        std = patchify(std, self.patch_size) if self.patch_size else std
        _, scale = self._broadcast(std)
        return std * scale

    def decoder_config(self) -> dict[str, Any]:
        """The values a trainer must use to decode these latents (VAE config values; patch_bn: the BN's)."""
        values: dict[str, Any] = {"scaling_factor": self.scaling_factor}
        if self.convention == "shift_scale":
            values["shift_factor"] = self.shift_factor
        if self.convention in ("per_channel", "patch_bn"):
            values["latents_mean"] = list(self.latents_mean)
            values["latents_std"] = list(self.latents_std)
        if self.convention == "patch_bn":
            values["patch_size"] = self.patch_size
        return values

    def _broadcast(self, x: Any) -> tuple[Any, Any]:
        channels = x.shape[-3]
        offset, scale = (a.reshape(-1, 1, 1) for a in self.affine(channels))
        if type(x).__module__.startswith("torch"):  # a tensor: keep its device, compute in its dtype
            import torch

            return (
                torch.as_tensor(offset, dtype=x.dtype, device=x.device),
                torch.as_tensor(scale, dtype=x.dtype, device=x.device),
            )
        return offset, scale  # numpy: float64, so unscaling a cache is exact to float64 rounding


def _permute(x: Any, order: tuple[int, ...]) -> Any:
    return x.permute(*order) if hasattr(x, "permute") else x.transpose(order)


def patchify(x: Any, p: int) -> Any:
    """[..., C, H, W] -> [..., C*p*p, H/p, W/p], channel c*p*p + dy*p + dx: Flux2Pipeline._patchify_latents'
    layout (tests check it against that function), for numpy arrays and tensors of any leading rank."""
    *lead, c, h, w = x.shape
    n = len(lead)
    x = x.reshape(*lead, c, h // p, p, w // p, p)
    return _permute(x, (*range(n), n, n + 2, n + 4, n + 1, n + 3)).reshape(*lead, c * p * p, h // p, w // p)


def unpatchify(x: Any, p: int) -> Any:
    """The inverse of `patchify` (Flux2Pipeline._unpatchify_latents' layout)."""
    *lead, cpp, h, w = x.shape
    n = len(lead)
    x = x.reshape(*lead, cpp // (p * p), p, p, h, w)
    return _permute(x, (*range(n), n, n + 3, n + 1, n + 4, n + 2)).reshape(*lead, cpp // (p * p), h * p, w * p)


def patch_bn_fragment(suggested: dict[str, Any], patch: int = 2, eps: float = 1e-4) -> dict[str, Any]:
    """The stats job's suggestion in Flux.2's own form: BatchNorm running statistics per patch channel.

    Each raw channel's mean/variance stands for its p*p patch channels (pooled over the positions in
    the patch); running_var is given for batch_norm_eps = eps, so sqrt(var + eps) is the suggested std."""
    mean = np.repeat(np.asarray(suggested["latents_mean"], np.float64), patch * patch)
    std = np.repeat(np.asarray(suggested["latents_std"], np.float64), patch * patch)
    return {
        "bn.running_mean": mean.tolist(),
        "bn.running_var": np.maximum(std * std - eps, 0.0).tolist(),
        "batch_norm_eps": eps,
    }
