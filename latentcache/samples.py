"""Sample corpora and small random VAEs for the demo, the tests and the benchmarks (no network).

Images are crops of the photographs bundled with scikit-image, resized and recoloured, so the
encoder sees natural image statistics rather than noise.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "camera")


def _photos() -> list[np.ndarray]:
    from skimage import data

    photos = []
    for name in PHOTOS:
        img = getattr(data, name)()
        photos.append(np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3])
    return photos


def natural_image(
    rng: np.random.Generator, height: int, width: int, photos: list[np.ndarray] | None = None
) -> Image.Image:
    """A random crop of a bundled photograph, resized to (height, width), with a random tint."""
    photo = (photos or _photos())[rng.integers(len(photos or PHOTOS))]
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(photo[top : top + ch, left : left + cw]).resize((width, height), Image.Resampling.BICUBIC)
    tint = rng.uniform(0.8, 1.2, size=3)
    return Image.fromarray(np.clip(np.asarray(crop) * tint, 0, 255).astype(np.uint8))


def encode_image(img: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    img.save(
        buf,
        format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext],
        **({"quality": 90} if ext in ("jpg", "jpeg") else {}),
    )
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A WebDataset shard: members written in order, so a sample's files stay together."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_shards(
    folder: Path,
    *,
    shards: int = 4,
    per_shard: int = 16,
    size: tuple[int, int] = (320, 384),
    ext: str = "jpg",
    seed: int = 0,
    sizes: list[tuple[int, int]] | None = None,
) -> list[Path]:
    """Writes shard-00000.tar ... with `per_shard` captioned images each; returns their paths."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    paths = []
    for s in range(shards):
        members = []
        for i in range(per_shard):
            h, w = sizes[(s * per_shard + i) % len(sizes)] if sizes else size
            key = f"{s:05d}{i:04d}"
            members.append((f"{key}.{ext}", encode_image(natural_image(rng, h, w, photos), ext)))
            members.append((f"{key}.txt", f"sample {key}".encode()))
        paths.append(folder / f"shard-{s:05d}.tar")
        write_tar(paths[-1], members)
    return paths


TINY_KL = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
)


def make_vae(folder: Path, *, kind: str = "kl", seed: int = 0, **overrides: Any) -> Path:
    """A small randomly-initialised diffusers VAE saved with save_pretrained (as a user would have one)."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    if kind == "kl":
        config = {
            **TINY_KL,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (32, 32, 64, 64),
            **overrides,
        }
        model = diffusers.AutoencoderKL(**config)
    elif kind == "tiny":
        config = dict(
            encoder_block_out_channels=(16, 16, 16, 16),
            decoder_block_out_channels=(16, 16, 16, 16),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
            latent_channels=4,
            **overrides,
        )
        model = diffusers.AutoencoderTiny(**config)
    elif kind == "vq":
        config = dict(
            block_out_channels=(32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1,
            latent_channels=3,
            num_vq_embeddings=64,
            norm_num_groups=16,
            **overrides,
        )
        model = diffusers.VQModel(**config)
    else:
        raise ValueError(f"unknown VAE kind {kind!r}")
    model.save_pretrained(folder)
    return folder
