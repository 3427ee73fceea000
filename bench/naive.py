"""The loop a user writes instead of latentcache, run as its own command by bench/run.py.

webdataset + PIL decode, the usual training-script transform, vae.encode per batch, one .npz per image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import diffusers
import numpy as np
import torch
import webdataset as wds
from PIL import Image


def transform(img: Image.Image, resolution: int) -> torch.Tensor:
    """Shorter side to R (bicubic), center crop, to [-1, 1]."""
    img = img.convert("RGB")
    scale = resolution / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", nargs="+", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    class_name = json.loads((Path(args.model) / "config.json").read_text())["_class_name"]
    vae = getattr(diffusers, class_name).from_pretrained(args.model).to(args.device).eval()
    batch, keys = [], []

    def flush() -> None:
        with torch.no_grad():
            encoded = vae.encode(torch.stack(batch).to(args.device))
            z = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
        for key, latent in zip(keys, (z * vae.config.scaling_factor).float().cpu().numpy()):
            np.savez(out / f"{key}.npz", latent=latent)

    for key, img in wds.WebDataset(args.shards, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg"):
        batch.append(transform(img, args.resolution))
        keys.append(key)
        if len(batch) == args.batch_size:
            flush()
            batch, keys = [], []
    if batch:
        flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
