"""Benchmark: untiled encode vs diffusers enable_tiling() vs latentcache's exact banded encode.

    python bench/tiling.py [--sizes 512 1024 2048 [4096]] [--device cpu|cuda] [--out results.json]

The model is the SD VAE architecture (block_out_channels=(128, 256, 512, 512), layers_per_block=2,
latent_channels=4, norm_num_groups=32) with random weights; inputs are structured images
(gradients and shapes). Every (method, size) case runs in a fresh subprocess so its peak memory
is its own: the resident high-water mark (VmHWM, reset just before the encode; ru_maxrss where
the reset is refused) over the RSS just before the encode on CPU, torch.cuda.max_memory_allocated
over the allocation just before the encode on CUDA. Errors are against the untiled moments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# exact: maps in memory while they fit (--store, default auto); exact-file: always the temp-file
# store, the bounded-memory mode used for images that do not fit.
METHODS = ("none", "diffusers", "exact", "exact-file")
SD_ENCODER = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)


def build_vae(device: str):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)  # same random weights in every subprocess
    return AutoencoderKL(**SD_ENCODER).eval().to(device)


def structured_image(size: int, seed: int = 0) -> torch.Tensor:
    """[1, 3, size, size] in [-1, 1]: smooth colour gradients, discs and boxes, a little noise."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([xs, ys, 0.5 + 0.5 * torch.sin(6 * math.pi * xs * ys)])
    for _ in range(12):
        cx, cy, r = torch.rand(3, generator=gen).tolist()
        colour = torch.rand(3, 1, 1, generator=gen)
        mask = ((xs - cx) ** 2 + (ys - cy) ** 2 < (0.05 + 0.2 * r) ** 2) if r < 0.5 else _box(xs, ys, cx, cy, r)
        img = torch.where(mask, colour, img)
    img = img + 0.02 * torch.randn(img.shape, generator=gen)
    return (img.clamp(0, 1) * 2 - 1).unsqueeze(0)


def _box(xs: torch.Tensor, ys: torch.Tensor, cx: float, cy: float, r: float) -> torch.Tensor:
    half = 0.05 + 0.15 * r
    return ((xs - cx).abs() < half) & ((ys - cy).abs() < half * 0.6)


def encode(vae, x: torch.Tensor, method: str, args: argparse.Namespace) -> torch.Tensor:
    from latentcache.tiling import exact_encode_moments

    if method.startswith("exact"):
        return exact_encode_moments(vae, x, band_mb=args.band_mb, store=_store(method, args))
    with torch.no_grad():
        return vae.encode(x).latent_dist.parameters


def _store(method: str, args: argparse.Namespace) -> str:
    return "file" if method == "exact-file" else args.store


