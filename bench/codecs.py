"""What 8-bit storage costs: int8 and fp8 (and fp16) against fp32, as `latentcache audit --compare` reports it.

Two corpora: the demo's (`latentcache demo` shards and its random VAE) and the photographs bundled
with scikit-image made into one shard, both encoded by the demo VAE at 256 px. Every cache is made
by `latentcache encode` (skipped when WORKDIR already holds it) and measured by `latentcache audit
--compare`; bytes per latent are the data files of each cache over its rows.

    PYTHONPATH=$PWD python bench/codecs.py WORKDIR [--sample 128]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from latentcache.cli import main
from latentcache.samples import encode_image, make_shards, make_vae, write_tar

DTYPES = ("fp32", "fp16", "int8", "fp8")
PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "retina",
    "moon",
    "brick",
    "grass",
    "gravel",
    "coins",
    "page",
    "text",
    "hubble_deep_field",
    "stereo_motorcycle",
)


def photo_shard(folder: Path) -> str:
    """scikit-image's photographs (not its synthetic images), lossless PNG, one WebDataset shard."""
    from skimage import data

    path = folder / "shard-00000.tar"
    if not path.exists():
        members = []
        for name in PHOTOS:
            image = getattr(data, name)()
            image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)
            image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
            members += [(f"{name}.png", encode_image(Image.fromarray(image), "png")), (f"{name}.txt", name.encode())]
        write_tar(path, members)
    return str(path)


def demo_corpus(folder: Path) -> tuple[str, Path]:
    if not (folder / "shards" / "shard-00003.tar").exists():
        make_shards(folder / "shards", shards=4, per_shard=32, size=(320, 384))  # as `latentcache demo`
    model = folder / "vae"
    if not (model / "config.json").exists():
        make_vae(model)
    return str(folder / "shards" / "shard-{00000..00003}.tar"), model


def encode_all(corpus: str, model: Path, out: Path) -> None:
    for dtype in DTYPES:
        if not (out / dtype / "__latentcache__" / "manifest.json").exists():
            assert (
                main(
                    [
                        "encode",
                        "--quiet",
                        "--input",
                        corpus,
                        "--output",
                        str(out / dtype),
                        "--model",
                        str(model),
                        "--resolution",
                        "256",
                        "--store-dtype",
                        dtype,
                    ]
                )
                == 0
            )


def compare(out: Path, dtype: str, sample: int) -> dict:
    main(["audit", "--cache", str(out / dtype), "--compare", str(out / "fp32"), "--sample", str(sample)])
    return json.loads((out / dtype / "_audit" / "summary.json").read_text())["compare"]


def report(name: str, out: Path, sample: int) -> list[str]:
    results = {dtype: compare(out, dtype, sample) for dtype in DTYPES[1:]}
    fp16_bytes = results["fp16"]["bytes_per_latent"]
    fp32_bytes = results["fp16"]["other_bytes_per_latent"]
    lines = [f"{name}: {results['fp16']['compared']} keys, bytes per latent fp32 {fp32_bytes:.0f}"]
    for dtype, c in results.items():
        m = c["metrics"]
        lines.append(
            f"  {dtype:5s} rel L2 mean {m['latent_rel_l2']['mean']:.4%} max {m['latent_rel_l2']['max']:.4%} | "
            f"PSNR change mean {m['psnr_delta']['mean']:+.4f} dB, max |.| "
            f"{max(abs(m['psnr_delta']['min']), abs(m['psnr_delta']['max'])):.4f} dB | "
            f"PSNR between decodes mean {m['psnr_between']['mean']:.2f} dB | SSIM change mean "
            f"{m['ssim_delta']['mean']:+.5f} | bytes/latent {c['bytes_per_latent']:.0f} "
            f"({c['bytes_per_latent'] / fp16_bytes:.3f}x fp16)"
        )
    return lines


def run(workdir: Path, sample: int) -> None:
    demo_input, model = demo_corpus(workdir / "demo")
    encode_all(demo_input, model, workdir / "demo")
    encode_all(photo_shard(workdir / "photos" / "shards"), model, workdir / "photos")
    lines = report("demo corpus", workdir / "demo", sample) + report("photographs", workdir / "photos", sample)
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--sample", type=int, default=128, help="keys compared per cache (all of them by default)")
    args = parser.parse_args()
    run(args.workdir, args.sample)
