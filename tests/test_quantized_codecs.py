"""8-bit stored dtypes (`--store-dtype int8`, `fp8`): codecs, every reader, stats, bytes, the docs snippet.

The same shards are encoded as fp32 (the reference), fp16 (for bytes) and int8/fp8; every reader of
an 8-bit cache must give the fp32 latents within the codec's stated bound, and plain Hugging Face
`datasets` users must get the same numbers from the documented formula (docs/cache-format.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load as torch_load

from latentcache.cache.codecs import CODECS, bf16_decode, bf16_encode, codec
from latentcache.cache.formats import FORMATS, PartData, drop_rows, meta_table
from latentcache.cli import main
from latentcache.data import LatentDataset, LatentMapDataset, ray_dataset
from latentcache.reader import Cache

from .helpers import encode

ROOT = Path(__file__).resolve().parents[1]
EIGHT_BIT = ("int8", "fp8")
TENSORS = ("latent", "posterior_mean", "posterior_std")


def latents_like(rng: np.random.Generator, n: int = 6) -> np.ndarray:
    """[N, 4, 8, 8] with per-channel offsets and spreads, a constant channel and an all-zero one."""
    spread, offset = np.array([0.1, 2.0, 30.0, 1.0])[:, None, None], np.array([5.0, -1.0, 0, 0])[:, None, None]
    x = rng.normal(size=(n, 4, 8, 8)) * spread + offset
    x[:, 3] = 0.0
    x[0, 0] = 1.25
    return x.astype(np.float32)


def test_bf16_through_ml_dtypes_is_torch_bfloat16_bit_for_bit():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = np.concatenate([x[np.isfinite(x)], np.float32([0, -0.0, 1e-45, 3.4e38, -3.4e38, 1.0039062, 1.0117188])])
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_encode(x), expected)
    codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    decoded = torch.from_numpy(codes.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf16_decode(codes).view(np.uint32), decoded.view(np.uint32))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_codec_round_trips_within_its_stated_bound(name):
    x = latents_like(np.random.default_rng(1))
    store = codec(name)
    codes, params = store.encode(x)
    assert set(params) == set(store.params)
    assert all(p.shape == (6, 4) and p.dtype == np.float32 for p in params.values())
    back = store.decode(codes, params)
    assert back.dtype == np.float32 and back.shape == x.shape
    assert np.all(np.abs(back - x) <= store.error_bound(x))
    np.testing.assert_array_equal(back[:, 3], 0.0)  # an all-zero channel stays exact
    np.testing.assert_array_equal(back[0, 0], 1.25)  # so does a constant one


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_8bit_error_is_what_the_format_promises(name):
    """int8 about 1/255 of a channel's range per element; fp8 e4m3 about 2^-4 relative (3 mantissa bits)."""
    x = latents_like(np.random.default_rng(2))[:, :3]
    store = codec(name)
    back = store.decode(*store.encode(x))
    rel = np.linalg.norm(back - x) / np.linalg.norm(x)
    assert (rel < 0.01) if name == "int8" else (0.005 < rel < 0.04), rel


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("name", EIGHT_BIT)
def test_formats_store_the_params_beside_the_codes(fmt, name):
    x = latents_like(np.random.default_rng(3), n=3)
    codes, params = codec(name).encode(x)
    rows = [{"key": f"k{i}", "shard": "s"} for i in range(3)]
    part = PartData({"latent": codes}, {f"latent.{k}": v for k, v in params.items()}, meta_table(rows), name)
    back = FORMATS[fmt].read(FORMATS[fmt].write(part))
    assert back.tensors["latent"].dtype == codes.dtype and set(back.params) == set(part.params)
    np.testing.assert_array_equal(back.floats(), codec(name).decode(codes, params))


