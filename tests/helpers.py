"""Small helpers shared by tests: run the CLI, read a cache back, encode directly with diffusers."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from latentcache.cache.formats import column_to_numpy
from latentcache.cache.layout import META
from latentcache.cache.reader import Cache
from latentcache.cli import main


def encode(capsys=None, **flags: Any) -> int:
    """Runs `latentcache encode` through the CLI entry point with --flag value pairs."""
    argv = ["encode", "--quiet"]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return main(argv)


def read_cache(out: Path) -> pa.Table:
    """Every committed row of a Parquet cache: the part files its shard records name."""
    return pa.concat_tables([pq.read_table(Path(out) / f.path) for f in Cache(str(out)).files])


def latents(table: pa.Table, column: str = "latent") -> np.ndarray:
    return column_to_numpy(table.column(column))


def manifest(out: Path) -> dict:
    """The manifest, with `shards` (output name -> record, its parts also as `files`) from the shard table."""
    return Cache(str(out)).manifest


def stats(out: Path) -> dict:
    return json.loads((Path(out) / META / "stats.json").read_text())


def errors(out: Path) -> pa.Table:
    return Cache(str(out)).errors()


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def named_files(out: Path) -> set[str]:
    """Part and error files the shard records name (everything else under data/ or errors/ is a stray)."""
    cache = Cache(str(out))
    records = cache.all_records.values()
    return {p["path"] for r in records for p in r.get("parts", [])} | {e for r in records for e in r.get("errors", [])}
