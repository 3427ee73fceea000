"""Decoding stored latents back to images: on this process (its GPU when it has one) or on Ray GPU actors.

Large latents follow the one `--tiling auto` rule (`tiling.rule.auto_mode`) applied to the decoded
size: exact bands where the model supports them, else diffusers' tiles (approximate is fine here:
the images are only scored).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..models import ModelSpec, load_vae, model_device
from ..tiling import exact_decode, exact_tiling_support
from ..tiling.rule import auto_mode
from .config import AuditConfig


def to_uint8_hwc(x: Any) -> np.ndarray:
    """Decoder output in [-1, 1], [B, 3, H, W] -> uint8 [B, H, W, 3], as pipelines post-process."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _plain(vae: Any, z: Any) -> Any:
    if hasattr(vae, "disable_tiling"):  # an earlier large latent may have switched tiling on
        vae.disable_tiling()
    return vae.decode(z).sample


def _diffusers_tiled(vae: Any, z: Any) -> Any:
    vae.enable_tiling()
    return vae.decode(z).sample


DECODERS: dict[str, Callable[[Any, Any], Any]] = {"none": _plain, "diffusers": _diffusers_tiled, "exact": exact_decode}


class Decoder:
    """The VAE on one device; raw latents [B, C, h, w] -> uint8 images [B, H, W, 3]. Also a Ray actor class."""

    def __init__(self, *, model: ModelSpec, tiling: str, threshold: int) -> None:
        self.device = model_device()
        vae, self.family = load_vae(model)
        self.vae = vae.to(self.device)  # load_vae gives float32
        self.tiling, self.threshold = tiling, threshold
        self.exact = tiling in ("auto", "exact") and exact_tiling_support(self.vae, "decoder")[0]

    def mode(self, z: Any) -> str:
        """--decode-tiling as given, or (auto) the encoder's rule applied to the decoded image's size."""
        if self.tiling != "auto":
            return self.tiling
        pixels = z.shape[-2] * z.shape[-1] * self.family.downsample(self.vae) ** 2
        return auto_mode(pixels, threshold=self.threshold, exact_supported=self.exact, approximate_ok=True)

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """Raw latents [B, C, h, w] of one shape -> uint8 images [B, H, W, 3]."""
        z = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            return to_uint8_hwc(self.family.decode(self.vae, z, tiling=self.mode(z)))


def shape_batches(latents: dict[str, np.ndarray], size: int) -> list[list[str]]:
    """Keys in batches of at most `size` latents of one shape (aspect buckets differ in shape)."""
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for key, z in latents.items():
        by_shape.setdefault(z.shape, []).append(key)
    return [keys[i : i + size] for keys in by_shape.values() for i in range(0, len(keys), size)]


def decode_on_driver(
    latents: dict[str, np.ndarray], model: ModelSpec, cfg: AuditConfig, threshold: int
) -> dict[str, np.ndarray]:
    decoder = Decoder(model=model, tiling=cfg.decode_tiling, threshold=threshold)
    out: dict[str, np.ndarray] = {}
    for keys in shape_batches(latents, cfg.decode_batch):
        out.update(zip(keys, decoder.decode(np.stack([latents[k] for k in keys]))))
    return out


def decode_job(
    latents: dict[str, np.ndarray], model: ModelSpec, cfg: AuditConfig, threshold: int
) -> dict[str, np.ndarray]:
    """Ray wiring, kept apart: one decoder actor per GPU (one CPU actor without GPUs), batches spread over them."""
    import ray  # Ray (and the pipeline that starts it) only where work is placed on it
    from ray.util import ActorPool

    from ..pipeline import ensure_ray

    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(Decoder)
    actors = [actor.remote(model=model, tiling=cfg.decode_tiling, threshold=threshold) for _ in range(max(gpus, 1))]
    batches = shape_batches(latents, cfg.decode_batch)
    images = ActorPool(actors).map(lambda a, keys: a.decode.remote(np.stack([latents[k] for k in keys])), batches)
    out = {key: img for keys, imgs in zip(batches, images) for key, img in zip(keys, imgs)}
    for a in actors:
        ray.kill(a)
    return out


def decode_where(cfg: AuditConfig) -> str:
    if cfg.decode_on != "auto":
        return cfg.decode_on
    if torch.cuda.is_available() or not os.environ.get("RAY_ADDRESS"):
        return "driver"
    import ray

    from ..pipeline import ensure_ray

    ensure_ray()
    return "ray" if ray.cluster_resources().get("GPU", 0) else "driver"


DECODE_PLACES = {"driver": decode_on_driver, "ray": decode_job}
