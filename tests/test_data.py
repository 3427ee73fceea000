"""The training reader: caches written by the real `latentcache encode`, read back into PyTorch and Ray.

The corpus is lossless 64x64 PNGs (the target size, so preprocessing is the identity): raw-space
latents can then be checked against a direct diffusers encode of the same pixels.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader

from latentcache.cli import main
from latentcache.data import (
    BucketBatchSampler,
    LatentDataset,
    LatentMapDataset,
    decoder_config,
    epoch_noise,
    ray_dataset,
    row_slices,
    torch_collate,
)
from latentcache.latent_space import LatentSpace
from latentcache.reader import Cache, CacheError
from latentcache.samples import make_shards, natural_image, write_tar

from .helpers import encode, png_bytes

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.1, -0.2, 0.3, 0.05], [0.9, 1.1, 1.3, 0.7]
# One cache per latent-space convention, spread over the formats and layouts a reader must handle.
CACHES = {
    "scale": dict(store_posterior=True),
    "shift_scale": dict(shift_factor=0.25, tensor_layout="nested"),
    "per_channel": dict(format="safetensors", store_posterior=True, latents_mean=MEAN, latents_std=STD),
}


def write_corpus(
    folder: Path, *, shards: int, per_shard: int, side: int, prefix: str, seed: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = {}
    for s in range(shards):
        members = []
        for i in range(per_shard):
            key = f"{prefix}{s}-{i:02d}"
            images[key] = np.asarray(natural_image(rng, side, side))
            members += [(f"{key}.png", png_bytes(images[key])), (f"{key}.txt", f"a photo {key}".encode())]
        write_tar(folder / f"shard-{s:05d}.tar", members)
    return images


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_corpus(folder, shards=3, per_shard=6, side=64, prefix="s", seed=0)


@pytest.fixture(scope="module")
def caches(ray_session, kl_model, corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    for name, flags in CACHES.items():
        assert (
            encode(
                input=str(corpus[0] / "shard-{00000..00002}.tar"),
                output=root / name,
                model=kl_model,
                resolution=64,
                store_dtype="fp32",
                **flags,
            )
            == 0
        )
    return {name: root / name for name in CACHES}


@pytest.fixture(scope="module")
def two_shapes(ray_session, kl_model, tmp_path_factory) -> Path:
    """A cache with aspect buckets: landscape, portrait and square images, six of each."""
    root = tmp_path_factory.mktemp("buckets")
    make_shards(root / "shards", shards=2, per_shard=9, ext="png", sizes=[(64, 96), (96, 64), (64, 64)])
    assert (
        encode(
            input=str(root / "shards" / "shard-{00000..00001}.tar"),
            output=root / "cache",
            model=kl_model,
            resolution=64,
            buckets=True,
            bucket_step=16,
            store_dtype="fp32",
            store_posterior=True,
        )
        == 0
    )
    return root / "cache"


SHAPES = {(4, 6, 10): 6, (4, 10, 6): 6, (4, 8, 8): 6}  # 48x80, 80x48 and 64x64 buckets


def loader_keys(dataset, **loader_args) -> list[str]:
    return [row["key"] for row in DataLoader(dataset, batch_size=None, **loader_args)]


def by_key(rows) -> dict[str, torch.Tensor]:
    return {row["key"]: row["latent"] for row in rows}


# ---- exactly once per epoch ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scale", "per_channel"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_key_once_across_two_workers_and_two_ranks(caches, corpus, name, shuffle):
    keys = []
    for rank in range(2):
        dataset = LatentDataset(
            caches[name], rank=rank, world_size=2, shuffle=shuffle, shuffle_buffer=4, seed=7, epoch=3
        )
        keys.append(loader_keys(dataset, num_workers=2))
    assert sorted(keys[0] + keys[1]) == sorted(corpus[1])
    assert len(keys[0]) == len(keys[1]) == 9


def test_row_slices_cut_files_without_overlap():
    sizes = [5, 0, 3, 7]
    pieces = [row_slices(sizes, lo, hi) for lo, hi in [(0, 4), (4, 9), (9, 15)]]
    assert pieces == [[(0, 0, 4)], [(0, 4, 5), (2, 0, 3), (3, 0, 1)], [(3, 1, 7)]]


def test_even_gives_every_rank_the_same_number_of_rows(caches):
    counts = [
        len(loader_keys(LatentDataset(caches["scale"], rank=r, world_size=4, even=True), num_workers=2))
        for r in range(4)
    ]
    assert counts == [4, 4, 4, 4]  # 18 rows: 2 left over


def test_rows_carry_caption_and_size_conditioning(caches, corpus):
    row = next(iter(LatentDataset(caches["per_channel"], shuffle=False)))
    assert row["caption"] == f"a photo {row['key']}" and row["latent"].shape == (4, 8, 8)
    assert (row["original_height"], row["original_width"], row["crop_top"], row["crop_left"]) == (64, 64, 0, 0)


# ---- posterior resampling --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scale", "per_channel"])
def test_resampling_is_deterministic_per_key_and_epoch(caches, name):
    def draw(epoch: int, **kwargs) -> dict[str, torch.Tensor]:
        return by_key(LatentDataset(caches[name], resample=True, seed=4, epoch=epoch, **kwargs))

    workers = by_key(
        DataLoader(
            LatentDataset(caches[name], resample=True, seed=4, epoch=1, shuffle_buffer=3),
            batch_size=None,
            num_workers=2,
        )
    )
    ranks = {**draw(1, shuffle=False, rank=0, world_size=2), **draw(1, shuffle=False, rank=1, world_size=2)}
    mapped = LatentMapDataset(caches[name], resample=True, seed=4, epoch=1)
    mapped = by_key(mapped[i] for i in range(len(mapped)))
    other = draw(2)
    assert workers.keys() == ranks.keys() == mapped.keys() == other.keys() and len(workers) == 18
    for key in workers:
        torch.testing.assert_close(workers[key], ranks[key], rtol=0, atol=0)
        torch.testing.assert_close(workers[key], mapped[key], rtol=0, atol=0)
        assert not torch.allclose(workers[key], other[key])


def test_resampled_mean_over_epochs_approaches_the_stored_mean(caches):
    dataset = LatentMapDataset(caches["scale"], resample=True, seed=3)
    block = next(Cache(str(caches["scale"])).blocks(("posterior_mean", "posterior_std")))
    mean, std = (torch.tensor(block.tensors[n]) for n in ("posterior_mean", "posterior_std"))
    epochs, total = 400, torch.zeros_like(mean)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        total += torch.stack([dataset[i]["latent"] for i in range(len(mean))])
    z = (total / epochs - mean) / (std / epochs**0.5)  # standard normal if the draws are right
    assert z.abs().max() < 5.5
    assert 0.9 < (z**2).mean() < 1.1
    assert abs(z.mean()) < 0.1


def test_resample_without_a_stored_posterior_is_a_clear_error(caches):
    for make in (LatentDataset, LatentMapDataset, ray_dataset):
        with pytest.raises(CacheError, match="--store-posterior"):
            make(caches["shift_scale"], resample=True)


# ---- latent spaces ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def posterior(kl_model, corpus) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Raw (mean, std) of each image from diffusers directly: the ground truth for space="raw"."""
    vae = AutoencoderKL.from_pretrained(kl_model).eval()
    keys = sorted(corpus[1])
    x = torch.from_numpy(np.stack([corpus[1][k] for k in keys])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    return {k: (dist.mean[i], dist.std[i]) for i, k in enumerate(keys)}


@pytest.mark.parametrize("name", list(CACHES))
def test_raw_space_inverts_each_convention(caches, posterior, name):
    cache = Cache(str(caches[name]))
    assert cache.space.convention == name
    raw = by_key(LatentDataset(cache, space="raw"))
    model = by_key(LatentDataset(cache, space="model"))
    for key, (mean, _) in posterior.items():
        # Encoding in another batch composition moves the raw latent by ~1e-5; a wrong inverse moves it by >0.05.
        torch.testing.assert_close(raw[key], mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(cache.space.to_model(raw[key]), model[key], atol=1e-6, rtol=0)


def test_raw_resample_is_the_raw_posterior_draw(caches, posterior):
    drawn = by_key(LatentDataset(caches["per_channel"], resample=True, space="raw", epoch=5, seed=2))
    for key, (mean, std) in posterior.items():
        eps = torch.from_numpy(epoch_noise([key], tuple(mean.shape), 2, 5)[0])
        torch.testing.assert_close(drawn[key], mean + std * eps, atol=2e-4, rtol=0)


def test_decoder_config_is_what_the_vae_needs(caches):
    assert decoder_config(caches["scale"]) == {"scaling_factor": pytest.approx(0.18215)}
    assert decoder_config(caches["shift_scale"]) == {"scaling_factor": pytest.approx(0.18215), "shift_factor": 0.25}
    assert decoder_config(caches["per_channel"]) == {
        "scaling_factor": pytest.approx(0.18215),
        "latents_mean": MEAN,
        "latents_std": STD,
    }
    space = LatentSpace.from_dict({"convention": "per_channel", **decoder_config(caches["per_channel"])})
    assert space == Cache(str(caches["per_channel"])).space


def test_bad_space_is_a_clear_error(caches):
    with pytest.raises(ValueError, match="space must be one of model, raw"):
        LatentDataset(caches["scale"], space="pixels")


# ---- buckets: one latent shape per batch -----------------------------------------------------


def test_bucket_sampler_batches_are_uniform_and_agree_across_ranks(two_shapes):
    dataset = LatentMapDataset(two_shapes)
    assert Counter(dataset.shapes) == SHAPES
    samplers = [
        BucketBatchSampler(dataset.shapes, batch_size=4, seed=1, epoch=2, rank=r, world_size=2) for r in range(2)
    ]
    order = samplers[0].global_batches()
    assert order == samplers[1].global_batches() and len(order) == 6  # per shape: one of 4, one of 2
    assert order != BucketBatchSampler(dataset.shapes, batch_size=4, seed=1, epoch=3).global_batches()
    seen = []
    for sampler in samplers:
        batches = list(DataLoader(dataset, batch_sampler=sampler))
        assert len(batches) == 3
        for batch in batches:
            assert tuple(batch["latent"].shape[1:]) in SHAPES
            assert (batch["bucket_height"] == batch["latent"].shape[2] * 8).all()
            assert (batch["bucket_width"] == batch["latent"].shape[3] * 8).all()
        seen += [k for b in batches for k in b["key"]]
    assert sorted(seen) == sorted(dataset[i]["key"] for i in range(len(dataset)))


def test_bucket_sampler_pads_or_drops_so_ranks_take_equal_steps(two_shapes):
    shapes = LatentMapDataset(two_shapes).shapes
    dropped = [
        b for r in range(2) for b in BucketBatchSampler(shapes, batch_size=4, drop_last=True, rank=r, world_size=2)
    ]
    # one full batch per shape, cut to 2 so that both ranks take one step
    assert len(dropped) == 2 and all(len(b) == 4 and len({shapes[i] for i in b}) == 1 for b in dropped)
    assert len({i for b in dropped for i in b}) == 8
    padded = [list(BucketBatchSampler(shapes, batch_size=4, rank=r, world_size=4)) for r in range(4)]
    assert [len(p) for p in padded] == [2, 2, 2, 2]  # 6 batches padded to 8
    assert {i for p in padded for b in p for i in b} == set(range(18))


def test_streaming_batches_have_one_shape_and_every_key_once(two_shapes):
    keys = []
    for rank in range(2):
        for batch in DataLoader(
            LatentDataset(two_shapes, batch_size=4, rank=rank, world_size=2), batch_size=None, num_workers=2
        ):
            assert tuple(batch["latent"].shape[1:]) in SHAPES
            keys += batch["key"]
    assert len(keys) == len(set(keys)) == 18


def test_local_dir_copy_reads_the_same_as_memory(two_shapes, tmp_path):
    memory = LatentMapDataset(two_shapes, resample=True, epoch=4)
    local = LatentMapDataset(two_shapes, resample=True, epoch=4, local_dir=tmp_path)
    again = LatentMapDataset(two_shapes, resample=True, epoch=4, local_dir=tmp_path)  # reuses the copy
    assert len(list(tmp_path.rglob("meta.json"))) == len(Cache(str(two_shapes)).files)
    for i in range(len(memory)):
        torch.testing.assert_close(memory[i]["latent"], local[i]["latent"], rtol=0, atol=0)
        assert memory[i]["key"] == again[i]["key"]


# ---- Ray Data and object storage -------------------------------------------------------------


def ray_rows(ds) -> dict[str, torch.Tensor]:
    out = {}
    for batch in ds.iter_torch_batches(batch_size=5, collate_fn=torch_collate()):
        assert batch["latent"].dtype == torch.float32 and batch["original_height"].dtype == torch.int32
        out.update(zip(batch["key"], batch["latent"]))
    return out


@pytest.mark.parametrize("name", ["scale", "shift_scale", "two_shapes"])
def test_ray_path_yields_the_torch_path_tensors(ray_session, caches, two_shapes, name):
    cache = Cache(str(two_shapes if name == "two_shapes" else caches[name]))
    args = dict(resample=cache.has_posterior, epoch=2, seed=9, space="raw")
    shape = (4, 6, 10) if name == "two_shapes" else None
    if shape:  # one latent shape per Ray dataset
        with pytest.raises(CacheError, match="latent_shape="):
            ray_dataset(cache, **args)
    from_ray = ray_rows(ray_dataset(cache, latent_shape=shape, **args))
    from_torch = {k: v for k, v in by_key(LatentDataset(cache, **args)).items() if shape is None or v.shape == shape}
    assert from_ray.keys() == from_torch.keys() and len(from_ray) == (6 if shape else 18)
    for key, latent in from_torch.items():
        torch.testing.assert_close(from_ray[key], latent, rtol=0, atol=0)


def test_s3_cache_streams_like_the_local_one(ray_session, caches, s3):
    import s3fs

    bucket, options = s3
    s3fs.S3FileSystem(**options).put(str(caches["scale"]), f"{bucket}/cache", recursive=True)
    url = f"s3://{bucket}/cache"
    local = by_key(LatentDataset(caches["scale"], resample=True, epoch=1))
    remote = [
        loader_keys(LatentDataset(url, storage_options=options, rank=r, world_size=2), num_workers=2) for r in range(2)
    ]
    assert sorted(remote[0] + remote[1]) == sorted(local)
    for key, latent in by_key(LatentDataset(url, storage_options=options, resample=True, epoch=1)).items():
        torch.testing.assert_close(latent, local[key], rtol=0, atol=0)
    from_ray = ray_rows(ray_dataset(url, storage_options=options, resample=True, epoch=1))
    for key, latent in local.items():
        torch.testing.assert_close(from_ray[key], latent, rtol=0, atol=0)


# ---- the README's training loop --------------------------------------------------------------


def training_snippet() -> str:
    """The README's training-loop snippet."""
    for doc in (ROOT / "README.md",):
        blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
        found = [b for b in blocks if "LatentDataset(" in b and "for batch in" in b]
        if found:
            return found[0]
    raise AssertionError("no training-loop snippet in README.md")


def test_training_snippet_runs_against_the_demo_cache(ray_session, tmp_path, monkeypatch, capsys):
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--shards", "2", "--per-shard", "4"]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(training_snippet(), "training-snippet", "exec"), {"__name__": "__snippet__"})
    out = capsys.readouterr().out
    assert "epoch 1: loss" in out and "'scaling_factor': 0.18215" in out
