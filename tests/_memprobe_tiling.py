"""Subprocess helper for tests/test_tiling.py: peak resident memory of one encode.

Runs in a fresh interpreter. The peak is the kernel's resident high-water mark, reset right
before the encode (/proc/self/clear_refs) so that transient peaks of imports and model set-up do
not hide or inflate it; where that reset is refused it falls back to ru_maxrss.
Prints one JSON line: {"size", "mode", "base_mb", "peak_mb", "delta_mb", "seconds", "ru_maxrss_mb"}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch
from diffusers import AutoencoderKL

from latentcache.tiling import exact_encode_moments


def tiny_vae() -> AutoencoderKL:
    # Four levels like SD (1/8 latents) but 8 channels: cheap, yet the full-resolution maps
    # (8 x H x W floats) are what an unbounded encode would have to hold.
    torch.manual_seed(0)
    blocks = ("DownEncoderBlock2D",) * 4
    return AutoencoderKL(
        down_block_types=blocks,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        mid_block_add_attention=False,
    ).eval()


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_rss_mb(was_reset: bool) -> float:
    if not was_reset:
        return ru_maxrss_mb()
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    return int(hwm.split()[1]) / 1024


def encode(vae: AutoencoderKL, pixels: torch.Tensor, mode: str, band_mb: float) -> torch.Tensor:
    if mode == "full":
        with torch.no_grad():
            return vae.quant_conv(vae.encoder(pixels))
    return exact_encode_moments(vae, pixels, band_mb=band_mb, store=mode)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--mode", default="file", choices=["file", "device", "auto", "full"])
    parser.add_argument("--band-mb", type=float, default=2.0)
    args = parser.parse_args()
    # One thread: the test runs two probes side by side, and busy CI boxes punish oversubscription.
    torch.set_num_threads(1)
    vae = tiny_vae()
    encode(vae, torch.zeros(1, 3, 64, 64), args.mode, args.band_mb)  # warm up kernels and thread pools
    pixels = torch.rand(1, 3, args.size, args.size).mul_(2).sub_(1)  # in place: no temporaries
    was_reset = reset_peak_rss()
    base = current_rss_mb()
    start = time.perf_counter()
    encode(vae, pixels, args.mode, args.band_mb)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb(was_reset)
    result = {"size": args.size, "mode": args.mode, "base_mb": base, "peak_mb": peak, "delta_mb": peak - base}
    print(json.dumps({**result, "seconds": seconds, "ru_maxrss_mb": ru_maxrss_mb()}))


if __name__ == "__main__":
    main()
