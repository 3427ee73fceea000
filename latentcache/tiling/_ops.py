"""Banded execution of the pieces a diffusers VAE is made of: conv, GroupNorm + activation,
residual add and single-block self-attention. Width is never split: every band is full rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._stats import group_scale_shift
from ._store import DenseStore, FeatureMap, MapShape, allocate_store

# Rewrites a conv's output band [B, C, o1 - o0, W] (residual add, rescale) before it is stored.
Epilogue = Callable[[torch.Tensor, int, int], torch.Tensor]


@dataclass
class BandContext:
    """Settings shared by every op of one exact encode/decode."""

    device: torch.device
    dtype: torch.dtype
    band_bytes: int
    band_rows: int | None
    store: str

    def rows_per_band(self, bytes_per_row: float, budget: int | None = None) -> int:
        if self.band_rows is not None:
            return self.band_rows
        return max(1, int((budget or self.band_bytes) // max(1.0, bytes_per_row)))

    def new_map(self, shape: MapShape, final: bool = False) -> FeatureMap:
        if final:  # the result is handed back as an ordinary [B, C, H, W] device tensor
            dense = torch.empty(shape, dtype=self.dtype, device=self.device)
            return FeatureMap(DenseStore(dense, self.device), shape, track_stats=False, dense=dense)
        store = allocate_store(shape, self.dtype, self.device, self.store)
        return FeatureMap(store, shape, track_stats=True)

    def wrap_input(self, x: torch.Tensor) -> FeatureMap:
        shape = MapShape(*x.shape)
        return FeatureMap(DenseStore(x, self.device), shape, track_stats=False)


def bands(total: int, rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, rows):
        yield start, min(start + rows, total)


@dataclass(frozen=True)
class Prologue:
    """GroupNorm with global statistics, folded to a per (batch, channel) affine, then the activation."""

    scale: torch.Tensor  # [B, C, 1, 1], float32 at least
    shift: torch.Tensor
    act: nn.Module | None

    def __call__(self, band: torch.Tensor) -> torch.Tensor:
        # Affine in float32 and one rounding to the band dtype, like the native half-precision
        # GroupNorm kernels; the activation then sees the same input as in diffusers.
        out = torch.addcmul(self.shift, band, self.scale).to(band.dtype)
        return out if self.act is None else self.act(out)


def norm_prologue(ctx: BandContext, norm: nn.GroupNorm, act: nn.Module | None, x: FeatureMap) -> Prologue:
    scale, shift = group_scale_shift(x.stats, norm)
    return Prologue(_per_channel(ctx, scale), _per_channel(ctx, shift), act)


def _per_channel(ctx: BandContext, t: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(ctx.dtype, torch.float32)
    return t.to(device=ctx.device, dtype=dtype)[:, :, None, None]


@dataclass(frozen=True)
class RowGeometry:
    """How output rows of a conv map to rows of its input (after any upsampling)."""

    kernel: int
    stride: int
    dilation: int
    pad_top: int
    pad_bottom: int
    in_rows: int

    @property
    def out_rows(self) -> int:
        span = self.in_rows + self.pad_top + self.pad_bottom - self.dilation * (self.kernel - 1) - 1
        return span // self.stride + 1

    def input_span(self, o0: int, o1: int) -> tuple[int, int]:
        """Input rows [a, b) that output rows [o0, o1) read; they may stick out of the map."""
        a = o0 * self.stride - self.pad_top
        return a, (o1 - 1) * self.stride + self.dilation * (self.kernel - 1) + 1 - self.pad_top


@dataclass(frozen=True)
class ConvSpec:
    """A zero-padded nn.Conv2d, optionally after nearest x2 upsampling (Upsample2D) or with one
    extra zero row/column at the bottom/right (Downsample2D with padding=0)."""

    conv: nn.Conv2d
    upsample: bool = False
    pad_after: int = 0

    def geometry(self, in_rows: int) -> RowGeometry:
        c = self.conv
        rows = in_rows * 2 if self.upsample else in_rows
        pad = c.padding[0]
        return RowGeometry(c.kernel_size[0], c.stride[0], c.dilation[0], pad, pad + self.pad_after, rows)

    def out_shape(self, src: MapShape) -> MapShape:
        c = self.conv
        width = src.width * 2 if self.upsample else src.width
        span = width + 2 * c.padding[1] + self.pad_after - c.dilation[1] * (c.kernel_size[1] - 1) - 1
        out_rows = self.geometry(src.height).out_rows
        return MapShape(src.batch, c.out_channels, out_rows, span // c.stride[1] + 1)


def run_conv(
    ctx: BandContext,
    src: FeatureMap,
    spec: ConvSpec,
    prologue: Prologue | None = None,
    epilogue: Epilogue | None = None,
    final: bool = False,
) -> FeatureMap:
    geo = spec.geometry(src.shape.height)
    out = ctx.new_map(spec.out_shape(src.shape), final)
    rows = ctx.rows_per_band(_conv_row_bytes(ctx, src.shape, spec, out.shape))
    for o0, o1 in bands(out.shape.height, rows):
        band = _conv_band(src, spec, geo, prologue, o0, o1)
        out.write(o0, band if epilogue is None else epilogue(band, o0, o1))
    return out


def _conv_row_bytes(ctx: BandContext, src: MapShape, spec: ConvSpec, out: MapShape) -> float:
    # Input: read + normalised + padded (+ upsampled) copies of `stride` virtual rows per output
    # row; output: conv result, skip band, sum and the float64 copy made for the statistics.
    factor = 2 if spec.upsample else 1
    virtual_row = src.row_bytes(ctx.dtype) * factor
    return 3 * spec.conv.stride[0] * virtual_row + 5 * out.row_bytes(ctx.dtype)


def _conv_band(
    src: FeatureMap, spec: ConvSpec, geo: RowGeometry, prologue: Prologue | None, o0: int, o1: int
) -> torch.Tensor:
    a, b = geo.input_span(o0, o1)
    lo, hi = max(a, 0), min(b, geo.in_rows)
    x = _read_virtual(src, spec.upsample, lo, hi, prologue)
    # Zeros go on the *activated* input, only where the band meets the true border, exactly
    # like the conv's own padding (and Downsample2D's F.pad) on the whole map.
    pads = (0, spec.pad_after, lo - a, b - hi)
    # Interior bands need no padding (F.pad would still copy), but CPU convs are several times
    # slower on a strided row slice than on a contiguous band.
    x = F.pad(x, pads) if any(pads) else x.contiguous()
    c = spec.conv
    return F.conv2d(x, c.weight, c.bias, c.stride, (0, c.padding[1]), c.dilation, c.groups)


def _read_virtual(src: FeatureMap, upsample: bool, lo: int, hi: int, prologue: Prologue | None) -> torch.Tensor:
    """Rows [lo, hi) of the conv input, i.e. of the nearest-x2 upsampled map when `upsample`."""
    if not upsample:
        x = src.read(lo, hi)
        return x if prologue is None else prologue(x)
    s0, s1 = lo // 2, (hi + 1) // 2
    x = src.read(s0, s1)
    x = x if prologue is None else prologue(x)
    x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x[:, :, lo - 2 * s0 : hi - 2 * s0]


def residual_epilogue(skip_src: FeatureMap, shortcut: nn.Conv2d | None, output_scale: float) -> Epilogue:
    """ResnetBlock2D's tail: (shortcut(input) + conv2_out) / output_scale_factor, per band."""

    def apply(band: torch.Tensor, o0: int, o1: int) -> torch.Tensor:
        skip = skip_src.read(o0, o1)
        if shortcut is not None:  # 1x1, stride 1: pointwise, so it runs on the band as is
            skip = shortcut(skip.contiguous())  # row slices are strided; CPU convs crawl on those
        out = skip + band
        return out if output_scale == 1.0 else out / output_scale  # x / 1.0 == x: save a pass

    return apply