def test_fp8_rounding_is_torch_float8_e4m3fn():
    x = latents_like(np.random.default_rng(4))
    codes, params = codec("fp8").encode(x)
    scale = torch.from_numpy(params["scale"])[..., None, None]
    expected = (torch.from_numpy(x) / scale.clamp_min(torch.finfo(torch.float32).tiny)).to(torch.float8_e4m3fn)
    np.testing.assert_array_equal(codes, expected.view(torch.uint8).numpy())


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("name", EIGHT_BIT)
def test_dropping_rows_keeps_each_rows_params(fmt, name):
    x = latents_like(np.random.default_rng(5), n=4)
    codes, params = codec(name).encode(x)
    part = PartData(
        {"latent": codes},
        {f"latent.{k}": v for k, v in params.items()},
        meta_table([{"key": f"k{i}", "shard": "s"} for i in range(4)]),
        name,
    )
    new, kept = drop_rows(FORMATS[fmt], FORMATS[fmt].write(part), [True, False, False, True])
    again = FORMATS[fmt].read(new)
    assert again.keys == ["k0", "k3"] == kept.keys
    np.testing.assert_array_equal(again.floats(), part.floats()[[0, 3]])
    if fmt == "safetensors":  # a plain safetensors file: the reference library reads codes and params
        tensors = torch_load(new)
        assert tensors["latent"].dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[name]
        scale = tensors["latent.scale"].numpy()[..., None, None]
        offset = tensors["latent.offset"].numpy()[..., None, None] if name == "int8" else 0
        np.testing.assert_array_equal(tensors["latent"].float().numpy() * scale + offset, again.floats())


# ---- caches encoded by the real pipeline ------------------------------------------------------


