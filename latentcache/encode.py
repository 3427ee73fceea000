"""Pixel rows -> latent rows: the callable class that `map_batches` runs in each encoder actor.

The VAE is loaded once per actor. A batch is split by image shape so the model only ever sees
one shape at a time (aspect buckets rely on this). Latents come out in the stored, model-ready
space of the run's `LatentSpace`; `--posterior sample` draws noise from a generator seeded per
key, so a key's sample never depends on batch size, concurrency or order.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from .cache.codecs import codec
from .fastpath import use_channels_last
from .latent_space import LatentSpace
from .models import (
    TORCH_DTYPES,
    Encoded,
    ModelSpec,
    compute_dtype,
    enable_tiling,
    latent_space_for,
    load_vae,
    model_device,
)
from .preprocess import to_model_input
from .rows import ENCODED_SCHEMA, TENSOR_COLUMNS, binary_rows, carry, good_mask, scatter_rows, stack_binary
from .seeding import per_key_noise as per_key_noise  # re-exported: callers import it from here too
from .seeding import posterior_sample
from .sinks import NONFINITE_REASON
from .tiling import exact_encode_moments, exact_tiling_support
from .tiling.rule import auto_mode

log = logging.getLogger(__name__)
FLIP_SUFFIX = "#flip"  # the flipped crop's noise key: differs from the key's, and is just as stable


@dataclass(frozen=True, kw_only=True)
class EncodeSpec:
    posterior: str = "mode"
    seed: int = 0
    dtype: str = "fp32"
    no_upcast: bool = False
    store_dtype: str = "fp16"
    store_posterior: bool = False
    vq_output: str = "latent"
    flip: str = "none"
    slicing: bool = False
    tiling: str = "auto"
    tile_threshold: int = 1 << 20
    band_mb: float = 64.0
    tile_size: int = 512
    tile_overlap: float = 0.25
    channels_last: bool = False
    no_channels_last: bool = False  # channels_last is the CPU default (fastpath.use_channels_last)
    compile: bool = False
    threads: int | None = None
    scaling_factor: float | None = None
    shift_factor: float | None = None
    latents_mean: list | None = None
    latents_std: list | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> EncodeSpec:
        names = cls.__dataclass_fields__.keys() - {"threads"}
        return cls(threads=cfg.encoder_threads, **{n: getattr(cfg, n) for n in names})


def store_array(x: torch.Tensor, store_dtype: str) -> np.ndarray:
    """[B, ...] in the storage dtype (bf16 as its raw 16-bit pattern), as one contiguous array."""
    x = x.to(TORCH_DTYPES.get(store_dtype, x.dtype)).cpu().contiguous()
    return x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.numpy()


def codes_dtype(num_codes: int) -> torch.dtype:
    return torch.int16 if num_codes <= 32768 else torch.int32


class LatentEncoder:
    """The `map_batches` callable: one VAE per actor, pixels in, stored latents out."""

    def __init__(self, *, model: ModelSpec, spec: EncodeSpec) -> None:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.device = model_device()
        vae, self.family = load_vae(model)
        self.channels_last = use_channels_last(spec, self.device, vae)
        self.space: LatentSpace = latent_space_for(vae, spec, self.family)
        self.compute_dtype = self._compute_dtype(vae)
        self.vae = self._prepare(vae).to(self.device, self.compute_dtype)
        self._fp32_vae: Any = None if self.compute_dtype == torch.float32 else vae
        self.exact = self._exact_tiling_available(vae)

    def _exact_tiling_available(self, vae: Any) -> bool:
        if self.spec.tiling not in ("auto", "exact") or not self.family.exact_tiling:
            return False
        supported, reason = exact_tiling_support(vae, "encoder")
        if not supported:
            log.warning("exact tiling falls back to the normal encode path: %s", reason)
        return supported

    def _encode_fn(self, x: torch.Tensor) -> Callable[[Any, torch.Tensor], Encoded]:
        """Exact band-by-band encoding when asked, or (auto) when the image is over the threshold."""
        mode = self.spec.tiling
        if mode == "auto":
            mode = auto_mode(x.shape[-2] * x.shape[-1], threshold=self.spec.tile_threshold, exact_supported=self.exact)
        return self._encode_exact if self.exact and mode == "exact" else self.family.encode

    def _encode_exact(self, vae: Any, x: torch.Tensor) -> Encoded:
        """Exact-tiling families are KL VAEs: the moments are the same posterior as vae.encode's."""
        dist = DiagonalGaussianDistribution(exact_encode_moments(vae, x, band_mb=self.spec.band_mb))
        return Encoded(mean=dist.mean, std=dist.std)

    def _compute_dtype(self, vae: Any) -> torch.dtype:
        dtype = compute_dtype(vae.config, self.spec.dtype, self.spec.no_upcast)
        if dtype != TORCH_DTYPES[self.spec.dtype]:
            log.info("model config sets force_upcast: encoding in fp32 (pass --no-upcast to force fp16)")
        return dtype

    def _prepare(self, vae: Any) -> Any:
        if self.spec.tiling == "diffusers":  # on the original too, so that an fp32 re-run tiles the same way
            enable_tiling(vae, self.family, tile_size=self.spec.tile_size, overlap=self.spec.tile_overlap)
        vae = copy.deepcopy(vae) if self.compute_dtype != torch.float32 else vae
        if self.channels_last:
            vae = vae.to(memory_format=torch.channels_last)
        if self.spec.compile:
            vae.encoder = torch.compile(vae.encoder)
        return vae

    @torch.inference_mode()
    def encode_pixels(self, x: torch.Tensor, vae: Any = None) -> Encoded:
        """uint8 [B, 3, H, W] on any device -> raw posterior in float32."""
        vae = vae if vae is not None else self.vae
        dtype = next(vae.parameters()).dtype
        x = to_model_input(x.to(self.device, non_blocking=True)).to(dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        chunks = x.split(1) if self.spec.slicing else (x,)
        encode = self._encode_fn(x)
        parts = [encode(vae, chunk) for chunk in chunks]
        return Encoded(
            *(
                None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts]).float()
                for f in ("mean", "std", "codes")
            )
        )

    def _encode_with_fallback(self, x: torch.Tensor) -> tuple[Encoded, np.ndarray]:
        """Re-runs a batch in fp32 when reduced precision gave NaN/Inf; returns which rows fell back."""
        encoded = self.encode_pixels(x)
        finite = rows_finite([t for t in (encoded.mean, encoded.std) if t is not None], len(x))
        if all(finite) or self._fp32_vae is None:
            return encoded, np.zeros(len(x), dtype=bool)
        log.warning(
            "non-finite latents in %s for %d row(s): re-running the batch in fp32",
            self.compute_dtype,
            finite.count(False),
        )
        self._fp32_vae = self._fp32_vae.to(self.device, torch.float32)
        return self.encode_pixels(x, self._fp32_vae), np.ones(len(x), dtype=bool)

    def latents(self, encoded: Encoded, keys: list[str]) -> dict[str, torch.Tensor]:
        """Stored-space tensors for one same-shape group."""
        z = encoded.mean
        if self.spec.posterior == "sample" and encoded.std is not None:
            z = posterior_sample(encoded.mean, encoded.std, keys, self.spec.seed)
        out = {"latent": self.space.to_model(z)} if self.spec.vq_output != "codes" or encoded.codes is None else {}
        if self.spec.store_posterior and encoded.std is not None:
            out["posterior_mean"] = self.space.to_model(encoded.mean)
            out["posterior_std"] = self.space.std_to_model(encoded.std)
        if encoded.codes is not None and self.spec.vq_output in ("codes", "both"):
            out["codes"] = encoded.codes.to(codes_dtype(self.vae.config.num_vq_embeddings))
        return out

    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        cols: dict[str, list] = {name: [] for name in (*TENSOR_COLUMNS, "latent_shape", "store_dtype", "fallback")}
        errors = table.column("error").to_pylist()
        keys = table.column("key").to_pylist()
        for rows in group_by_shape(table):
            shape = (3, table.column("height")[rows[0]].as_py(), table.column("width")[rows[0]].as_py())
            x = torch.from_numpy(stack_binary(table.column("pixels"), np.asarray(rows), shape))
            if self.device.type == "cuda":
                x = x.pin_memory()
            tensors, fell_back = self._group_tensors(x, [keys[i] for i in rows])
            self._fill(cols, errors, rows, tensors, fell_back)
        return carry(table, ENCODED_SCHEMA, {**assemble(cols, n), "error": errors})

    def _group_tensors(self, x: torch.Tensor, keys: list[str]) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """One same-shape group -> stored tensors. With --flip both the mirrored crops ride in the
        same forward pass (one VAE call of 2B rows) and draw their sample noise from key + FLIP_SUFFIX."""
        if self.spec.flip != "both":
            encoded, fell_back = self._encode_with_fallback(x)
            return self.latents(encoded, keys), fell_back
        n = len(x)
        encoded, fell_back = self._encode_with_fallback(torch.cat([x, x.flip(-1)]))
        tensors = self.latents(rows_of(encoded, slice(0, n)), keys)
        flipped = self.latents(rows_of(encoded, slice(n, None)), [k + FLIP_SUFFIX for k in keys])
        if "latent" in flipped:
            tensors["latent_flipped"] = flipped["latent"]
        return tensors, fell_back[:n] | fell_back[n:]

    def _fill(
        self,
        cols: dict[str, list],
        errors: list,
        rows: list[int],
        tensors: dict[str, torch.Tensor],
        fell_back: np.ndarray,
    ) -> None:
        """Appends (rows, values) segments per column; rows whose latents are not finite become errors."""
        floats = [t for t in tensors.values() if t.is_floating_point()]
        finite = np.array(rows_finite(floats, len(rows)), dtype=bool)
        sent = codec(self.spec.store_dtype).sender.name  # int8/fp8: float32 rows, the cache writer quantises
        storable = np.array(rows_finite([t.to(TORCH_DTYPES[sent]) for t in floats], len(rows)), dtype=bool)
        for j in np.flatnonzero(~(finite & storable)):
            errors[rows[j]] = (
                f"{NONFINITE_REASON} (NaN/Inf), also in fp32"
                if not finite[j]
                else f"latent overflows --store-dtype {self.spec.store_dtype}"
            )
        ok = finite & storable
        good = np.asarray(rows, dtype=np.int64)[ok]
        for name, t in tensors.items():
            stored = store_array(t, sent if t.is_floating_point() else "")
            cols[name].append((good, binary_rows(stored[ok])))
        shape = list(tensors["latent"].shape[1:]) if "latent" in tensors else [1, *tensors["codes"].shape[1:]]
        cols["latent_shape"].append((good, pa.array([shape] * len(good), pa.list_(pa.int32()))))
        cols["store_dtype"].append((good, pa.array([self.spec.store_dtype] * len(good), pa.string())))
        cols["fallback"].append((good, pa.array(np.where(fell_back[ok], "fp32", None).tolist(), pa.string())))


