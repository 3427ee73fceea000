"""The training side: a latent cache streamed into PyTorch (or Ray Data) as model-ready tensors.

- `LatentDataset` is an `IterableDataset` that streams cache files (Parquet or safetensors, local
  or object storage). Each epoch the file order is shuffled with (seed, epoch), identically on
  every rank; the concatenated rows are then cut into contiguous ranges, one per rank and within
  it one per DataLoader worker, so no row is read twice and each rank reads only its own files.
  A seeded buffer shuffles rows within a range.
- `LatentMapDataset` indexes a cache that fits local disk (or memory) for random access, and
  `BucketBatchSampler` batches it so that every batch has one latent shape.
- `resample=True` draws posterior_mean + posterior_std * eps with noise seeded per (key, epoch)
  by the same hash the encoder uses, so a key's draw never depends on workers, ranks or order.
- `space="raw"` undoes the cache's recorded convention; `decoder_config` says what a trainer
  must set on its VAE to decode.
- `ray_dataset` is the same reading as a `ray.data.Dataset` for Ray Train.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, default_collate, get_worker_info

from . import storage
from .encode import per_key_noise
from .latent_space import LatentSpace
from .reader import Cache, CacheError, CacheFile, LatentBlock
from .rows import TENSOR_COLUMNS

if TYPE_CHECKING:
    import ray.data

SPACES: dict[str, Callable[[LatentSpace, np.ndarray], np.ndarray]] = {
    "model": lambda space, z: z,  # as stored: what the diffusion model trains on
    "raw": lambda space, z: space.to_vae_input(z.astype(np.float64)).astype(np.float32),  # ready for vae.decode
}
POSTERIOR = ("posterior_mean", "posterior_std")


# ---- one definition of "the latent of a row", shared by the torch and Ray paths -------------


@dataclass(frozen=True, kw_only=True)
class LatentSpec:
    """What a reader hands the trainer: which draw, in which space."""

    resample: bool = False
    seed: int = 0
    space: str = "model"

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {self.space!r}")

    @property
    def columns(self) -> tuple[str, ...]:
        return POSTERIOR if self.resample else ("latent",)

    def check(self, cache: Cache) -> None:
        """A clear error up front, not a KeyError in a DataLoader worker."""
        if self.resample and not cache.has_posterior:
            raise CacheError(f"{cache.root} has no posterior: resample=True needs a cache encoded with --store-posterior "
                             f"(re-encode with it, or read with resample=False)")
        if not self.resample and cache.manifest.get("vq_output") == "codes":
            raise CacheError(f"{cache.root} stores VQ codebook indices only (--vq-output codes); there is no latent to read")

    def latents(self, tensors: dict[str, np.ndarray], keys: list[str], space: LatentSpace, epoch: int) -> np.ndarray:
        """float32 [N, C, h, w] for these rows."""
        if self.resample:
            mean, std = (tensors[name].astype(np.float32) for name in POSTERIOR)
            z = mean + std * epoch_noise(keys, mean.shape[1:], self.seed, epoch)
        else:
            z = tensors["latent"].astype(np.float32)
        return SPACES[self.space](space, z)


def epoch_noise(keys: list[str], shape: tuple[int, ...], seed: int, epoch: int) -> np.ndarray:
    """Standard normal noise per (seed, key, epoch), through the encoder's per-key generator."""
    return per_key_noise([f"{key}\0epoch={epoch}" for key in keys], tuple(shape), seed).numpy()


def open_cache(cache: Cache | str, storage_options: dict[str, Any] | None = None) -> Cache:
    return cache if isinstance(cache, Cache) else Cache(str(cache), storage_options=storage_options)


def decoder_config(cache: Cache | str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The VAE config values a trainer must set to decode this cache's latents (scaling_factor, ...)."""
    return open_cache(cache, storage_options).space.decoder_config()


def rows_of(block: LatentBlock, latents: np.ndarray, start: int = 0) -> Iterator[dict[str, Any]]:
    """Per-row dicts: the latent tensor plus every metadata field the file carries."""
    for i in range(len(latents)):
        # Fields a writer left empty (no buckets, no flip) are left out: default_collate cannot batch None.
        row = {name: values[start + i] for name, values in block.meta.items() if values[start + i] is not None}
        row["caption"] = row.get("caption") or ""
        row["latent"] = torch.from_numpy(latents[i])
        yield row


# ---- splitting an epoch across ranks and DataLoader workers ----------------------------------


def distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): as given, else from torch.distributed when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
        rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        world_size = world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return rank, world_size


