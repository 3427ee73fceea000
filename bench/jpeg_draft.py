"""What `--jpeg-draft` costs in latents and gains in decode speed, on real photographs.

    python bench/jpeg_draft.py --out bench/results/jpeg_draft.json

scikit-image's colour photographs, resized (Lanczos, downscaling only) so their shorter side is k times
the target side R, are saved as JPEG q=95 and q=90. Each goes through latentcache's preprocess (full
decode, and DCT-domain draft decode) and through the tiny and sd workloads' VAEs (bench/run.py's models).
Per case it reports the relative L2 distance ||z_a - z_b|| / ||z_b|| of
  draft:   draft decode of the q=95 file  vs  full decode of the q=95 file;
  quality: full decode of the q=90 file   vs  full decode of the q=95 file (two qualities a user treats as equal);
and the decode+preprocess CPU time of both paths (the fastest of --repeats). The draft is worth making
the default only if its latent difference stays below the quality one.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import make_model, workloads
from latentcache.preprocess import PreprocessSpec, preprocess_image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photographs() -> dict[str, np.ndarray]:
    from skimage import data

    return {name: getattr(data, name)()[..., :3] for name in PHOTOS}


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def cases(resolutions: list[int], factors: list[float]) -> list[dict[str, Any]]:
    """(photo, R, k) with the photo downscaled to shorter side k*R; combinations needing an upscale are skipped."""
    out = []
    for name, photo in photographs().items():
        img = Image.fromarray(photo)
        for resolution in resolutions:
            for k in factors:
                scale = k * resolution / min(img.size)
                if scale > 1:
                    continue
                size = (round(img.width * scale), round(img.height * scale))
                resized = img.resize(size, Image.Resampling.LANCZOS)
                out.append(
                    {
                        "photo": name,
                        "resolution": resolution,
                        "factor": k,
                        "size": list(size),
                        "q95": jpeg_bytes(resized, 95),
                        "q90": jpeg_bytes(resized, 90),
                    }
                )
    return out


def decode(data: bytes, resolution: int, draft: bool, repeats: int) -> tuple[np.ndarray, float]:
    """Pixels and the fastest of `repeats` decodes in CPU seconds (a shared machine's neighbours add to wall
    time, not to this process's CPU time; the minimum drops the repeats a cache flush slowed down)."""
    spec = PreprocessSpec(resolution=resolution, jpeg_draft=draft)
    times = []
    for _ in range(repeats):
        start = time.process_time()
        pixels, _ = preprocess_image(data, spec)
        times.append(time.process_time() - start)
    return pixels, min(times)


def latent(vae: Any, pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        encoded = vae.encode(x)
    return encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents


def rel_l2(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(np.asarray(a, dtype=np.float64)), torch.as_tensor(np.asarray(b, dtype=np.float64))
    return float((a - b).norm() / b.norm())


def measure(case: dict[str, Any], vaes: dict[str, Any], repeats: int) -> dict[str, Any]:
    r = case["resolution"]
    full95, t_full = decode(case["q95"], r, False, repeats)
    draft95, t_draft = decode(case["q95"], r, True, repeats)
    full90, _ = decode(case["q90"], r, False, 1)
    out = {k: case[k] for k in ("photo", "resolution", "factor", "size")}
    out.update(
        decode_ms_full=1e3 * t_full,
        decode_ms_draft=1e3 * t_draft,
        decode_speedup=t_full / t_draft,
        pixels_draft_rel_l2=rel_l2(draft95, full95),
        pixels_quality_rel_l2=rel_l2(full90, full95),
    )
    for name, vae in vaes.items():
        z95 = latent(vae, full95)
        out[f"{name}_draft_rel_l2"] = rel_l2(latent(vae, draft95).numpy(), z95.numpy())
        out[f"{name}_quality_rel_l2"] = rel_l2(latent(vae, full90).numpy(), z95.numpy())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--factors", type=float, nargs="+", default=[2, 3, 4])
    parser.add_argument("--models", nargs="+", default=["tiny", "sd"])
    parser.add_argument("--repeats", type=int, default=20, help="Timed decodes per image and path.")
    parser.add_argument("--workdir", default="bench/results/work")
    parser.add_argument("--out", default="bench/results/jpeg_draft.json")
    args = parser.parse_args(argv)
    import diffusers

    vaes = {}
    for name in args.models:
        folder = make_model(workloads(False)[name], Path(args.workdir) / f"model-{name}")
        config = json.loads((folder / "config.json").read_text())
        vaes[name] = getattr(diffusers, config["_class_name"]).from_pretrained(folder).eval()
    rows = [measure(c, vaes, args.repeats) for c in cases(args.resolutions, args.factors)]
    print(
        "| photo | R | k | decode full ms | draft ms | speed-up | pixels draft / q90 rel L2 | "
        + " | ".join(f"{m} draft / q90 rel L2" for m in vaes)
        + " |"
    )
    print("|" + "---|" * (7 + len(vaes)))
    for row in rows:
        print(
            f"| {row['photo']} | {row['resolution']} | {row['factor']:g} | {row['decode_ms_full']:.2f} | "
            f"{row['decode_ms_draft']:.2f} | {row['decode_speedup']:.2f}x | {row['pixels_draft_rel_l2']:.4f} / "
            f"{row['pixels_quality_rel_l2']:.4f} | "
            + " | ".join(f"{row[f'{m}_draft_rel_l2']:.4f} / {row[f'{m}_quality_rel_l2']:.4f}" for m in vaes)
            + " |"
        )
    verdict = {
        m: {
            "draft_median": statistics.median(r[f"{m}_draft_rel_l2"] for r in rows),
            "quality_median": statistics.median(r[f"{m}_quality_rel_l2"] for r in rows),
            "cases_draft_below_quality": sum(r[f"{m}_draft_rel_l2"] < r[f"{m}_quality_rel_l2"] for r in rows),
            "cases": len(rows),
        }
        for m in vaes
    }
    verdict["median_decode_speedup"] = statistics.median(r["decode_speedup"] for r in rows)
    verdict["default"] = all(v["draft_median"] < v["quality_median"] for k, v in verdict.items() if k in vaes)
    print("\n" + json.dumps(verdict, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cases": rows, "verdict": verdict}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
