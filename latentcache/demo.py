"""`latentcache demo`: the embedded default run for a fresh machine (no network, no GPU needed)."""

from __future__ import annotations

import time
from pathlib import Path

from .config import EncodeConfig
from .console import print_summary
from .samples import make_shards, make_vae


def run_demo(workdir: Path, *, shards: int = 4, per_shard: int = 32) -> int:
    from .pipeline import run_encode

    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    make_shards(workdir / "shards", shards=shards, per_shard=per_shard, size=(320, 384))
    model = make_vae(workdir / "vae")
    print(
        f"sample shards: {workdir / 'shards'} ({shards} x {per_shard} JPEG images)\n"
        f"model: {model} (random AutoencoderKL, saved with save_pretrained)  [{time.time() - started:.1f}s]"
    )
    cfg = EncodeConfig(
        input=str(workdir / "shards" / f"shard-{{00000..{shards - 1:05d}}}.tar"),
        output=str(workdir / "cache"),
        model=str(model),
        resolution=256,
        batch_size=16,
    )
    summary = run_encode(cfg)
    print_summary(summary)
    return 0 if summary["complete"] else 3
