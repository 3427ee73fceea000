"""The cache as a `ray.data.Dataset` for Ray Train; Ray is imported only when it is used."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pyarrow.fs import FSSpecHandler, PyFileSystem

from .. import storage
from ..cache.codecs import codec
from ..latent_space import LatentSpace
from ..reader import Cache, CacheError, CacheFile
from ..rows import TENSOR_COLUMNS
from ..sinks import column_to_numpy
from .spec import LatentSpec, open_cache

if TYPE_CHECKING:
    import ray.data


def ray_dataset(
    cache: Cache | str,
    *,
    resample: bool = False,
    seed: int = 0,
    epoch: int = 0,
    space: str = "model",
    latent_shape: Sequence[int] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ray.data.Dataset:
    """The cache as a `ray.data.Dataset` of {latent, key, caption, ...}, the same tensors as `LatentDataset`.

    Parquet files are read with `read_parquet`; the draw and the space are applied by a
    `map_batches`. Make one per epoch for resampling. A cache with several latent shapes needs
    one dataset per shape (`latent_shape=`), since a batch can hold only one.
    Iterate with `iter_torch_batches(collate_fn=torch_collate())`: keys and captions are strings.
    """
    import ray.data  # Ray only when the Ray path is used

    cache = open_cache(cache, storage_options)
    spec = LatentSpec(resample=resample, seed=seed, space=space)
    spec.check(cache)
    if cache.format != "parquet":
        raise CacheError(f"ray_dataset reads Parquet caches; {cache.root} is {cache.format}: use LatentDataset")
    files = [f for f in cache.files if latent_shape is None or f.latent_shape == tuple(latent_shape)]
    shapes = sorted({f.latent_shape for f in files})
    if len(shapes) != 1:
        raise CacheError(
            f"{cache.root} has latent shapes {shapes or 'none'}{' for that shape' if latent_shape else ''}: "
            f"pass latent_shape= one of {sorted({f.latent_shape for f in cache.files})}"
        )
    fs, _ = storage.url_to_fs(cache.root, cache.storage_options)
    paths = [storage.url_to_fs(cache.url(f.path), cache.storage_options)[1] for f in files]
    ds = ray.data.read_parquet(
        paths, filesystem=PyFileSystem(FSSpecHandler(fs)), columns=parquet_columns(cache, files[0], spec)
    )
    latents = RayLatents(spec=spec, space=cache.space, epoch=epoch, store_dtype=cache.manifest["store_dtype"])
    return ds.map_batches(latents, batch_format="pyarrow")


def parquet_columns(cache: Cache, file: CacheFile, spec: LatentSpec) -> list[str]:
    """The tensors the spec needs (with their codec params) plus every non-tensor column, as the torch path
    yields them."""
    fs, path = storage.url_to_fs(cache.url(file.path), cache.storage_options)
    with fs.open(path, "rb") as f:
        names = pq.read_schema(f).names
    params = [f"{name}.{p}" for name in spec.columns for p in codec(cache.manifest["store_dtype"]).params]
    return [n for n in names if not is_tensor_column(n)] + list(spec.columns) + params


def is_tensor_column(name: str) -> bool:
    """A tensor, or a codec parameter stored beside one (`<tensor>.<param>`)."""
    return name.split(".", 1)[0] in TENSOR_COLUMNS


@dataclass(frozen=True, kw_only=True)
class RayLatents:
    """The `map_batches` function of `ray_dataset`: stored columns -> the spec's latent."""

    spec: LatentSpec
    space: LatentSpace
    epoch: int
    store_dtype: str

    def __call__(self, table: Any) -> dict[str, np.ndarray]:
        tensors = {name: self.stored(table, name) for name in self.spec.columns}
        keys = table.column("key").to_pylist()
        out = {
            name: table.column(name).to_numpy(zero_copy_only=False)
            for name in table.column_names
            if not is_tensor_column(name) and name != "caption" and table.column(name).null_count < table.num_rows
        }
        if "caption" in table.column_names:
            out["caption"] = pc.fill_null(table.column("caption"), "").to_numpy(zero_copy_only=False)
        out["latent"] = self.spec.latents(tensors, keys, self.space, self.epoch)
        return out

    def stored(self, table: Any, name: str) -> np.ndarray:
        """A tensor column as `Cache.read` gives it: 8-bit codes dequantised through the codec."""
        store = codec(self.store_dtype)
        params = {p: column_to_numpy(table.column(f"{name}.{p}")) for p in store.params}
        return store.as_array(column_to_numpy(table.column(name)), params)


@functools.cache
def _torch_collate_class() -> type:
    from ray.data.collate_fn import NumpyBatchCollateFn  # Ray only when the Ray path is used

    class TorchCollate(NumpyBatchCollateFn):
        """Numeric columns become tensors, strings (key, caption) stay lists."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return {
                name: torch.tensor(values) if values.dtype.kind in "biuf" else values.tolist()
                for name, values in batch.items()
            }

        def __reduce__(self) -> tuple:
            return torch_collate, ()

    return TorchCollate


def torch_collate() -> Any:
    """The `collate_fn` for `iter_torch_batches` over a `ray_dataset`."""
    return _torch_collate_class()()
