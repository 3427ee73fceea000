"""The one meaning of `--tiling auto`, for encoding and decoding alike.

Tile when the image (the encoder's input, or the decoder's output) has more pixels than the
threshold; then use exact bands when the model supports them. Below the threshold, or when exact
bands are not available, the caller's fallback applies: the encoder stores latents, so it keeps
the plain pass (diffusers' tiles would change them); the audit's decoder only scores images, so it
may take diffusers' tiles to bound memory.
"""

from __future__ import annotations

DEFAULT_TILE_THRESHOLD = 1 << 20  # pixels: 1024x1024


def auto_mode(pixels: int, *, threshold: int, exact_supported: bool, approximate_ok: bool = False) -> str:
    """ "none", "exact" or "diffusers" for an image of `pixels` pixels under --tiling auto."""
    if pixels <= threshold:
        return "none"
    if exact_supported:
        return "exact"
    return "diffusers" if approximate_ok else "none"
