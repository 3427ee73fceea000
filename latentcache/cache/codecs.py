"""Stored dtypes: one registry. A codec turns float32 latents into stored codes plus parameter
arrays and back, without torch.

Every codec has the same interface: `encode(x[N, C, ...] float32) -> (codes, params)` where params
maps a name to a float32 array [N, C] (per row, per channel), and `decode(codes, params) -> float32`.
The formats store the params beside the codes generically (a column / tensor named
`<tensor>.<param>`). `describe()` (written into every part and the manifest) gives the formula, so
a reader in any language can dequantise; `error_bound(x)` is the documented per-element bound on
|decode(encode(x)) - x| that the tests hold every reader to.

The float casts (fp32, fp16, bf16) are done by the encoder (torch) and arrive as codes; the 8-bit
codecs need the float32 values of a whole row, so the encoder sends float32 (`sent_as`) and the
writer quantises. numpy's bfloat16 and float8 come from `ml_dtypes` (the dtypes JAX uses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

Params = dict[str, np.ndarray]
BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)  # e4m3, finite-only ("fn"): max 448, no inf, one NaN pattern
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)


def bf16_encode(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch's `.to(bfloat16)`."""
    return np.asarray(x, dtype=np.float32).astype(BF16).view(np.uint16)


def bf16_decode(codes: np.ndarray) -> np.ndarray:
    return np.asarray(codes).view(np.uint16).view(BF16).astype(np.float32)


def per_channel(x: np.ndarray) -> np.ndarray:
    """[N, C, ...] -> [N, C, M]: the values a per-row, per-channel parameter covers."""
    x = np.asarray(x, dtype=np.float32)
    return x.reshape(*x.shape[:2], -1)


def spread(param: np.ndarray, ndim: int) -> np.ndarray:
    """[N, C] -> [N, C, 1, ...] to broadcast against codes of `ndim` dimensions."""
    return np.asarray(param, dtype=np.float32).reshape(*param.shape, *(1,) * (ndim - 2))


@dataclass(frozen=True, kw_only=True)
class Codec:
    name: str
    code_dtype: np.dtype  # what the codes are held in (bf16: its 16-bit pattern as uint16; fp8: uint8)
    safetensors_dtype: str  # the dtype tag a safetensors file records for the codes
    formula: str  # how a reader gets float32 values back (written into the manifest)
    bound: str  # the error bound `error_bound` computes, in words (written into the manifest)
    array_dtype: np.dtype  # the dtype `Cache.read` hands out (a numpy dtype a reader can use directly)
    params: tuple[str, ...] = ()  # names of the per-row, per-channel parameter arrays
    sent_as: str = ""  # the codec whose codes the encoder sends (empty: this one's)

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, Params]:
        raise NotImplementedError

    def decode(self, codes: np.ndarray, params: Params | None = None) -> np.ndarray:
        raise NotImplementedError

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        """Per element of float32 `x` [N, C, ...]: the most |decode(encode(x)) - x| can be."""
        raise NotImplementedError

    def store(self, sent: np.ndarray) -> tuple[np.ndarray, Params]:
        """Rows as the encoder sent them -> (codes, params) as stored."""
        return (sent, {}) if self.sender is self else self.encode(sent.astype(np.float32))

    @property
    def sender(self) -> Codec:
        return codec(self.sent_as) if self.sent_as else self

    def as_array(self, codes: np.ndarray, params: Params | None = None) -> np.ndarray:
        """Stored values as a plain numpy array: the codes themselves when numpy has the dtype."""
        return codes if self.array_dtype == self.code_dtype else self.decode(codes, params).astype(self.array_dtype)

    def from_bytes(self, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """One row as the encoder sends it (raw codes of `sender`)."""
        return np.frombuffer(data, dtype=self.sender.code_dtype).reshape(shape)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "codes": np.dtype(self.code_dtype).name,
            "params": list(self.params),
            "decode": self.formula,
            "error_bound": self.bound,
        }


@dataclass(frozen=True, kw_only=True)
class CastCodec(Codec):
    """A float cast with no parameters: |error| <= relative * |x| + absolute (round to nearest even)."""

    to_float: Callable[[np.ndarray], np.ndarray]
    from_float: Callable[[np.ndarray], np.ndarray]
    relative: float = 0.0
    absolute: float = 0.0

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, Params]:
        return self.from_float(np.asarray(x, np.float32)), {}

    def decode(self, codes: np.ndarray, params: Params | None = None) -> np.ndarray:
        return self.to_float(codes).astype(np.float32, copy=False)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        return self.relative * np.abs(np.asarray(x, np.float32)) + self.absolute


