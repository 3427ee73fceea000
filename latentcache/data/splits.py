"""Splitting an epoch across ranks and DataLoader workers, shuffling, and one-shape batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import default_collate


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


def bucket_batches(
    rows: Iterable[dict[str, Any]], batch_size: int, drop_last: bool = False
) -> Iterator[dict[str, Any]]:
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
