"""Small helpers shared by tests: run the CLI, read a cache back, encode directly with diffusers."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from latentcache.cli import main
from latentcache.sinks import column_to_numpy


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
    files = sorted(p for p in Path(out).rglob("*.parquet") if not p.name.startswith("_") and "_state" not in p.parts)
    return pa.concat_tables([pq.read_table(p) for p in files])


def latents(table: pa.Table, column: str = "latent") -> np.ndarray:
    return column_to_numpy(table.column(column))


def manifest(out: Path) -> dict:
    return json.loads((Path(out) / "_manifest.json").read_text())


def errors(out: Path) -> pa.Table:
    return pq.read_table(Path(out) / "_errors.parquet")


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
