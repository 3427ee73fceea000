"""Stored dtypes: one registry. A codec turns float32 latents into stored codes plus parameter
arrays and back, without torch.

Every codec has the same interface so that an 8-bit codec (per-row, per-channel scale/offset) is
one more entry: `encode(x[N, C, ...] float32) -> (codes, params)` where params maps a name to a
float32 array [N, C], and `decode(codes, params) -> float32`. The formats store the params beside
the codes generically (a column / tensor named `<tensor>.<param>`), so they need no change then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

Params = dict[str, np.ndarray]


def bf16_encode(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch's `.to(bfloat16)`."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def bf16_decode(codes: np.ndarray) -> np.ndarray:
    """A bfloat16 is the top half of the float32 with the same bits."""
    return (np.asarray(codes).view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


@dataclass(frozen=True)
class Codec:
    name: str
    code_dtype: np.dtype  # what the codes are held in (bf16: its 16-bit pattern as uint16)
    safetensors_dtype: str  # the dtype tag a safetensors file records for the codes
    formula: str  # how a reader gets float32 values back (written into the manifest)
    to_float: Callable[[np.ndarray], np.ndarray]
    from_float: Callable[[np.ndarray], np.ndarray]
    array_dtype: np.dtype  # the dtype `Cache.read` hands out (a numpy dtype a reader can use directly)
    params: tuple[str, ...] = ()  # names of the per-row, per-channel parameter arrays

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, Params]:
        return self.from_float(np.asarray(x, np.float32)), {}

    def decode(self, codes: np.ndarray, params: Params | None = None) -> np.ndarray:
        return self.to_float(codes).astype(np.float32, copy=False)

    def as_array(self, codes: np.ndarray, params: Params | None = None) -> np.ndarray:
        """Stored values as a plain numpy array: the codes themselves when numpy has the dtype."""
        return codes if self.array_dtype == self.code_dtype else self.decode(codes, params).astype(self.array_dtype)

    def from_bytes(self, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """One row as the encoder sends it (raw codes in `code_dtype`)."""
        return np.frombuffer(data, dtype=self.code_dtype).reshape(shape)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "codes": np.dtype(self.code_dtype).name, "params": list(self.params),
                "decode": self.formula}


CODECS: dict[str, Codec] = {
    "fp32": Codec("fp32", np.dtype(np.float32), "F32", "x = codes (IEEE float32)",
                  lambda c: c, lambda x: x.astype(np.float32), np.dtype(np.float32)),
    "fp16": Codec("fp16", np.dtype(np.float16), "F16", "x = float32(codes) (IEEE float16)",
                  lambda c: c.astype(np.float32), lambda x: x.astype(np.float16), np.dtype(np.float16)),
    "bf16": Codec("bf16", np.dtype(np.uint16), "BF16", "x = bitcast<float32>(uint32(codes) << 16) (bfloat16)",
                  bf16_decode, bf16_encode, np.dtype(np.float32)),
}


def codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown stored dtype {name!r}; known: {', '.join(CODECS)}") from None
