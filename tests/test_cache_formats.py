"""Every output format x every stored dtype: write a part, read it, read its keys, drop keys,
moments; checked against the reference libraries (torch's bfloat16 rounding, safetensors.torch)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load as torch_load

from latentcache.cache.codecs import CODECS
from latentcache.cache.formats import FORMATS, PartData, drop_rows, meta_table
from latentcache.cache.moments import Moments
from latentcache.cache.reader import Cache
from latentcache.cache.writer import part_moments
from latentcache.latent_space import LatentSpace

from .helpers import encode, errors, manifest, stats

SPACE = LatentSpace.from_dict({"convention": "scale", "scaling_factor": 0.5})


def make_part(store: str, layout: str = "nested", n: int = 5) -> tuple[PartData, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(n, 4, 3, 5)).astype(np.float32)
    codes, params = CODECS[store].encode(x)
    rows = [{"key": f"k{i}", "shard": "s0", "caption": f"c{i}", "original_height": 64} for i in range(n)]
    return PartData(
        {"latent": codes}, {f"latent.{k}": v for k, v in params.items()}, meta_table(rows), store, layout
    ), x


@pytest.mark.parametrize("store", sorted(n for n in CODECS if not CODECS[n].params))  # 8-bit: test_quantized_codecs
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_write_read_drop_and_moments(fmt, store):
    part, x = make_part(store)
    data = FORMATS[fmt].write(part)
    back = FORMATS[fmt].read(data)
    expected = torch.from_numpy(x).to({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[store])
    np.testing.assert_array_equal(back.floats(), expected.float().numpy())  # torch's rounding is the reference
    assert FORMATS[fmt].read_keys(data) == [f"k{i}" for i in range(5)]
    assert back.meta.column("caption").to_pylist() == [f"c{i}" for i in range(5)]
    new, kept = drop_rows(FORMATS[fmt], data, [True, False, True, True, False])
    again = FORMATS[fmt].read(new)
    assert again.keys == ["k0", "k2", "k3"] and kept.keys == again.keys
    np.testing.assert_array_equal(again.floats(), back.floats()[[0, 2, 3]])
    moments = Moments.from_dict(part_moments(again, SPACE))
    raw = back.floats()[[0, 2, 3]].astype(np.float64) / 0.5
    np.testing.assert_allclose(moments.mean, raw.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(moments.std(), raw.std(axis=(0, 2, 3)), rtol=1e-12)
    if fmt == "safetensors":  # a plain safetensors file: the reference library reads the same values
        np.testing.assert_array_equal(torch_load(new)["latent"].float().numpy(), again.floats())
        assert torch_load(new)["latent"].dtype == expected.dtype


@pytest.mark.parametrize("layout", ["nested", "fixed_shape_tensor"])
def test_parquet_layouts_round_trip(layout):
    part, _ = make_part("fp16", layout)
    back = FORMATS["parquet"].read(FORMATS["parquet"].write(part))
    np.testing.assert_array_equal(back.tensors["latent"], part.tensors["latent"])
    assert back.layout == layout


def test_bf16_safetensors_cross_shard_duplicates_keep_stats(ray_session, kl_model, shards, tmp_path):
    """The bug of format 1: after a cross-shard drop in a bf16 safetensors cache, that shard's
    moments became None and `stats.json` silently left it out."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(shards[0], inputs / "shard-00000.tar")
    shutil.copy(shards[0], inputs / "shard-00001.tar")  # every key again, in a later shard
    shutil.copy(shards[1], inputs / "shard-00002.tar")
    out = tmp_path / "out"
    assert (
        encode(
            input=inputs / "shard-{00000..00002}.tar",
            output=out,
            model=kl_model,
            resolution=64,
            format="safetensors",
            store_dtype="bf16",
        )
        == 0
    )
    m = manifest(out)
    assert m["counts"] == {"input": 18, "written": 12, "failed": 6, "fp32_fallback": 0} and m["duplicates"] == 6
    cache = Cache(str(out))
    keys = [k for block in cache.blocks() for k in block.keys]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 12
    dups = [r for r in errors(out).to_pylist() if r["reason"].startswith("duplicate key across shards")]
    assert len(dups) == 6 and {r["shard"] for r in dups} == {str(inputs / "shard-00001.tar")}
    latents = np.concatenate([b.tensors["latent"] for b in cache.blocks(("latent",))]).astype(np.float64)
    raw = cache.space.to_raw(latents)
    s = stats(out)
    assert s["count"] == raw.size  # every committed row counted, the dropped ones not
    np.testing.assert_allclose(s["channel_mean"], raw.mean(axis=(0, 2, 3)), rtol=1e-9)
    assert all(r.get("moments") for r in cache.records.values() if r["written"])