@dataclass(frozen=True)
class AttnSpec:
    """The parts of a diffusers Attention (AttnProcessor/AttnProcessor2_0, self-attention) we replay."""

    norm: nn.GroupNorm | None
    to_q: nn.Linear
    to_k: nn.Linear
    to_v: nn.Linear
    to_out: nn.Linear
    heads: int
    scale: float | None  # None: SDPA's default 1/sqrt(head_dim), as AttnProcessor2_0 uses
    residual: bool
    rescale: float


def run_attention(ctx: BandContext, x: FeatureMap, spec: AttnSpec, final: bool = False) -> FeatureMap:
    prologue = None if spec.norm is None else norm_prologue(ctx, spec.norm, None, x)
    key, value = _project_kv(ctx, x, spec, prologue)
    out = ctx.new_map(x.shape, final)
    kv_bytes = 2 * key.numel() * key.element_size()
    # A band's score matrix (if the SDPA backend materialises it) is allowed as much memory as
    # K and V themselves: that keeps the peak at a small multiple of K/V at any image size.
    per_row = x.shape.row_bytes(ctx.dtype) * 5 + x.shape.batch * x.shape.width * spec.heads * key.shape[2] * 4
    rows = ctx.rows_per_band(per_row, max(ctx.band_bytes, kv_bytes))
    for r0, r1 in bands(x.shape.height, rows):
        out.write(r0, _attend_band(x, spec, prologue, key, value, r0, r1))
    return out


def _tokens(band: torch.Tensor) -> torch.Tensor:
    return band.flatten(2).transpose(1, 2)  # [B, C, h, W] -> [B, h*W, C]


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)  # -> [B, heads, n, head_dim]


def _project_kv(
    ctx: BandContext, x: FeatureMap, spec: AttnSpec, prologue: Prologue | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V for every token, filled band by band: every query band attends to all of them."""
    b, _, h, w = x.shape
    inner = spec.to_k.out_features
    kv_shape = (b, spec.heads, h * w, inner // spec.heads)
    key = torch.empty(kv_shape, dtype=ctx.dtype, device=ctx.device)
    value = torch.empty(kv_shape, dtype=ctx.dtype, device=ctx.device)
    for r0, r1 in bands(h, ctx.rows_per_band(x.shape.row_bytes(ctx.dtype) * 4)):
        band = x.read(r0, r1)
        tokens = _tokens(band if prologue is None else prologue(band))
        key[:, :, r0 * w : r1 * w] = _split_heads(spec.to_k(tokens), spec.heads)
        value[:, :, r0 * w : r1 * w] = _split_heads(spec.to_v(tokens), spec.heads)
    return key, value


def _attend_band(
    x: FeatureMap,
    spec: AttnSpec,
    prologue: Prologue | None,
    key: torch.Tensor,
    value: torch.Tensor,
    r0: int,
    r1: int,
) -> torch.Tensor:
    residual = x.read(r0, r1)
    b, c, h, w = residual.shape
    tokens = _tokens(residual if prologue is None else prologue(residual))
    query = _split_heads(spec.to_q(tokens), spec.heads)
    out = F.scaled_dot_product_attention(query, key, value, scale=spec.scale)
    out = spec.to_out(out.transpose(1, 2).reshape(b, h * w, -1))  # to_out[1] is a no-op dropout
    out = out.transpose(1, 2).reshape(b, c, h, w)
    if spec.residual:
        out = out + residual
    return out if spec.rescale == 1.0 else out / spec.rescale
