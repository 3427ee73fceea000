"""The readers people have, pointed at the cache directory itself: Hugging Face `datasets`,
`ray.data.read_parquet`, pyarrow; with and without aspect buckets. Metadata must stay invisible."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from latentcache.cache.reader import Cache
from latentcache.samples import write_tar

from .helpers import encode, latents, manifest, png_bytes, read_cache

BUCKETS = dict(buckets=True, bucket_step=16, bucket_min=32, bucket_max=128)


def by_key(out) -> dict[str, np.ndarray]:
    """Stored latents per key, read part by part (parts differ in shape when bucketed)."""
    cache = Cache(str(out))
    return {k: v for b in cache.blocks(("latent",)) for k, v in zip(b.keys, b.tensors["latent"])}


@pytest.fixture(scope="module")
def varied_shard(tmp_path_factory):
    """Six images of three aspect ratios (three buckets when bucketing)."""
    rng = np.random.default_rng(4)
    sizes = [(64, 64), (64, 96), (96, 64), (64, 64), (64, 96), (96, 64)]
    members = [(f"k{i:02d}.png", png_bytes(rng.integers(0, 256, (*s, 3), dtype=np.uint8))) for i, s in enumerate(sizes)]
    path = tmp_path_factory.mktemp("varied") / "shard-00000.tar"
    write_tar(path, members)
    return path


@pytest.fixture(scope="module", params=["plain", "bucketed"])
def cache_dir(request, ray_session, kl_model, varied_shard, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"readers-{request.param}") / "out"
    flags = BUCKETS if request.param == "bucketed" else {}
    assert encode(input=varied_shard, output=out, model=kl_model, resolution=64, batch_size=3, **flags) == 0
    return request.param, out


def test_hf_load_dataset_on_the_cache_dir(cache_dir, tmp_path):
    import datasets

    kind, out = cache_dir
    ds = datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(ds["key"]) == [f"k{i:02d}" for i in range(6)]
    expected = by_key(out)
    shapes = set()
    for row in ds.with_format("numpy"):
        latent = np.stack([np.stack(c) for c in row["latent"]]) if row["latent"].dtype == object else row["latent"]
        np.testing.assert_array_equal(latent, expected[row["key"]])
        shapes.add(latent.shape)
    assert len(shapes) == (3 if kind == "bucketed" else 1)


def test_pyarrow_and_ray_read_parquet_on_the_cache_dir(cache_dir, ray_session):
    import ray.data

    kind, out = cache_dir
    assert sorted(pq.read_table(out).column("key").to_pylist()) == [f"k{i:02d}" for i in range(6)]
    rows = ray.data.read_parquet(str(out)).take_all()
    assert sorted(r["key"] for r in rows) == [f"k{i:02d}" for i in range(6)]
    assert len(manifest(out)["shards"]) == 1


def test_ray_read_parquet_gives_bchw_on_a_one_shape_tensor_cache(ray_session, kl_model, varied_shard, tmp_path):
    import ray.data

    out = tmp_path / "fst"
    assert (
        encode(input=varied_shard, output=out, model=kl_model, resolution=64, tensor_layout="fixed_shape_tensor") == 0
    )
    batch = ray.data.read_parquet(str(out)).take_batch(6, batch_format="numpy")
    assert batch["latent"].shape == (6, 4, 8, 8) and batch["latent"].dtype == np.float16
    expected = dict(zip(read_cache(out).column("key").to_pylist(), latents(read_cache(out))))
    for key, latent in zip(batch["key"], batch["latent"]):
        np.testing.assert_array_equal(latent, expected[key])
