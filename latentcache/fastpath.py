"""Speed-ups the stages call through one-line hooks, kept apart so each one is measured on its own.

- channels_last on CPU by default: oneDNN's convolutions run NHWC natively, and the latents are the
  same within float rounding for every family (tests/test_fastpath.py checks each registered family);
- JPEG DCT-domain downscaling (`--jpeg-draft`): libjpeg decodes at 1/2, 1/4 or 1/8 scale for
  images at least twice the size they will be resized to (bench/jpeg_draft.py measures the effect);
- whole-column Arrow/numpy moves instead of Python loops over rows (pixels in, latent bytes out).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


# ---- memory format --------------------------------------------------------------------------


def use_channels_last(spec: Any, device: torch.device, vae: Any = None) -> bool:
    """--channels-last forces it anywhere; on CPU it is the default unless --no-channels-last, for image
    models (2D convolutions): a video VAE's 5D weights have no channels_last layout."""
    if vae is not None and any(p.dim() > 4 for p in vae.parameters()):
        return False
    return bool(spec.channels_last) or (device.type == "cpu" and not getattr(spec, "no_channels_last", False))


# ---- JPEG draft decoding --------------------------------------------------------------------


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(height, width) as the image will be after its EXIF orientation is applied, read from the header."""
    width, height = img.size
    orientation = img.getexif().get(0x0112, 1) if img.format == "JPEG" else 1
    return (width, height) if orientation in ROTATED_ORIENTATIONS else (height, width)


def draft_request(img: Image.Image, height: int, width: int) -> tuple[int, int] | None:
    """The smallest (width, height), in the file's own orientation, that still covers the resized crop:
    libjpeg then picks the largest 1/2^k scale at or above it, so the resize afterwards only shrinks."""
    oriented_h, oriented_w = oriented_size(img)
    scale = max(height / oriented_h, width / oriented_w)
    need_h, need_w = math.ceil(oriented_h * scale), math.ceil(oriented_w * scale)
    rotated = (oriented_h, oriented_w) != (img.size[1], img.size[0])
    return (need_h, need_w) if rotated else (need_w, need_h)


def preprocess_drafted(data: bytes | None, spec: Any, *, key: str, planner: Any) -> tuple[np.ndarray, Any]:
    """preprocess_image with the JPEG decoded at the smallest DCT scale that still covers the crop.

    The crop metadata keeps the original size (SDXL's original_size); --min-size applies to it too."""
    from .preprocess import ImageError, decode_image, pixels_chw, resize_and_crop, to_rgb

    original: dict[str, tuple[int, int]] = {}

    def draft(img: Image.Image) -> None:
        original["size"] = oriented_size(img)
        height, width, _, _ = planner(key, *original["size"])
        if img.format == "JPEG":
            img.draft(img.mode, draft_request(img, height, width))

    img = to_rgb(decode_image(data, max_pixels=spec.max_pixels, draft=draft))
    height0, width0 = original.get("size", (img.height, img.width))
    if spec.min_size and min(height0, width0) < spec.min_size:
        raise ImageError(f"image is {width0}x{height0}, smaller than --min-size {spec.min_size}")
    height, width, crop, rng = planner(key, height0, width0)
    img, meta = resize_and_crop(img, height, width, crop=crop, rng=rng)
    return pixels_chw(img), dataclasses.replace(meta, original_height=height0, original_width=width0)


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