def configure(vae, method: str, args: argparse.Namespace) -> str:
    if method == "diffusers":
        vae.enable_tiling()
        # diffusers only tiles inputs larger than tile_sample_min_size (default: sample_size).
        vae.tile_sample_min_size, vae.tile_latent_min_size = args.tile, args.tile // 8
        return f"tile {args.tile}px, overlap {vae.tile_overlap_factor}"
    return "" if method == "none" else f"bands of {args.band_mb:g} MB, store {_store(method, args)}"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_seconds() -> float:
    # Reported next to wall time: on a shared, loaded CPU box it is the steadier of the two.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def memory_mark(device: str) -> float:
    """Resets the peak counter and returns the memory in use now (MiB)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:  # reset VmHWM so that set-up transients neither hide nor inflate the encode's peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then VmHWM equals ru_maxrss: a peak over the whole process
    return _rss_mb()


def memory_peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    return int(hwm.split()[1]) / 1024


def run_case(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    vae = build_vae(args.device)
    setting = configure(vae, args.case, args)
    encode(vae, structured_image(64).to(args.device), args.case, args)  # warm-up
    x = structured_image(args.size).to(args.device)
    _sync(args.device)
    base = memory_mark(args.device)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    moments = encode(vae, x, args.case, args)
    _sync(args.device)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    peak = memory_peak(args.device)
    row = {"size": args.size, "method": args.case, "setting": setting, "seconds": seconds, "cpu_seconds": cpu}
    row.update(peak_mb=peak, peak_over_base_mb=peak - base, **compare(moments.float().cpu(), args))
    return row


def compare(moments: torch.Tensor, args: argparse.Namespace) -> dict:
    ref_path = Path(args.ref)
    if args.case == "none":
        torch.save(moments, ref_path)
        return {"rel_l2": 0.0, "max_abs": 0.0}
    if not ref_path.exists():
        return {"rel_l2": None, "max_abs": None}
    ref = torch.load(ref_path)
    diff = moments - ref
    return {"rel_l2": (diff.norm() / ref.norm()).item(), "max_abs": diff.abs().max().item()}


def spawn_case(args: argparse.Namespace, method: str, size: int, ref: Path) -> dict:
    cmd = [sys.executable, __file__, "--case", method, "--size", str(size), "--ref", str(ref)]
    cmd += ["--threads", str(args.threads), "--device", args.device, "--tile", str(args.tile)]
    cmd += ["--band-mb", str(args.band_mb), "--store", args.store]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:  # e.g. out of memory: report it rather than stop the whole table
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"size": size, "method": method, "error": tail[0][-200:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_all(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tiling-") as tmp:
        for size in args.sizes:
            ref = Path(tmp) / f"ref_{size}.pt"
            for method in args.methods:
                skip = method == "none" and size > args.max_full_px
                note = {"size": size, "method": method, "error": f"skipped (> --max-full-px {args.max_full_px})"}
                rows.append(note if skip else spawn_case(args, method, size, ref))
                print(_row_line(rows[-1]), flush=True)
    return rows


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _row_line(r: dict) -> str:
    if "error" in r:
        return f"| {r['size']} | {r['method']} | | | | | | | {r['error']} |"
    cells = [
        _fmt(r["seconds"], ".1f"),
        _fmt(r["cpu_seconds"], ".1f"),
        _fmt(r["peak_mb"], ".0f"),
        _fmt(r["peak_over_base_mb"], ".0f"),
    ]
    cells += [_fmt(r["rel_l2"], ".2e"), _fmt(r["max_abs"], ".2e")]
    return f"| {r['size']} | {r['method']} | {' | '.join(cells)} | {r['setting']} |"


HEADER = (
    "| size px | method | wall s | CPU s | peak MB | peak over base MB "
    "| rel. L2 vs none | max abs vs none | setting |\n"
    "|---:|---|---:|---:|---:|---:|---:|---:|---|"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="write the rows and metadata as JSON")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--max-full-px", type=int, default=2048, help="skip the untiled encode above this size")
    p.add_argument("--tile", type=int, default=256, help="diffusers tile_sample_min_size")
    p.add_argument("--band-mb", type=float, default=64.0, help="exact: working memory per band")
    p.add_argument("--store", default="auto", choices=["auto", "device", "host", "file"], help="exact: map store")
    p.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    p.add_argument("--case", choices=METHODS, help=argparse.SUPPRESS)  # internal: run one case
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ref", help=argparse.SUPPRESS)
    return p.parse_args(argv)


INTERNAL = ("case", "size", "ref")


def metadata(args: argparse.Namespace) -> dict:
    import diffusers

    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    return {
        "device": device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in SD_ENCODER.items()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in INTERNAL},
    }


def main() -> None:
    args = parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    print(f"device={args.device} sizes={args.sizes} tile={args.tile} band_mb={args.band_mb} store={args.store}")
    print(HEADER, flush=True)
    rows = run_all(args)
    print("\n" + HEADER + "\n" + "\n".join(_row_line(r) for r in rows))
    if args.out:
        args.out.write_text(json.dumps({"meta": metadata(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