def split_range(lo: int, hi: int, part: int, parts: int) -> tuple[int, int]:
    """Part `part` of `parts` contiguous pieces of [lo, hi); sizes differ by at most one."""
    n = hi - lo
    return lo + n * part // parts, lo + n * (part + 1) // parts


def row_slices(sizes: Sequence[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(position in `sizes`, start, stop) of the rows [lo, hi) of the concatenation of `sizes`."""
    slices, offset = [], 0
    for position, size in enumerate(sizes):
        start, stop = max(lo - offset, 0), min(hi - offset, size)
        if start < stop:
            slices.append((position, start, stop))
        offset += size
    return slices


def shuffled(items: Iterable[Any], buffer_size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A seeded shuffle buffer: memory for `buffer_size` rows, randomness across that window."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        yield buffer[i]
        buffer[i] = item
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


def bucket_batches(rows: Iterable[dict[str, Any]], batch_size: int, drop_last: bool = False) -> Iterator[dict[str, Any]]:
    """Collated batches from a row stream, each of one latent shape (one open batch per shape)."""
    open_batches: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for row in rows:
        batch = open_batches.setdefault(tuple(row["latent"].shape), [])
        batch.append(row)
        if len(batch) == batch_size:
            yield default_collate(open_batches.pop(tuple(row["latent"].shape)))
    if not drop_last:
        for batch in open_batches.values():
            yield default_collate(batch)


class LatentDataset(IterableDataset):
    """Streams a latent cache as dicts {latent, key, caption, original_*, crop_*, ...}.

    Every row is read exactly once per epoch across `world_size` ranks x DataLoader workers. With
    `even=True` each rank gets exactly rows // world_size rows (the few left over change with the
    epoch), so DDP ranks run the same number of steps. With `batch_size`, it yields collated
    batches of one latent shape each (use DataLoader(batch_size=None)).
    """

    def __init__(self, cache: Cache | str, *, resample: bool = False, seed: int = 0, epoch: int = 0,
                 space: str = "model", shuffle: bool = True, shuffle_buffer: int = 1024,
                 rank: int | None = None, world_size: int | None = None, even: bool = False,
                 batch_size: int | None = None, drop_last: bool = False,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.cache = open_cache(cache, storage_options)
        self.spec = LatentSpec(resample=resample, seed=seed, space=space)
        self.spec.check(self.cache)
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.files = self.cache.files
        self.rank, self.world_size = distributed(rank, world_size)
        self.epoch, self.seed, self.shuffle, self.shuffle_buffer = epoch, seed, shuffle, shuffle_buffer
        self.even, self.batch_size, self.drop_last = even, batch_size, drop_last

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch: it reshuffles and redraws (DataLoader workers copy it per epoch)."""
        self.epoch = epoch

    @property
    def num_rows(self) -> int:
        return sum(f.rows for f in self.files)

    def file_order(self) -> list[int]:
        """Seeded by (seed, epoch) only, so every rank and worker agrees on it."""
        order = np.arange(len(self.files))
        return (np.random.default_rng([self.seed, self.epoch]).permutation(order) if self.shuffle else order).tolist()

    def rank_range(self) -> tuple[int, int]:
        if self.even:
            per_rank = self.num_rows // self.world_size
            return self.rank * per_rank, (self.rank + 1) * per_rank
        return split_range(0, self.num_rows, self.rank, self.world_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = self.file_order()
        lo, hi = split_range(*self.rank_range(), worker, workers)
        rows: Iterable[dict[str, Any]] = self._rows(order, lo, hi)
        if self.shuffle:
            rows = shuffled(rows, self.shuffle_buffer, np.random.default_rng([self.seed, self.epoch, self.rank, worker]))
        yield from bucket_batches(rows, self.batch_size, self.drop_last) if self.batch_size else rows

    def _rows(self, order: list[int], lo: int, hi: int) -> Iterator[dict[str, Any]]:
        for position, start, stop in row_slices([self.files[i].rows for i in order], lo, hi):
            block = self.cache.read(self.files[order[position]], self.spec.columns)
            tensors = {name: array[start:stop] for name, array in block.tensors.items()}
            latents = self.spec.latents(tensors, block.keys[start:stop], self.cache.space, self.epoch)
            yield from rows_of(block, latents, start)


# ---- random access: a map-style dataset and a bucket-aware batch sampler ---------------------


class LatentMapDataset(Dataset):
    """Random access to a cache that fits local disk (`local_dir`: memory-mapped .npy) or memory.

    The constructor reads every file once; items are then dicts like `LatentDataset`'s. Use
    `BucketBatchSampler(ds.shapes, ...)` when the cache holds more than one latent shape.
    """

    def __init__(self, cache: Cache | str, *, resample: bool = False, seed: int = 0, epoch: int = 0,
                 space: str = "model", local_dir: str | Path | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.cache = open_cache(cache, storage_options)
        self.spec = LatentSpec(resample=resample, seed=seed, space=space)
        self.spec.check(self.cache)
        self.epoch = epoch
        self.files = self.cache.files
        self.offsets = np.cumsum([0] + [f.rows for f in self.files]).tolist()
        self.local_dir = Path(local_dir) / self._fingerprint() if local_dir is not None else None
        self.blocks = [self._load(i, f) for i, f in enumerate(self.files)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The latent shape of every index, for `BucketBatchSampler`."""
        return [f.latent_shape for f in self.files for _ in range(f.rows)]

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        index %= len(self)
        f = bisect.bisect_right(self.offsets, index) - 1
        block, row = self.blocks[f], index - self.offsets[f]
        tensors = {name: array[row:row + 1] for name, array in block.tensors.items()}
        latents = self.spec.latents(tensors, block.keys[row:row + 1], self.cache.space, self.epoch)
        return next(rows_of(block, latents, row))

    def _fingerprint(self) -> str:
        """Local copies are keyed by the manifest, so a re-encoded cache never reuses stale ones."""
        manifest = json.dumps(self.cache.manifest, sort_keys=True, default=str)
        return hashlib.sha1(f"{self.cache.root}\0{manifest}".encode()).hexdigest()[:16]

    def _load(self, index: int, file: CacheFile) -> LatentBlock:
        if self.local_dir is None:
            return self.cache.read(file, self.spec.columns)
        folder = self.local_dir / str(index)
        if not (folder / "meta.json").exists():
            block = self.cache.read(file, self.spec.columns)
            folder.mkdir(parents=True, exist_ok=True)
            for name, array in block.tensors.items():
                np.save(folder / f"{name}.npy", array)
            (folder / "meta.json").write_text(json.dumps(block.meta))  # written last: marks the copy complete
        tensors = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in self.spec.columns}
        return LatentBlock(file, tensors, json.loads((folder / "meta.json").read_text()))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices with one latent shape each, in a (seed, epoch) order every rank shares.

    All ranks compute the same global list of batches; rank r takes batches r, r + world_size, ...
    With drop_last=False incomplete batches are kept and the list is padded by repeating its first
    batches so that every rank runs the same number of steps; drop_last=True drops both instead.
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]], *, batch_size: int, seed: int = 0, epoch: int = 0,
                 shuffle: bool = True, drop_last: bool = False, rank: int | None = None,
                 world_size: int | None = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.shapes = [tuple(s) for s in shapes]
        self.batch_size, self.seed, self.epoch, self.shuffle, self.drop_last = batch_size, seed, epoch, shuffle, drop_last
        self.rank, self.world_size = distributed(rank, world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """Every batch of the epoch, identical on every rank."""
        rng = np.random.default_rng([self.seed, self.epoch])
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, shape in enumerate(self.shapes):
            groups.setdefault(shape, []).append(index)
        batches = []
        for shape in sorted(groups):
            members = rng.permutation(groups[shape]).tolist() if self.shuffle else groups[shape]
            chunks = [members[i:i + self.batch_size] for i in range(0, len(members), self.batch_size)]
            batches += [c for c in chunks if len(c) == self.batch_size or not self.drop_last]
        return [batches[i] for i in rng.permutation(len(batches))] if self.shuffle else batches

    def rank_batches(self) -> list[list[int]]:
        batches = self.global_batches()
        steps = len(batches) // self.world_size if self.drop_last else -(-len(batches) // self.world_size)
        padded = (batches * (1 + self.world_size))[: steps * self.world_size] if batches else []
        return padded[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.rank_batches())

    def __len__(self) -> int:
        return len(self.rank_batches())


# ---- Ray Data / Ray Train ---------------------------------------------------------------------


def ray_dataset(cache: Cache | str, *, resample: bool = False, seed: int = 0, epoch: int = 0, space: str = "model",
                latent_shape: Sequence[int] | None = None, storage_options: dict[str, Any] | None = None) -> "ray.data.Dataset":
    """The cache as a `ray.data.Dataset` of {latent, key, caption, ...}, the same tensors as `LatentDataset`.

    Parquet files are read with `read_parquet`; the draw and the space are applied by a
    `map_batches`. Make one per epoch for resampling. A cache with several latent shapes needs
    one dataset per shape (`latent_shape=`), since a batch can hold only one.
    Iterate with `iter_torch_batches(collate_fn=torch_collate())`: keys and captions are strings.
    """
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    cache = open_cache(cache, storage_options)
    spec = LatentSpec(resample=resample, seed=seed, space=space)
    spec.check(cache)
    if cache.format != "parquet":
        raise CacheError(f"ray_dataset reads Parquet caches; {cache.root} is {cache.format}: use LatentDataset")
    files = [f for f in cache.files if latent_shape is None or f.latent_shape == tuple(latent_shape)]
    shapes = sorted({f.latent_shape for f in files})
    if len(shapes) != 1:
        raise CacheError(f"{cache.root} has latent shapes {shapes or 'none'}{' for that shape' if latent_shape else ''}: "
                         f"pass latent_shape= one of {sorted({f.latent_shape for f in cache.files})}")
    fs, _ = storage.url_to_fs(cache.root, cache.storage_options)
    paths = [storage.url_to_fs(cache.url(f.path), cache.storage_options)[1] for f in files]
    ds = ray.data.read_parquet(paths, filesystem=PyFileSystem(FSSpecHandler(fs)), columns=parquet_columns(cache, files[0], spec))
    return ds.map_batches(RayLatents(spec=spec, space=cache.space, epoch=epoch), batch_format="pyarrow")


def parquet_columns(cache: Cache, file: CacheFile, spec: LatentSpec) -> list[str]:
    """The tensors the spec needs plus every non-tensor column, as the torch path yields them."""
    import pyarrow.parquet as pq

    fs, path = storage.url_to_fs(cache.url(file.path), cache.storage_options)
    with fs.open(path, "rb") as f:
        names = pq.read_schema(f).names
    return [n for n in names if n not in TENSOR_COLUMNS] + list(spec.columns)


@dataclass(frozen=True, kw_only=True)
class RayLatents:
    """The `map_batches` function of `ray_dataset`: stored columns -> the spec's latent."""

    spec: LatentSpec
    space: LatentSpace
    epoch: int

    def __call__(self, table: Any) -> dict[str, np.ndarray]:
        import pyarrow.compute as pc

        from .sinks import column_to_numpy

        tensors = {name: column_to_numpy(table.column(name)) for name in self.spec.columns}
        keys = table.column("key").to_pylist()
        out = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names
               if name not in TENSOR_COLUMNS and name != "caption" and table.column(name).null_count < table.num_rows}
        if "caption" in table.column_names:
            out["caption"] = pc.fill_null(table.column("caption"), "").to_numpy(zero_copy_only=False)
        out["latent"] = self.spec.latents(tensors, keys, self.space, self.epoch)
        return out


@functools.cache
def _torch_collate_class() -> type:
    from ray.data.collate_fn import NumpyBatchCollateFn  # Ray only when the Ray path is used

    class TorchCollate(NumpyBatchCollateFn):
        """Numeric columns become tensors, strings (key, caption) stay lists."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return {name: torch.tensor(values) if values.dtype.kind in "biuf" else values.tolist()
                    for name, values in batch.items()}

        def __reduce__(self) -> tuple:
            return torch_collate, ()

    return TorchCollate


def torch_collate() -> Any:
    """The `collate_fn` for `iter_torch_batches` over a `ray_dataset`."""
    return _torch_collate_class()()
