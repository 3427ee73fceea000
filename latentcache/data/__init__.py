"""The training side: a latent cache streamed into PyTorch (or Ray Data) as model-ready tensors.

- `LatentDataset` (`iterable`) is an `IterableDataset` that streams cache files (Parquet or
  safetensors, local or object storage). Each epoch the file order is shuffled with (seed, epoch),
  identically on every rank; the concatenated rows are then cut into contiguous ranges, one per
  rank and within it one per DataLoader worker (`splits`), so no row is read twice and each rank
  reads only its own files. A seeded buffer shuffles rows within a range.
- `LatentMapDataset` (`mapped`) indexes a cache that fits local disk (or memory) for random
  access, and `BucketBatchSampler` batches it so that every batch has one latent shape.
- `resample=True` draws posterior_mean + posterior_std * eps with noise seeded per (key, epoch)
  by `latentcache.seeding`, so a key's draw never depends on workers, ranks or order (`spec`).
- `space="raw"` undoes the cache's recorded convention; `decoder_config` says what a trainer
  must set on its VAE to decode.
- `ray_dataset` (`ray_reader`) is the same reading as a `ray.data.Dataset` for Ray Train.

Nothing here imports diffusers or the tiling code; Ray is imported only by `ray_dataset`.
"""

from .iterable import LatentDataset
from .mapped import BucketBatchSampler, LatentMapDataset
from .ray_reader import RayLatents, ray_dataset, torch_collate
from .spec import LatentSpec, decoder_config, epoch_noise, open_cache
from .splits import bucket_batches, distributed, row_slices, shuffled, split_range

__all__ = [
    "BucketBatchSampler",
    "LatentDataset",
    "LatentMapDataset",
    "LatentSpec",
    "RayLatents",
    "bucket_batches",
    "decoder_config",
    "distributed",
    "epoch_noise",
    "open_cache",
    "ray_dataset",
    "row_slices",
    "shuffled",
    "split_range",
    "torch_collate",
]
