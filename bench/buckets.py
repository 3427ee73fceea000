"""Throughput with one square resolution vs aspect-ratio buckets, on the same images.

    python bench/buckets.py --images 256 --repeats 2

The corpus: N JPEGs of eleven aspect ratios from 1:3 to 3:1, each of about 256x256 pixels of
area, so a square crop and a bucket crop encode about the same number of pixels. The model: the
tiny random AutoencoderKL of `samples.make_vae`. On one local Ray (started once, so start-up is
not timed) it runs `run_encode`, the function behind `latentcache encode`, alternating:
    square        --resolution 256
    buckets       --buckets --bucket-area 256x256 --bucket-step 32
    buckets+flip  the same with --flip both (every crop encoded twice)
and then, Ray-free, counts how many VAE calls the bucketed batches need with and without the
decode stage's sort by shape, and times the encoder alone on both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentcache.config import EncodeConfig, build_config

SIZES = [
    (256, 256),
    (224, 288),
    (288, 224),
    (192, 336),
    (336, 192),
    (176, 368),
    (368, 176),
    (160, 416),
    (416, 160),
    (144, 448),
    (448, 144),
]
VARIANTS: dict[str, dict[str, Any]] = {
    "square": {"resolution": 256},
    "buckets": {"resolution": 256, "buckets": True, "bucket_area": "256x256", "bucket_step": 32},
    "buckets+flip": {"resolution": 256, "buckets": True, "bucket_area": "256x256", "bucket_step": 32, "flip": "both"},
}


def make_corpus(root: Path, images: int) -> tuple[str, str]:
    from latentcache.samples import make_shards, make_vae

    shards = 4
    make_shards(root / "shards", shards=shards, per_shard=images // shards, sizes=SIZES, ext="jpg", seed=0)
    return str(root / "shards" / f"shard-{{00000..{shards - 1:05d}}}.tar"), str(make_vae(root / "vae"))


def config(variant: str, inputs: str, model: str, out: Path, batch_size: int) -> EncodeConfig:
    return build_config(
        EncodeConfig,
        {"input": inputs, "output": str(out), "model": model, "batch_size": batch_size, **VARIANTS[variant]},
    )


def end_to_end(inputs: str, model: str, root: Path, repeats: int, batch_size: int) -> dict[str, list[float]]:
    import ray

    from latentcache.pipeline import run_encode

    ray.init(num_cpus=os.cpu_count(), log_to_driver=False, logging_level="ERROR", include_dashboard=False)
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        for variant in VARIANTS:
            summary = run_encode(
                config(variant, inputs, model, root / f"out-{variant}-{r}", batch_size), progress=False
            )
            rates[variant].append(summary["counts"]["written"] / summary["seconds"])
            print(f"  {variant:13s} repeat {r}: {rates[variant][-1]:.1f} images/s", flush=True)
    ray.shutdown()
    return rates


def encoder_batches(inputs: str, model: str, root: Path, batch_size: int, sort: bool) -> list:
    """The bucketed run's encoder batches: decode blocks of rows_per_block rows, cut in batch_size rows."""
    from latentcache.buckets import BucketPlanner, sort_by_shape
    from latentcache.preprocess import PreprocessSpec, preprocess_batch
    from latentcache.sources import SourceOptions, plan_shards, read_shard_blocks

    cfg = config("buckets", inputs, model, root / "unused", batch_size)
    planner, spec = BucketPlanner.from_config(cfg), PreprocessSpec(resolution=cfg.resolution)
    batches = []
    for shard in plan_shards(inputs, "auto", {}):
        for block in read_shard_blocks(shard, SourceOptions(), rows_per_block=cfg.rows_per_block):
            table = preprocess_batch(block, spec, planner)
            table = sort_by_shape(table) if sort else table
            batches += [table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)]
    return batches


def encoder_only(inputs: str, model: str, root: Path, batch_size: int) -> dict[str, dict[str, float]]:
    """VAE calls and encoder-only images/s for the bucketed batches, unsorted vs sorted by shape."""
    from latentcache.encode import EncodeSpec, LatentEncoder, group_by_shape
    from latentcache.models import ModelSpec

    encoder = LatentEncoder(model=ModelSpec(model=model), spec=EncodeSpec())
    result = {}
    for name, sort in (("unsorted", False), ("sorted", True)):
        batches = encoder_batches(inputs, model, root, batch_size, sort)
        calls = sum(len(group_by_shape(b)) for b in batches)
        rows = sum(len(g) for b in batches for g in group_by_shape(b))
        started = time.perf_counter()
        for batch in batches:
            encoder(batch)
        seconds = time.perf_counter() - started
        result[name] = {"vae_calls": calls, "rows_per_call": rows / calls, "images_per_s": rows / seconds}
        rate = rows / seconds
        print(
            f"  encoder only, {name:8s}: {calls} VAE calls, {rows / calls:.1f} rows/call, {rate:.1f} images/s",
            flush=True,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", help="Write the results as JSON here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs, model = make_corpus(root, args.images)
        print(f"{args.images} images, {len(SIZES)} aspect ratios, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        rates = end_to_end(inputs, model, root, args.repeats, args.batch_size)
        encoder = encoder_only(inputs, model, root, args.batch_size)
    report = {
        "images": args.images,
        "batch_size": args.batch_size,
        "cpus": os.cpu_count(),
        "end_to_end_images_per_s": {v: {"median": statistics.median(r), "all": r} for v, r in rates.items()},
        "encoder_only": encoder,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