@dataclass(frozen=True, kw_only=True)
class Int8Codec(Codec):
    """Affine int8 per row and channel: the channel's [min, max] spread over the 256 codes.

    Affine rather than symmetric (scale = max|x| / 127): measured on photographs through SD-style
    VAEs the channels are not centred on zero, and the affine step is the smaller (see docs)."""

    def params_of(self, x: np.ndarray) -> Params:
        lo, hi = per_channel(x).min(axis=-1), per_channel(x).max(axis=-1)
        scale = ((hi.astype(np.float64) - lo) / 255.0).astype(np.float32)
        return {"scale": scale, "offset": (lo + np.float32(128) * scale).astype(np.float32)}

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, Params]:
        x = np.asarray(x, np.float32)
        params = self.params_of(x)
        scale, offset = (spread(params[n], x.ndim).astype(np.float64) for n in ("scale", "offset"))
        steps = (x - offset) / np.where(scale > 0, scale, 1.0)  # a constant channel: scale 0, code 0 -> offset
        return np.clip(np.rint(steps), -128, 127).astype(np.int8), params

    def decode(self, codes: np.ndarray, params: Params | None = None) -> np.ndarray:
        scale, offset = (spread(params[n], codes.ndim) for n in ("scale", "offset"))
        return codes.astype(np.float32) * scale + offset

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        lo, hi = per_channel(x).min(axis=-1), per_channel(x).max(axis=-1)
        rounding = np.maximum(np.abs(lo), np.abs(hi)) * 2.0**-22  # float32 arithmetic of the decode
        return np.broadcast_to(spread((hi - lo) / 510.0 + rounding, np.ndim(x)), np.shape(x))


@dataclass(frozen=True, kw_only=True)
class Fp8Codec(Codec):
    """float8 e4m3 per row and channel: the channel's max |x| scaled to 448, the largest e4m3 value."""

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, Params]:
        x = np.asarray(x, np.float32)
        scale = (np.abs(per_channel(x)).max(axis=-1) / np.float32(FP8_MAX)).astype(np.float32)
        scaled = x / np.where(spread(scale, x.ndim) > 0, spread(scale, x.ndim), np.float32(1))
        return np.clip(scaled, -FP8_MAX, FP8_MAX).astype(FP8).view(np.uint8), {"scale": scale}

    def decode(self, codes: np.ndarray, params: Params | None = None) -> np.ndarray:
        return np.asarray(codes).view(np.uint8).view(FP8).astype(np.float32) * spread(params["scale"], codes.ndim)

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        """3 mantissa bits: half a step is <= 2^-4 |x|; below 2^-6 * scale (subnormal), 2^-10 * scale."""
        scale = np.abs(per_channel(x)).max(axis=-1) / FP8_MAX
        x = np.asarray(x, np.float32)
        return 2.0**-4 * np.abs(x) * (1 + 2.0**-20) + spread(scale, x.ndim) * 2.0**-10


F32, F16 = np.dtype(np.float32), np.dtype(np.float16)
CODECS: dict[str, Codec] = {
    "fp32": CastCodec(
        name="fp32",
        code_dtype=F32,
        safetensors_dtype="F32",
        formula="x = codes (IEEE float32)",
        bound="0 (exact)",
        to_float=lambda c: c,
        from_float=lambda x: x.astype(np.float32),
        array_dtype=F32,
    ),
    "fp16": CastCodec(
        name="fp16",
        code_dtype=F16,
        safetensors_dtype="F16",
        formula="x = float32(codes) (IEEE float16)",
        bound="2^-11 |x| + 2^-25",
        to_float=lambda c: c.astype(np.float32),
        from_float=lambda x: x.astype(np.float16),
        array_dtype=F16,
        relative=2.0**-11,
        absolute=2.0**-25,
    ),
    "bf16": CastCodec(
        name="bf16",
        code_dtype=np.dtype(np.uint16),
        safetensors_dtype="BF16",
        formula="x = bitcast<float32>(uint32(codes) << 16) (bfloat16)",
        bound="2^-8 |x|",
        to_float=bf16_decode,
        from_float=bf16_encode,
        array_dtype=F32,
        relative=2.0**-8,
        absolute=2.0**-134,
    ),
    "int8": Int8Codec(
        name="int8",
        code_dtype=np.dtype(np.int8),
        safetensors_dtype="I8",
        array_dtype=F32,
        params=("scale", "offset"),
        sent_as="fp32",
        formula="x[n, c, ...] = float32(codes[n, c, ...]) * scale[n, c] + offset[n, c] "
        "(codes int8; scale, offset float32 per row n and channel c; float32 arithmetic)",
        bound="scale[n, c] / 2 (scale = (max - min) / 255 of the row's channel)",
    ),
    "fp8": Fp8Codec(
        name="fp8",
        code_dtype=np.dtype(np.uint8),
        safetensors_dtype="F8_E4M3",
        array_dtype=F32,
        params=("scale",),
        sent_as="fp32",
        formula="x[n, c, ...] = float32(bitcast<float8_e4m3fn>(codes[n, c, ...])) * scale[n, c] "
        "(codes: uint8 bit patterns of OCP float8 e4m3fn; scale float32 per row n and channel c)",
        bound="2^-4 |x| + 2^-10 scale[n, c] (scale = max |x| / 448 of the row's channel)",
    ),
}


def codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown stored dtype {name!r}; known: {', '.join(CODECS)}") from None
