"""Speed-ups the stages call through one-line hooks, kept apart so each one is measured on its own.

- channels_last on CPU by default: oneDNN's convolutions run NHWC natively, and the latents are the
  same within float rounding for every family (tests/test_fastpath.py checks each registered family);
- JPEG DCT-domain downscaling (`--jpeg-draft`): libjpeg decodes at 1/2, 1/4 or 1/8 scale for
  images at least twice the size they will be resized to (bench/jpeg_draft.py measures the effect);
- whole-column Arrow/numpy moves instead of Python loops over rows (pixels in, latent bytes out).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

# ---- memory format --------------------------------------------------------------------------


def use_channels_last(spec: Any, device: torch.device, vae: Any = None) -> bool:
    """--channels-last forces it anywhere; on CPU it is the default unless --no-channels-last, for image
    models (2D convolutions): a video VAE's 5D weights have no channels_last layout."""
    if vae is not None and any(p.dim() > 4 for p in vae.parameters()):
        return False
    return bool(spec.channels_last) or (device.type == "cpu" and not getattr(spec, "no_channels_last", False))


# ---- JPEG draft decoding --------------------------------------------------------------------


# ---- whole-column moves ---------------------------------------------------------------------


def stack_binary(
    column: pa.ChunkedArray | pa.Array, rows: np.ndarray, shape: tuple[int, ...], dtype: Any = np.uint8
) -> np.ndarray:
    """The rows' equal-sized binary values as one writable [n, *shape] array: one copy in Arrow, no per-row Python."""
    picked = column.take(pa.array(rows, pa.int64()))
    picked = picked.combine_chunks() if isinstance(picked, pa.ChunkedArray) else picked
    offsets = np.frombuffer(picked.buffers()[1], dtype=np.int32)[picked.offset : picked.offset + len(picked) + 1]
    data = np.frombuffer(picked.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.view(dtype).reshape(len(rows), *shape).copy()


def binary_rows(arr: np.ndarray) -> pa.BinaryArray:
    """[n, ...] array -> n binary values, each one row's bytes, built from the array's buffer in one go."""
    arr = np.ascontiguousarray(arr)
    n = arr.shape[0]
    row_bytes = arr.nbytes // n if n else 0
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * row_bytes).tobytes())
    return pa.BinaryArray.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(arr.reshape(-1).view(np.uint8))])


def scatter_rows(values: pa.Array, rows: np.ndarray, n: int) -> pa.Array:
    """An n-row column holding values[j] at rows[j] and null elsewhere (Arrow's take, no per-row Python)."""
    where = np.full(n, len(values), dtype=np.int64)
    where[rows] = np.arange(len(rows))
    return pa.concat_arrays([values, pa.nulls(1, values.type)]).take(pa.array(where))
