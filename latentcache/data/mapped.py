"""Random access: a map-style dataset over a cache that fits local disk, and a bucket-aware batch sampler."""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

from ..reader import Cache, CacheFile, LatentBlock
from .spec import LatentSpec, open_cache, rows_of
from .splits import distributed


class LatentMapDataset(Dataset):
    """Random access to a cache that fits local disk (`local_dir`: memory-mapped .npy) or memory.

    The constructor reads every file once; items are then dicts like `LatentDataset`'s. Use
    `BucketBatchSampler(ds.shapes, ...)` when the cache holds more than one latent shape.
    """

    def __init__(
        self,
        cache: Cache | str,
        *,
        resample: bool = False,
        seed: int = 0,
        epoch: int = 0,
        space: str = "model",
        local_dir: str | Path | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
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
        tensors = {name: array[row : row + 1] for name, array in block.tensors.items()}
        latents = self.spec.latents(tensors, block.keys[row : row + 1], self.cache.space, self.epoch)
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

    def __init__(
        self,
        shapes: Sequence[tuple[int, ...]],
        *,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.shapes = [tuple(s) for s in shapes]
        self.batch_size, self.seed, self.epoch, self.shuffle, self.drop_last = (
            batch_size,
            seed,
            epoch,
            shuffle,
            drop_last,
        )
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
            chunks = [members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size)]
            batches += [c for c in chunks if len(c) == self.batch_size or not self.drop_last]
        return [batches[i] for i in rng.permutation(len(batches))] if self.shuffle else batches

    def rank_batches(self) -> list[list[int]]:
        batches = self.global_batches()
        steps = len(batches) // self.world_size if self.drop_last else -(-len(batches) // self.world_size)
        padded = (batches * (1 + self.world_size))[: steps * self.world_size] if batches else []
        return padded[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.rank_batches())

    def __len__(self) -> int:
        return len(self.rank_batches())
