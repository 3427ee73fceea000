"""Throughput benchmark: latentcache end to end against the naive loop and each stage's own limit.

    python bench/run.py --workload tiny sd --images 512 --repeats 3 --out bench/results/cpu.json

On the same generated corpus (JPEGs at about 2x the target side) and the same model, it runs
  (a) naive:       one process: PIL decode, crop, vae.encode per batch, one np.savez per image;
  (b) model-only:  encode of pre-decoded tensors already in memory (the encoder's own limit);
  (c) decode-only: read + decode + preprocess on all cores, no encoder (the input side's limit);
  (d) e2e:         `latentcache encode` on a local Ray;
and reports images/s (min/median/max over repeats) with e2e/naive and e2e/bound, where the bound
is min(b, c) on a GPU and 1/(1/b + 1/c) when encoder and decoder share the same CPU cores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentcache.config import EncodeConfig
from latentcache.preprocess import PreprocessSpec, preprocess_image
from latentcache.samples import make_shards
from latentcache.sources import SourceOptions, plan_shards, read_tar


@dataclass(frozen=True, kw_only=True)
class Workload:
    name: str
    kind: str  # samples.make_vae kind, or a diffusers class config below
    config: dict[str, Any]
    resolution: int


SD_ENCODER = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
WORKLOADS = {
    "tiny": lambda gpu: Workload(name="tiny", kind="tiny", config={}, resolution=256),  # TAESD's default config
    "sd": lambda gpu: Workload(name="sd", kind="kl", config=SD_ENCODER, resolution=512 if gpu else 256),
}


def make_model(workload: Workload, folder: Path) -> Path:
    import diffusers

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    cls = diffusers.AutoencoderTiny if workload.kind == "tiny" else diffusers.AutoencoderKL
    cls(**workload.config).save_pretrained(folder)
    return folder


def make_corpus(folder: Path, images: int, resolution: int, per_shard: int = 64) -> tuple[list[Path], int]:
    """JPEGs at about 2x the target side, like real web corpora; returns (shards, image count)."""
    per_shard = min(per_shard, images)
    shards = max(1, images // per_shard)
    marker = folder / f".done-{shards}x{per_shard}-{resolution}"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        make_shards(folder, shards=shards, per_shard=per_shard,
                    size=(2 * resolution, 2 * resolution + resolution // 4), ext="jpg")
        marker.touch()
    return sorted(folder.glob("shard-*.tar")), shards * per_shard


def naive_transform(img: Any, resolution: int) -> torch.Tensor:
    """The usual training-script transform: shorter side to R (bicubic), center crop, to [-1, 1]."""
    from PIL import Image

    img = img.convert("RGB")
    scale = resolution / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def run_naive(shards: list[Path], model: Path, resolution: int, batch_size: int, device: torch.device) -> int:
    """What training scripts do: webdataset + PIL decode, transform, vae.encode per batch, one .npz per image."""
    import diffusers
    import webdataset as wds

    config = json.loads((model / "config.json").read_text())
    vae = getattr(diffusers, config["_class_name"]).from_pretrained(model).to(device).eval()
    out = Path(tempfile.mkdtemp(prefix="naive-"))
    batch, keys, n = [], [], 0

    def flush() -> int:
        with torch.no_grad():
            encoded = vae.encode(torch.stack(batch).to(device))
            z = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
        return save_npz(out, keys, z * vae.config.scaling_factor)

    try:
        for key, img in wds.WebDataset([str(s) for s in shards], shardshuffle=False).decode("pil").to_tuple("__key__", "jpg"):
            batch.append(naive_transform(img, resolution))
            keys.append(key)
            if len(batch) == batch_size:
                n += flush()
                batch, keys = [], []
        if batch:
            n += flush()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return n


def save_npz(out: Path, keys: list[str], latents: torch.Tensor) -> int:
    for key, latent in zip(keys, latents.float().cpu().numpy()):
        np.savez(out / f"{key}.npz", latent=latent)
    return len(keys)


# ---- (b) model-only ----------------------------------------------------------------------------


def run_model_only(model: Path, resolution: int, batch_size: int, images: int, device: torch.device,
                   **features: Any) -> tuple[int, float]:
    """latentcache's own encoder class on uint8 tensors already in memory; times the encode loop only."""
    from latentcache.encode import EncodeSpec, LatentEncoder
    from latentcache.models import ModelSpec

    encoder = LatentEncoder(model=ModelSpec(model=str(model)), spec=EncodeSpec(**features))
    x = torch.randint(0, 256, (batch_size, 3, resolution, resolution), dtype=torch.uint8)
    x = x.pin_memory() if device.type == "cuda" else x
    encoder.encode_pixels(x)  # warm-up (and compile, when asked): not timed
    done, start = 0, time.perf_counter()
    while done < images:
        encoder.encode_pixels(x)
        done += batch_size
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done, time.perf_counter() - start


FEATURES = {  # each measured on the model-only path against the fp32 baseline
    "baseline_fp32": {},
    "channels_last": {"channels_last": True},
    "bf16": {"dtype": "bf16"},
    "bf16_channels_last": {"dtype": "bf16", "channels_last": True},
    "compile": {"compile": True},
}