@pytest.fixture(scope="module")
def caches(ray_session, kl_model, shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("codecs")
    common = dict(
        input=str(shards[0].parent / "shard-{00000..00001}.tar"),
        model=kl_model,
        resolution=64,
        batch_size=4,
        store_posterior=True,
    )
    runs = {"fp32": {}, "fp16": {}, "int8": {}, "fp8": {}, "int8-safetensors": dict(format="safetensors")}
    for name, extra in runs.items():
        assert encode(output=root / name, store_dtype=name.split("-")[0], **common, **extra) == 0
    return {name: root / name for name in runs}


def by_key(cache_dir: Path, column: str = "latent") -> dict[str, np.ndarray]:
    cache = Cache(str(cache_dir))
    return {k: v for b in cache.blocks((column,)) for k, v in zip(b.keys, b.tensors[column])}


def assert_within_bound(got: dict[str, np.ndarray], reference: dict[str, np.ndarray], name: str) -> None:
    """Every key, every element within the codec's bound of the fp32 cache's value."""
    assert sorted(got) == sorted(reference)
    keys = sorted(reference)
    x, y = np.stack([reference[k] for k in keys]), np.stack([np.asarray(got[k], np.float32) for k in keys])
    slack = 1e-6 * np.abs(x).max()  # two encoder runs of the same input may differ in the last bits
    assert np.all(np.abs(y - x) <= codec(name).error_bound(x) + slack)
    assert not np.array_equal(x, y)  # quantised: not the fp32 values themselves


@pytest.mark.parametrize("name", ["int8", "fp8", "int8-safetensors"])
def test_cache_read_is_within_the_bound_for_every_stored_tensor(caches, name):
    for column in TENSORS:
        assert_within_bound(by_key(caches[name], column), by_key(caches["fp32"], column), name.split("-")[0])


@pytest.mark.parametrize("name", ["int8", "fp8", "int8-safetensors"])
def test_torch_readers_dequantise_through_the_codec(caches, name):
    reference = by_key(caches["fp32"])
    streamed = {r["key"]: r["latent"].numpy() for r in LatentDataset(str(caches[name]), shuffle=False)}
    assert_within_bound(streamed, reference, name.split("-")[0])
    mapped = LatentMapDataset(str(caches[name]))
    assert_within_bound(
        {mapped[i]["key"]: mapped[i]["latent"].numpy() for i in range(len(mapped))}, reference, name.split("-")[0]
    )
    assert all(v.dtype == np.float32 for v in streamed.values())


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_ray_dataset_dequantises_like_the_torch_readers(caches, name, ray_session):
    rows = ray_dataset(str(caches[name])).take_all()
    ours = by_key(caches[name])
    assert sorted(r["key"] for r in rows) == sorted(ours)
    for r in rows:
        np.testing.assert_array_equal(r["latent"], ours[r["key"]])
        assert not any("." in column for column in r)  # the params are consumed, not handed on


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_resampling_reads_the_dequantised_posterior(caches, name):
    ours = next(iter(LatentDataset(str(caches[name]), resample=True, shuffle=False)))
    ref = next(iter(LatentDataset(str(caches["fp32"]), resample=True, shuffle=False)))
    assert ours["key"] == ref["key"]
    mean, std = (by_key(caches["fp32"], column)[ref["key"]] for column in ("posterior_mean", "posterior_std"))
    eps = (ref["latent"].numpy() - mean) / std
    bound = codec(name).error_bound(mean[None])[0] + np.abs(eps) * codec(name).error_bound(std[None])[0]
    assert np.all(np.abs(ours["latent"].numpy() - ref["latent"].numpy()) <= bound * 1.001 + 1e-6)


def docs_snippet(name: str) -> str:
    """The Python block of docs/cache-format.md's 8-bit section that dequantises `name` codes."""
    text = (ROOT / "docs" / "cache-format.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text.split("## 8-bit codecs", 1)[1], re.S)
    return next(b for b in blocks if f"# {name}:" in b)


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_the_documented_hugging_face_snippet_gives_our_readers_numbers(caches, name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    ours = by_key(caches[name])
    snippet = docs_snippet(name)
    assert '.with_format("numpy")[0]' in snippet
    for index in (0, 5, len(ours) - 1):
        scope = {"CACHE": str(caches[name])}
        exec(snippet.replace('.with_format("numpy")[0]', f'.with_format("numpy")[{index}]'), scope)
        np.testing.assert_array_equal(scope["latent"], ours[str(scope["row"]["key"])])


def dequantised_by_hand(cache_dir: Path, name: str) -> np.ndarray:
    """Every latent, dequantised with pyarrow + numpy + the formula the manifest records."""
    manifest = Cache(str(cache_dir)).manifest
    assert manifest["codec"]["name"] == name and manifest["codec"]["params"] == list(codec(name).params)
    out = []
    for f in Cache(str(cache_dir)).files:
        table = pq.read_table(cache_dir / f.path)
        codes = np.stack([np.asarray(v) for v in table.column("latent").to_pylist()])
        scale = np.asarray(table.column("latent.scale").to_pylist(), np.float32)[..., None, None]
        if name == "int8":
            offset = np.asarray(table.column("latent.offset").to_pylist(), np.float32)[..., None, None]
            out.append(codes.astype(np.int8).astype(np.float32) * scale + offset)
        else:
            import ml_dtypes

            out.append(codes.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale)
    return np.concatenate(out)


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_stats_describe_the_dequantised_values(caches, name, tmp_path):
    cache_dir = caches[name]
    space = Cache(str(cache_dir)).space
    raw = space.to_raw(dequantised_by_hand(cache_dir, name).astype(np.float64))
    recorded = json.loads((cache_dir / "__latentcache__" / "stats.json").read_text())
    assert main(["stats", "-q", "--cache", str(cache_dir), "--output", str(tmp_path / "s.json")]) == 0
    command = json.loads((tmp_path / "s.json").read_text())
    for doc in (recorded, command):
        np.testing.assert_allclose(doc["channel_mean"], raw.mean(axis=(0, 2, 3)), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(doc["channel_std"], raw.std(axis=(0, 2, 3)), rtol=1e-9)
        assert doc["count"] == raw.size


def data_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in (cache_dir / "data").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def sized(ray_session, kl_model, shards, tmp_path_factory):
    """Latents of a size caches hold (32x32): at 8x8 the files' fixed metadata would be what is measured."""
    root = tmp_path_factory.mktemp("sized")
    for name in ("fp16", *EIGHT_BIT):
        assert encode(input=shards[0], output=root / name, model=kl_model, resolution=256, store_dtype=name) == 0
    return root


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_8bit_data_files_are_at_most_0_6x_the_fp16_ones(sized, name):
    assert data_bytes(sized / name) <= 0.6 * data_bytes(sized / "fp16")


def test_manifest_and_parts_record_the_formula_and_where_the_params_live(caches):
    manifest = Cache(str(caches["int8"])).manifest
    assert manifest["codec"] == codec("int8").describe()
    assert "scale[n, c]" in manifest["codec"]["decode"] and "offset[n, c]" in manifest["codec"]["decode"]
    part = Cache(str(caches["int8"])).files[0].path
    schema = pq.read_schema(caches["int8"] / part)
    assert {"latent.scale", "latent.offset", "posterior_std.scale"} <= set(schema.names)
    assert json.loads(schema.metadata[b"latentcache"])["codec"]["name"] == "int8"


# ---- audit --compare ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compared(caches, kl_model):
    """int8 (safetensors: Hugging Face does not read it, its audit outputs live under __latentcache__/audit) vs fp32."""
    cache = caches["int8-safetensors"]
    rc = main(
        [
            "audit",
            "--cache",
            str(cache),
            "--compare",
            str(caches["fp32"]),
            "--model",
            str(kl_model),
            "--sample",
            "5",
            "--decode-on",
            "driver",
        ]
    )
    return (
        rc,
        json.loads((cache / "__latentcache__" / "audit" / "summary.json").read_text()),
        cache / "__latentcache__" / "audit",
    )


def test_compare_reports_latent_relative_l2_per_key_as_numpy_computes_it(compared, caches):
    rc, summary, _ = compared
    assert rc == 0 and summary["ok"]
    c = summary["compare"]
    assert c["store_dtype"] == "int8" and c["other_store_dtype"] == "fp32" and c["other"] == str(caches["fp32"])
    assert c["keys"] == c["compared"] == 5 and c["missing_in_other"] == 0
    space = Cache(str(caches["fp32"])).space
    ours, ref = by_key(caches["int8-safetensors"]), by_key(caches["fp32"])
    for row in c["per_key"]:
        a, b = (space.to_raw(d[row["key"]].astype(np.float64)) for d in (ours, ref))
        assert row["latent_rel_l2"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-9)
        assert 0 < row["latent_rel_l2"] < 0.02
    assert c["metrics"]["latent_rel_l2"]["mean"] == pytest.approx(np.mean([r["latent_rel_l2"] for r in c["per_key"]]))


def test_compare_scores_the_decoded_images_of_both_caches(compared, caches):
    _, summary, _ = compared
    c = summary["compare"]
    for row in c["per_key"]:
        assert row["psnr_between"] > 30 and 0.9 < row["ssim_between"] <= 1.0  # decodes of nearly equal latents
        assert abs(row["psnr_delta"]) < 0.5 and abs(row["ssim_delta"]) < 0.05
    assert {"psnr_between", "ssim_between", "psnr_delta", "ssim_delta"} <= set(c["metrics"])
    rows = summary["counts"]["rows_recorded"]
    assert c["bytes_per_latent"] == data_bytes(caches["int8-safetensors"]) / rows
    assert c["other_bytes_per_latent"] == data_bytes(caches["fp32"]) / rows


def test_compare_is_in_the_html_report_and_the_printed_lines(compared, caches, kl_model, capsys):
    _, summary, out = compared
    page = (out / "report.html").read_text()
    assert "Comparison with another cache" in page
    assert all(row["key"] in page for row in summary["compare"]["per_key"])
    assert (
        main(
            [
                "audit",
                "--cache",
                str(caches["int8-safetensors"]),
                "--compare",
                str(caches["fp32"]),
                "--model",
                str(kl_model),
                "--sample",
                "0",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "compare: int8 against fp32" in printed and "bytes per latent" in printed


def test_compare_with_itself_is_exact(caches, kl_model, capsys):
    assert (
        main(
            [
                "audit",
                "--cache",
                str(caches["fp16"]),
                "--compare",
                str(caches["fp16"]),
                "--model",
                str(kl_model),
                "--sample",
                "2",
                "--decode-on",
                "driver",
            ]
        )
        == 0
    )
    assert "psnr_between: mean inf" in capsys.readouterr().out
    c = json.loads((caches["fp16"] / "__latentcache__" / "audit" / "summary.json").read_text())["compare"]
    assert all(r["latent_rel_l2"] == 0.0 and r["psnr_between"] == "inf" for r in c["per_key"])
