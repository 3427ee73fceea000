"""`LatentDataset`: a cache streamed as an `IterableDataset`, every row once per epoch across ranks and workers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from ..reader import Cache
from .spec import LatentSpec, open_cache, rows_of
from .splits import bucket_batches, distributed, row_slices, shuffled, split_range


class LatentDataset(IterableDataset):
    """Streams a latent cache as dicts {latent, key, caption, original_*, crop_*, ...}.

    Every row is read exactly once per epoch across `world_size` ranks x DataLoader workers. With
    `even=True` each rank gets exactly rows // world_size rows (the few left over change with the
    epoch), so DDP ranks run the same number of steps. With `batch_size`, it yields collated
    batches of one latent shape each (use DataLoader(batch_size=None)).
    """

    def __init__(
        self,
        cache: Cache | str,
        *,
        resample: bool = False,
        seed: int = 0,
        epoch: int = 0,
        space: str = "model",
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        rank: int | None = None,
        world_size: int | None = None,
        even: bool = False,
        batch_size: int | None = None,
        drop_last: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
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
            rows = shuffled(
                rows, self.shuffle_buffer, np.random.default_rng([self.seed, self.epoch, self.rank, worker])
            )
        yield from bucket_batches(rows, self.batch_size, self.drop_last) if self.batch_size else rows

    def _rows(self, order: list[int], lo: int, hi: int) -> Iterator[dict[str, Any]]:
        for position, start, stop in row_slices([self.files[i].rows for i in order], lo, hi):
            block = self.cache.read(self.files[order[position]], self.spec.columns)
            tensors = {name: array[start:stop] for name, array in block.tensors.items()}
            latents = self.spec.latents(tensors, block.keys[start:stop], self.cache.space, self.epoch)
            yield from rows_of(block, latents, start)