def assemble(cols: dict[str, list[tuple[np.ndarray, pa.Array]]], n: int) -> dict[str, pa.Array]:
    """Per column, its groups' segments placed at their rows (null elsewhere); columns no group filled stay out."""
    out = {}
    for name, segments in cols.items():
        if segments:
            rows = np.concatenate([r for r, _ in segments])
            out[name] = scatter_rows(pa.concat_arrays([v for _, v in segments]), rows, n)
    return out


def rows_finite(tensors: list[torch.Tensor], n: int) -> list[bool]:
    """Per row: every value of every tensor is finite (integer codes always are)."""
    if not tensors:
        return [True] * n
    ok = torch.stack([torch.isfinite(t.float().flatten(1)).all(1) for t in tensors]).all(0)
    return ok.cpu().tolist()


def rows_of(encoded: Encoded, part: slice) -> Encoded:
    return Encoded(*(None if t is None else t[part] for t in (encoded.mean, encoded.std, encoded.codes)))


def group_by_shape(table: pa.Table) -> list[list[int]]:
    """Row indices of good rows, grouped by (height, width), in first-seen order."""
    good = np.flatnonzero(good_mask(table))
    heights, widths = table.column("height").to_pylist(), table.column("width").to_pylist()
    groups: dict[tuple[int, int], list[int]] = {}
    for i in good:
        groups.setdefault((heights[i], widths[i]), []).append(int(i))
    return list(groups.values())
