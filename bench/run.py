"""Throughput benchmark: the `latentcache encode` command against the loop a user would write, and its bound.

    python bench/run.py --workload tiny standin --out bench/results/bench.json

Per workload, on generated JPEG corpora of two sizes (`--images SMALL LARGE`) and the same model:
  naive:       a subprocess running the ten-line loop (webdataset + PIL decode, vae.encode, one .npz per image);
  e2e:         a subprocess running `python -m latentcache encode`, as a user types it (start-up included);
  model-only:  latentcache's encoder on pixels already in memory, in a process with the environment Ray's
               workers get (the encoder's own limit);
  decode-only: read + decode + preprocess on every core, no encoder (the input side's limit).
Both commands are timed whole; their steady state is (LARGE - SMALL) / (T_LARGE - T_SMALL) and their fixed
cost T_SMALL - SMALL / steady. On a CPU the encoder and the decoder share the cores, so the bound is
1 / (1/model + 1/decode); on a GPU it is min(model, decode). The pipeline's own CPU cost per image is
what the steady state leaves beyond decode and model: cores * (1/steady - 1/bound), an upper estimate
(idle cores count in it). Runs are interleaved (naive, e2e, naive, e2e...) so a noisy neighbour hits both;
each figure is the median over --repeats. Prints a markdown table and writes the JSON to --out.

Workloads: tiny (TAESD architecture, 256 px from ~2x larger JPEGs), sd (the SD-VAE encoder; 512 px on a
GPU) and standin, the CPU stand-in for a GPU: a near-free AutoencoderTiny with 8-channel blocks at 64 px
from 320x384 JPEGs, batch 64, where the pipeline's own costs are all that is left to see.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latentcache.preprocess import PreprocessSpec, preprocess_image  # noqa: E402
from latentcache.samples import make_shards  # noqa: E402
from latentcache.sources import SourceOptions, plan_shards, read_tar  # noqa: E402


@dataclass(frozen=True, kw_only=True)
class Workload:
    name: str
    kind: str  # diffusers class: "tiny" (AutoencoderTiny) or "kl" (AutoencoderKL)
    config: dict[str, Any]
    resolution: int
    image_size: tuple[int, int]  # (height, width) of the generated JPEGs
    images: tuple[int, int]  # the two corpus sizes: whole-command at each, steady state between them
    batch_size: int = 16
    e2e_args: tuple[str, ...] = field(default=())


SD_ENCODER = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
STANDIN = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8))


def workloads(gpu: bool) -> dict[str, Workload]:
    return {
        "tiny": Workload(name="tiny", kind="tiny", config={}, resolution=256, image_size=(512, 576), images=(96, 384)),
        "sd": Workload(
            name="sd",
            kind="kl",
            config=SD_ENCODER,
            resolution=512 if gpu else 256,
            image_size=(1024, 1152) if gpu else (512, 576),
            images=(64, 256),
            e2e_args=("--dtype", "bf16") if gpu else (),
        ),
        "standin": Workload(
            name="standin",
            kind="tiny",
            config=STANDIN,
            resolution=64,
            image_size=(320, 384),
            images=(1024, 4096),
            batch_size=64,
        ),
    }


def make_model(workload: Workload, folder: Path) -> Path:
    import diffusers

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    cls = diffusers.AutoencoderTiny if workload.kind == "tiny" else diffusers.AutoencoderKL
    cls(**workload.config).save_pretrained(folder)
    return folder


def shard_size(images: int, most: int = 64) -> int:
    """The largest shard size up to `most` that divides the corpus, so every image is used."""
    return next(d for d in range(min(most, images), 0, -1) if images % d == 0)


def make_corpus(folder: Path, images: int, size: tuple[int, int]) -> list[Path]:
    per_shard = shard_size(images)
    marker = folder / f".done-{images // per_shard}x{per_shard}-{size[0]}x{size[1]}"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        make_shards(folder, shards=images // per_shard, per_shard=per_shard, size=size, ext="jpg")
        marker.touch()
    return sorted(folder.glob("shard-*.tar"))


# ---- the two commands, each a subprocess timed whole ------------------------------------------

NAIVE = ROOT / "bench" / "naive.py"


def run_command(argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed:\n{done.stderr[-3000:]}")
    return seconds


def naive_command(shards: list[Path], model: Path, w: Workload, device: str, out: Path) -> list[str]:
    return [
        sys.executable,
        str(NAIVE),
        "--shards",
        *map(str, shards),
        "--model",
        str(model),
        "--resolution",
        str(w.resolution),
        "--batch-size",
        str(w.batch_size),
        "--device",
        device,
        "--out",
        str(out),
    ]


def e2e_command(shards: list[Path], model: Path, w: Workload, out: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "latentcache",
        "encode",
        "--quiet",
        "--input",
        str(shards[0].parent / "shard-*.tar"),
        "--output",
        str(out),
        "--model",
        str(model),
        "--resolution",
        str(w.resolution),
        "--batch-size",
        str(w.batch_size),
        *w.e2e_args,
        *extra,
    ]


def timed_in_tmp(make_argv: Callable[[Path], list[str]]) -> float:
    out = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        return run_command(make_argv(out / "out"))
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ---- the two limits -----------------------------------------------------------------------------


def run_model_only(model: Path, w: Workload, images: int, device: torch.device, **features: Any) -> float:
    """Images/s of latentcache's encoder on uint8 pixels already in memory; the warm-up call is not timed."""
    from latentcache.encode import EncodeSpec, LatentEncoder
    from latentcache.models import ModelSpec

    encoder = LatentEncoder(model=ModelSpec(model=str(model)), spec=EncodeSpec(**features))
    x = torch.randint(0, 256, (w.batch_size, 3, w.resolution, w.resolution), dtype=torch.uint8)
    x = x.pin_memory() if device.type == "cuda" else x
    encoder.encode_pixels(x)
    done, start = 0, time.perf_counter()
    while done < images:
        encoder.encode_pixels(x)
        done += w.batch_size
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def model_only_in_worker_env(model: Path, w: Workload, images: int, device: torch.device, **features: Any) -> float:
    """run_model_only in a fresh process with the environment Ray's workers get (the allocator, passive
    OpenMP threads: latentcache.startup.worker_env), so the model's limit is the encoder actor's."""
    from latentcache.startup import worker_env

    args = {"model": str(model), "resolution": w.resolution, "batch_size": w.batch_size, "images": images}
    args.update(device=str(device), features=features)
    code = "import json, sys; from bench.run import model_only_child; model_only_child(json.loads(sys.argv[1]))"
    env = {**os.environ, **worker_env(), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"model-only run failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.split()[-1])


def model_only_child(args: dict[str, Any]) -> None:
    w = Workload(
        name="model-only",
        kind="",
        config={},
        resolution=args["resolution"],
        image_size=(0, 0),
        images=(0, 0),
        batch_size=args["batch_size"],
    )
    device = torch.device(args["device"])
    print(run_model_only(Path(args["model"]), w, args["images"], device, **args["features"]))


FEATURES = {  # each measured on the model-only path
    "contiguous_fp32": {"no_channels_last": True},
    "channels_last_fp32": {"channels_last": True},
    "bf16": {"dtype": "bf16", "no_channels_last": True},
    "bf16_channels_last": {"dtype": "bf16", "channels_last": True},
    "compile": {"compile": True, "no_channels_last": True},
    "compile_channels_last": {"compile": True, "channels_last": True},
    "bf16_compile": {"dtype": "bf16", "compile": True, "no_channels_last": True},
    "bf16_compile_channels_last": {"dtype": "bf16", "compile": True, "channels_last": True},
}
GPU_FEATURES = ["bf16", "bf16_channels_last", "bf16_compile", "bf16_compile_channels_last"]  # --features gpu


def _decode_shard(args: tuple[str, int, bool]) -> int:
    shard, resolution, draft = args
    spec, n = PreprocessSpec(resolution=resolution, jpeg_draft=draft), 0
    for sample in read_tar(plan_shards(shard, "webdataset", {})[0], SourceOptions()):
        preprocess_image(sample.image, spec)
        n += 1
    return n


def run_decode_only(shards: list[Path], resolution: int, cpus: int, draft: bool) -> float:
    """Images/s of read + decode + preprocess on `cpus` processes, timed after the pool has started."""
    with mp.get_context("spawn").Pool(cpus) as pool:
        pool.map(_decode_shard, [(str(shards[0]), resolution, draft)] * cpus)  # imports and page cache warm
        start = time.perf_counter()
        n = sum(pool.map(_decode_shard, [(str(s), resolution, draft) for s in shards], chunksize=1))
        return n / (time.perf_counter() - start)


# ---- harness ------------------------------------------------------------------------------------


def steady(sizes: tuple[int, int], seconds: tuple[float, float]) -> tuple[float | None, float | None]:
    """(images/s between the two sizes, fixed seconds): the line through (size, time) at both sizes; None
    when the larger run was not slower (noise larger than the work between them: more repeats or images)."""
    if seconds[1] <= seconds[0]:
        return None, None
    rate = (sizes[1] - sizes[0]) / (seconds[1] - seconds[0])
    return rate, seconds[0] - sizes[0] / rate


def bound(model_only: float, decode_only: float, gpu: bool) -> float:
    return min(model_only, decode_only) if gpu else 1.0 / (1.0 / model_only + 1.0 / decode_only)


def measure_commands(w: Workload, corpora: dict[int, list[Path]], model: Path, args: argparse.Namespace) -> dict:
    """Whole-command seconds per size, naive and e2e interleaved, repeated; medians and every run."""
    extra = ["--jpeg-draft"] if args.jpeg_draft else []
    extra += shlex.split(args.e2e_args or "")
    runs: dict[str, dict[int, list[float]]] = {"naive": {n: [] for n in w.images}, "e2e": {n: [] for n in w.images}}
    for r in range(args.repeats):
        for n in w.images:
            shards = corpora[n]
            runs["naive"][n].append(timed_in_tmp(lambda out, s=shards: naive_command(s, model, w, args.device, out)))
            runs["e2e"][n].append(timed_in_tmp(lambda out, s=shards: e2e_command(s, model, w, out, extra)))
            print(
                f"[{w.name}] repeat {r + 1}: {n} images: naive {runs['naive'][n][-1]:.1f} s, "
                f"e2e {runs['e2e'][n][-1]:.1f} s (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    return runs


def summarise(w: Workload, runs: dict, model_rate: float, decode_rate: float, gpu: bool, cores: int) -> dict:
    med = {tool: {n: statistics.median(t) for n, t in per.items()} for tool, per in runs.items()}
    small, large = w.images
    out: dict[str, Any] = {
        "workload": w.name,
        "resolution": w.resolution,
        "images": list(w.images),
        "batch_size": w.batch_size,
        "whole_seconds": med,
        "runs_seconds": runs,
        "model_only_images_per_s": model_rate,
        "decode_only_images_per_s": decode_rate,
        "bound_images_per_s": bound(model_rate, decode_rate, gpu),
        "bound_formula": "min(model, decode)" if gpu else "1/(1/model + 1/decode)",
    }
    for tool in ("naive", "e2e"):
        rate, fixed = steady(w.images, (med[tool][small], med[tool][large]))
        out[f"{tool}_steady_images_per_s"], out[f"{tool}_fixed_seconds"] = rate, fixed
    for n in w.images:
        out[f"whole_e2e_over_naive_{n}"] = med["naive"][n] / med["e2e"][n]
    e2e, naive, limit = out["e2e_steady_images_per_s"], out["naive_steady_images_per_s"], out["bound_images_per_s"]
    out["steady_e2e_over_naive"] = e2e / naive if e2e and naive else None
    out["steady_e2e_over_bound"] = e2e / limit if e2e else None
    out["pipeline_cpu_us_per_image"] = cores * 1e6 * (1 / e2e - 1 / limit) if e2e else None
    return out


def run_workload(w: Workload, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    gpu = device.type == "cuda"
    root = Path(args.workdir)
    corpora = {n: make_corpus(root / f"corpus-{w.name}-{n}", n, w.image_size) for n in w.images}
    model = make_model(w, root / f"model-{w.name}")
    cores = os.cpu_count() or 1
    print(
        f"[{w.name}] JPEGs {w.image_size[0]}x{w.image_size[1]} -> {w.resolution}px, {w.images} images, "
        f"batch {w.batch_size}, device {device}",
        flush=True,
    )
    runs = measure_commands(w, corpora, model, args)
    model_rate = statistics.median(model_only_in_worker_env(model, w, w.images[0], device) for _ in range(args.repeats))
    decode_rate = statistics.median(
        run_decode_only(corpora[w.images[-1]], w.resolution, args.decode_cpus or cores, args.jpeg_draft)
        for _ in range(args.repeats)
    )
    summary = summarise(w, runs, model_rate, decode_rate, gpu, cores)
    if args.features:
        summary["features_model_only_images_per_s"] = {
            name: model_only_in_worker_env(model, w, w.images[0], device, **FEATURES[name]) for name in args.features
        }
    return summary


TABLE = [  # (header, key or function of the summary, format)
    ("workload", "workload", "{}"),
    ("images", lambda s: "/".join(map(str, s["images"])), "{}"),
    ("whole e2e/naive (small)", lambda s: s[f"whole_e2e_over_naive_{s['images'][0]}"], "{:.2f}x"),
    ("whole e2e/naive (large)", lambda s: s[f"whole_e2e_over_naive_{s['images'][1]}"], "{:.2f}x"),
    ("steady e2e img/s", "e2e_steady_images_per_s", "{:.1f}"),
    ("steady naive img/s", "naive_steady_images_per_s", "{:.1f}"),
    ("steady e2e/naive", "steady_e2e_over_naive", "{:.2f}x"),
    ("model img/s", "model_only_images_per_s", "{:.1f}"),
    ("decode img/s", "decode_only_images_per_s", "{:.1f}"),
    ("bound img/s", "bound_images_per_s", "{:.1f}"),
    ("steady e2e/bound", "steady_e2e_over_bound", "{:.2f}x"),
    ("e2e fixed s", "e2e_fixed_seconds", "{:.1f}"),
    ("naive fixed s", "naive_fixed_seconds", "{:.1f}"),
    ("pipeline CPU us/img", "pipeline_cpu_us_per_image", "{:.0f}"),
]


def markdown(summaries: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for s in summaries:
        values = [key(s) if callable(key) else s[key] for _, key, _ in TABLE]
        cells = ["n/a" if v is None else fmt.format(v) for v, (_, _, fmt) in zip(values, TABLE)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", default=["tiny", "standin"], choices=["tiny", "sd", "standin"])
    parser.add_argument("--images", type=int, nargs=2, default=None, help="Override the two corpus sizes.")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None, help="Override the workload's batch size.")
    parser.add_argument("--resolution", type=int, default=None, help="Override the workload's target side.")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, help="Override the JPEGs' height width.")
    parser.add_argument("--decode-cpus", type=int, default=None, help="Processes for decode-only (default: all cores).")
    parser.add_argument("--jpeg-draft", action="store_true", help="Run e2e and decode-only with --jpeg-draft.")
    parser.add_argument("--e2e-args", default=None, help="More `latentcache encode` flags, e.g. '--compile'.")
    parser.add_argument(
        "--features",
        nargs="*",
        default=[],
        choices=[*sorted(FEATURES), "gpu"],
        help="Also measure these encoder features on the model-only path (gpu: the bf16 set).",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", default="bench/results/work")
    parser.add_argument("--out", default="bench/results/bench.json")
    args = parser.parse_args(argv)
    args.features = [f for name in args.features for f in (GPU_FEATURES if name == "gpu" else [name])]
    device = torch.device(args.device)
    chosen = [apply_overrides(workloads(device.type == "cuda")[name], args) for name in args.workload]
    load_before = os.getloadavg()
    summaries = [run_workload(w, args, device) for w in chosen]
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "load_before_after": [load_before, os.getloadavg()],
        },
        "args": vars(args),
        "workloads": summaries,
        "table": markdown(summaries),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("\n" + report["table"] + f"\n\nload average before/after: {load_before} / {os.getloadavg()}")
    print(f"results: {args.out}")
    return 0


def apply_overrides(w: Workload, args: argparse.Namespace) -> Workload:
    overrides = {
        "images": tuple(args.images) if args.images else None,
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "image_size": tuple(args.image_size) if args.image_size else None,
    }
    return replace(w, **{k: v for k, v in overrides.items() if v is not None})


if __name__ == "__main__":
    raise SystemExit(main())