# ---- (c) decode-only ---------------------------------------------------------------------------


def _decode_shard(args: tuple[str, int]) -> int:
    shard, resolution = args
    spec, n = PreprocessSpec(resolution=resolution), 0
    for sample in read_tar(plan_shards(shard, "webdataset", {})[0], SourceOptions()):
        preprocess_image(sample.image, spec)
        n += 1
    return n


def run_decode_only(shards: list[Path], resolution: int, cpus: int) -> int:
    with mp.get_context("spawn").Pool(cpus) as pool:
        return sum(pool.map(_decode_shard, [(str(s), resolution) for s in shards]))


# ---- (d) end to end ----------------------------------------------------------------------------


def run_e2e(shards: list[Path], model: Path, resolution: int, batch_size: int, extra: dict[str, Any]) -> int:
    from latentcache.pipeline import run_encode

    out = Path(tempfile.mkdtemp(prefix="e2e-"))
    try:
        cfg = EncodeConfig(input=str(shards[0].parent / "shard-*.tar"), output=str(out / "cache"), model=str(model),
                           resolution=resolution, batch_size=batch_size, **extra)
        summary = run_encode(cfg, progress=False)
        assert summary["complete"], summary
        return summary["counts"]["written"]
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ---- harness -----------------------------------------------------------------------------------


def timed(fn: Callable[[], int | tuple[int, float]], repeats: int) -> dict[str, Any]:
    """Images/s over repeats; fn returns its image count, or (count, seconds) when it times itself."""
    rates, count = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        count, seconds = result if isinstance(result, tuple) else (result, time.perf_counter() - start)
        rates.append(count / seconds)
    return {"images": count, "images_per_s": {"min": min(rates), "median": statistics.median(rates), "max": max(rates)},
            "runs": rates}


def bound(model_only: float, decode_only: float, gpu: bool) -> float:
    return min(model_only, decode_only) if gpu else 1.0 / (1.0 / model_only + 1.0 / decode_only)


def run_workload(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    gpu = device.type == "cuda"
    workload = WORKLOADS[name](gpu)
    if args.resolution:
        workload = Workload(name=workload.name, kind=workload.kind, config=workload.config, resolution=args.resolution)
    root = Path(args.workdir)
    shards, images = make_corpus(root / f"corpus-{workload.resolution}", args.images, workload.resolution)
    model = make_model(workload, root / f"model-{name}")
    from latentcache.pipeline import ensure_ray

    ensure_ray()  # start Ray once, outside the timed runs
    cpus = args.decode_cpus or os.cpu_count() or 1
    extra = {"decode_cpus": args.e2e_decode_cpus} if args.e2e_decode_cpus else {}
    print(f"[{name}] {images} JPEGs -> {workload.resolution}px, device {device}, batch {args.batch_size}", flush=True)
    results = {
        "naive": timed(lambda: run_naive(shards, model, workload.resolution, args.batch_size, device), args.repeats),
        "model_only": timed(lambda: run_model_only(model, workload.resolution, args.batch_size, images, device), args.repeats),
        "decode_only": timed(lambda: run_decode_only(shards, workload.resolution, cpus), args.repeats),
        "e2e": timed(lambda: run_e2e(shards, model, workload.resolution, args.batch_size, extra), args.repeats),
    }
    med = {k: v["images_per_s"]["median"] for k, v in results.items()}
    b = bound(med["model_only"], med["decode_only"], gpu)
    summary = {"workload": name, "resolution": workload.resolution, "images": images, "device": str(device),
               "results": results, "bound_images_per_s": b,
               "bound_formula": "min(b, c)" if gpu else "1/(1/b + 1/c)",
               "e2e_over_naive": med["e2e"] / med["naive"], "e2e_over_bound": med["e2e"] / b}
    if args.features:
        summary["features_model_only"] = {
            name: timed(lambda f=f: run_model_only(model, workload.resolution, args.batch_size, images, device, **f),
                        args.repeats)["images_per_s"] for name, f in FEATURES.items() if name in args.features}
    for stage, rate in med.items():
        print(f"[{name}] {stage:12s} {rate:8.1f} images/s (median of {args.repeats})", flush=True)
    print(f"[{name}] bound {b:.1f}  e2e/naive {summary['e2e_over_naive']:.2f}  e2e/bound {summary['e2e_over_bound']:.2f}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", default=["tiny", "sd"], choices=sorted(WORKLOADS))
    parser.add_argument("--images", type=int, default=256, help="Images in the generated corpus.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=None, help="Override the workload's target side.")
    parser.add_argument("--decode-cpus", type=int, default=None, help="Processes for decode-only (default: all cores).")
    parser.add_argument("--e2e-decode-cpus", type=float, default=None, help="latentcache --decode-cpus for e2e.")
    parser.add_argument("--features", nargs="*", default=[], choices=sorted(FEATURES),
                        help="Also measure these encoder features on the model-only path.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", default="bench/results/work")
    parser.add_argument("--out", default="bench/results/bench.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads(),
                          "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
              "workloads": [run_workload(name, args, device) for name in args.workload]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
