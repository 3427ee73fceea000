"""How far diffusers' tiled encoder (`enable_tiling()`) is from the untiled one, on the SD encoder.

    python bench/diffusers_tiling_error.py --size 512 --tile 256 --overlap 0.25

Builds AutoencoderKL with the SD 1.x/2.x/SDXL encoder architecture (block_out_channels
128/256/512/512, 2 layers per block, mid-block attention) with random weights (no hub access here),
encodes one natural-looking image (latentcache.samples.natural_image) untiled and tiled with
latentcache's own tiling settings, and prints the relative L2 difference of the posterior mean
(and std) as JSON. Random weights are not the trained SD VAE: the number says how much tiling
perturbs this architecture, not a trained model's exact error.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

SD_ENCODER = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    sample_size=512,
)


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


@torch.no_grad()
def measure(size: int, tile: int, overlap: float, seed: int) -> dict:
    import diffusers

    from latentcache.models import FAMILIES, enable_tiling
    from latentcache.samples import natural_image

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**SD_ENCODER).eval()
    image = np.array(natural_image(np.random.default_rng(seed), size, size))  # writable, for torch.from_numpy
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    started = time.perf_counter()
    untiled = vae.encode(x).latent_dist
    untiled_s = time.perf_counter() - started
    enable_tiling(vae, FAMILIES["kl"], tile_size=tile, overlap=overlap)
    started = time.perf_counter()
    tiled = vae.encode(x).latent_dist
    tiled_s = time.perf_counter() - started
    return {
        "image": size,
        "tile": tile,
        "overlap": overlap,
        "seed": seed,
        "latent_shape": list(tiled.mean.shape),
        "relative_l2_mean": relative_l2(tiled.mean, untiled.mean),
        "relative_l2_std": relative_l2(tiled.std, untiled.std),
        "max_abs_mean": float((tiled.mean - untiled.mean).abs().max()),
        "seconds": {"untiled": round(untiled_s, 2), "tiled": round(tiled_s, 2)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="Square image side in pixels (default: 512).")
    parser.add_argument("--tile", type=int, default=256, help="Tile side in pixels (default: 256).")
    parser.add_argument("--overlap", type=float, default=0.25, help="Tile overlap fraction (default: 0.25).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights and the image crop (default: 0).")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.size, args.tile, args.overlap, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
