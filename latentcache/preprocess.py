"""Image bytes -> uint8 pixels [3, H, W] plus crop metadata, as pure functions.

Pixels stay uint8 until they reach the encoder (4x less to move than float32); `to_model_input`
maps them to [-1, 1] on the encoder's device. A bad image raises `ImageError`, which the
batch function turns into an error row: it never stops the job.
"""

from __future__ import annotations

import dataclasses
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from .errors import LatentcacheError
from .rows import CROP, PIXEL_SCHEMA, carry

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif")  # animated GIF/WebP: the first frame
WHITE = (255, 255, 255)


class ImageError(LatentcacheError):
    """The bytes are not a usable image; the message is the reason recorded in the errors table."""


@dataclass(frozen=True, kw_only=True)
class PreprocessSpec:
    resolution: int
    max_pixels: int = 89_478_485
    min_size: int = 0
    jpeg_draft: bool = False  # decode big JPEGs at a DCT scale still covering the crop (preprocess_drafted)


@dataclass(frozen=True)
class CropMeta:
    """SDXL's micro-conditioning: original_size, crops_coords_top_left (in the resized image), target_size."""

    original_height: int
    original_width: int
    crop_top: int
    crop_left: int
    crop_left_flipped: int  # crop_left in the mirrored resized image, for latent_flipped
    bucket_height: int
    bucket_width: int


def decode_image(
    data: bytes | None, *, max_pixels: int, draft: Callable[[Image.Image], None] | None = None
) -> Image.Image:
    """Decodes fully (so truncation shows here, not later) and guards against decompression bombs."""
    if not data:
        raise ImageError("empty image (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise ImageError(f"image has {img.width}x{img.height} pixels, over the limit of {max_pixels}")
            if draft is not None:  # before load: JPEG DCT-domain downscaling (preprocess_drafted)
                draft(img)
            img.seek(0)  # animated GIF/WebP: the first frame
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"decompression bomb guard: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
        raise ImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    return img


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    peak = 65535.0 if arr.dtype != np.uint8 else 255.0
    return Image.fromarray(np.clip(arr.astype(np.float64) * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied; alpha composited on white; grayscale, palette, CMYK, 16-bit handled."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _sixteen_bit_to_l(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGB", img.size, WHITE)
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def resize_and_crop(
    img: Image.Image, height: int, width: int, *, crop: str = "center", rng: np.random.Generator | None = None
) -> tuple[Image.Image, CropMeta]:
    """Resizes to cover (height, width) keeping the aspect ratio, then crops to it."""
    orig_w, orig_h = img.size
    scale = max(height / orig_h, width / orig_w)
    new_w, new_h = max(width, round(orig_w * scale)), max(height, round(orig_h * scale))
    if (new_w, new_h) != (orig_w, orig_h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    if crop == "random" and rng is not None:
        top, left = int(rng.integers(0, new_h - height + 1)), int(rng.integers(0, new_w - width + 1))
    else:
        top, left = (new_h - height) // 2, (new_w - width) // 2
    if (new_w, new_h) != (width, height):
        img = img.crop((left, top, left + width, top + height))
    return img, CropMeta(orig_h, orig_w, top, left, new_w - width - left, height, width)


def pixels_chw(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def to_model_input(pixels: Any) -> Any:
    """uint8 [..., 3, H, W] -> float in [-1, 1] (torch or numpy, dtype float32)."""
    return pixels.float() / 127.5 - 1.0 if hasattr(pixels, "float") else pixels.astype(np.float32) / 127.5 - 1.0


Planner = Callable[[str, int, int], tuple[int, int, str, "np.random.Generator | None"]]


def square_planner(spec: PreprocessSpec) -> Planner:
    def plan(key: str, height: int, width: int) -> tuple[int, int, str, None]:
        return spec.resolution, spec.resolution, "center", None

    return plan


def preprocess_image(
    data: bytes | None, spec: PreprocessSpec, *, key: str = "", planner: Planner | None = None
) -> tuple[np.ndarray, CropMeta]:
    if spec.jpeg_draft:
        return preprocess_drafted(data, spec, key=key, planner=planner or square_planner(spec))
    img = decode_image(data, max_pixels=spec.max_pixels)
    img = to_rgb(img)
    if spec.min_size and min(img.size) < spec.min_size:
        raise ImageError(f"image is {img.width}x{img.height}, smaller than --min-size {spec.min_size}")
    height, width, crop, rng = (planner or square_planner(spec))(key, img.height, img.width)
    img, meta = resize_and_crop(img, height, width, crop=crop, rng=rng)
    return pixels_chw(img), meta


def preprocess_batch(table: pa.Table, spec: PreprocessSpec, planner: Planner | None = None) -> pa.Table:
    """raw rows -> pixel rows; an undecodable image becomes an error row, never an exception."""
    n = table.num_rows
    out: dict[str, list] = {name: [None] * n for name in ("pixels", "height", "width", *(name for name, _ in CROP))}
    errors = table.column("error").to_pylist()
    keys, images = table.column("key").to_pylist(), table.column("image")
    for i in range(n):
        if keys[i] is None or errors[i] is not None:
            continue
        try:
            pixels, meta = preprocess_image(images[i].as_py(), spec, key=keys[i], planner=planner)
        except ImageError as exc:
            errors[i] = str(exc)
            continue
        out["pixels"][i] = pixels.tobytes()
        out["height"][i], out["width"][i] = pixels.shape[1], pixels.shape[2]
        for name, _ in CROP:
            out[name][i] = getattr(meta, name)
    return carry(table, PIXEL_SCHEMA, {**out, "error": errors})


def pixels_of(table: pa.Table, i: int) -> np.ndarray:
    """Row i's uint8 pixels [3, H, W] (a view of the Arrow buffer, no copy)."""
    height, width = table.column("height")[i].as_py(), table.column("width")[i].as_py()
    return np.frombuffer(table.column("pixels")[i].as_buffer(), dtype=np.uint8).reshape(3, height, width)


# ---- JPEG DCT-domain decoding (--jpeg-draft) --------------------------------------------------


ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


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
