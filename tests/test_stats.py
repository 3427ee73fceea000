"""`latentcache stats`: exactness, the bootstrap interval, both modes, conventions, sampling, the plot."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from latentcache.cli import main
from latentcache.latent_space import LatentSpace
from latentcache.reader import Cache
from latentcache.rows import ENCODED_SCHEMA
from latentcache.samples import make_shards
from latentcache.seeding import per_key_noise, row_priority
from latentcache.stats import Moments, merge_all
from latentcache.stats.bootstrap import bootstrap_interval, resampled
from latentcache.stats.partials import Accumulator, Partial, block_partials

from .helpers import encode

SHIFT = 0.25
MEAN, STD = [0.1, -0.2, 0.3, 0.0], [0.5, 0.8, 1.5, 0.3]


def stats(tmp_path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert main(["stats", "-q", "--output", str(out), *args]) == 0
    return json.loads(out.read_text())


def raw_of(cache_dir, column: str = "latent") -> tuple[np.ndarray, list[str], list[str]]:
    """Every raw latent of a cache, with keys and shards, straight from numpy (no statistics code)."""
    cache = Cache(str(cache_dir))
    blocks = list(cache.blocks())
    raw = np.concatenate([cache.space.to_raw(b.tensors[column].astype(np.float64)) for b in blocks])
    return raw, sum((b.keys for b in blocks), []), sum((b.meta["shard"] for b in blocks), [])


def assert_matches(doc: dict, raw: np.ndarray, rtol: float) -> None:
    # a mean near zero has no meaningful relative error: measure it against the data's spread
    scale = rtol * raw.std()
    np.testing.assert_allclose(doc["channel_mean"], raw.mean(axis=(0, 2, 3)), rtol=rtol, atol=scale)
    np.testing.assert_allclose(doc["channel_std"], raw.std(axis=(0, 2, 3)), rtol=rtol)
    assert doc["mean"] == pytest.approx(raw.mean(), rel=rtol, abs=scale)
    assert doc["std"] == pytest.approx(raw.std(), rel=rtol)
    assert doc["suggested"]["scaling_factor"] == pytest.approx(1 / raw.std(), rel=rtol)
    assert doc["count"] == raw.size and doc["images"] == len(raw)


# ---- exactness of the map stage and the merge, no Ray ----------------------------------------


def encoded_table(stored: np.ndarray, shards: list[str], start: int) -> pa.Table:
    rows = [
        {
            "key": f"k{start + i}",
            "shard": shards[i],
            "index": start + i,
            "latent": stored[i].tobytes(),
            "latent_shape": list(stored.shape[1:]),
            "store_dtype": "fp32",
        }
        for i in range(len(stored))
    ]
    return pa.Table.from_pylist(rows, schema=ENCODED_SCHEMA)


def merged(stored: np.ndarray, shards: list[str], cuts: list[int], space: LatentSpace, order: list[int]) -> Accumulator:
    acc = Accumulator(head=5, sample_size=100, rank={"a": 0, "b": 1})
    bounds = list(zip([0, *cuts], [*cuts, len(stored)]))
    for lo, hi in (bounds[i] for i in order):
        table = block_partials(
            encoded_table(stored[lo:hi], shards[lo:hi], lo), space=space.to_dict(), head=5, sample_size=100, seed=0
        )
        for row in table.to_pylist():
            acc.add(Partial.from_row(row))
    return acc


def test_map_stage_is_exact_against_numpy_for_two_partitionings():
    rng = np.random.default_rng(0)
    # A large offset and small spread per channel: naive sum-of-squares would lose digits here.
    raw = rng.normal(size=(60, 4, 8, 8)) * [[[0.02]], [[0.5]], [[3.0]], [[0.1]]] + [[[40.0]], [[-3]], [[0]], [[7]]]
    space = LatentSpace(convention="shift_scale", scaling_factor=0.3, shift_factor=1.5)
    stored = space.to_model(raw).astype(np.float32)
    expected = space.to_raw(stored.astype(np.float64))
    shards = ["a" if i % 3 else "b" for i in range(60)]
    first = merged(stored, shards, [7, 14, 21, 28, 35, 42, 49, 56], space, order=list(range(9)))
    second = merged(stored, shards, [1, 30, 31, 59], space, order=[4, 2, 0, 3, 1])
    for acc in (first, second):
        total = acc.total()
        np.testing.assert_allclose(total.mean, expected.mean(axis=(0, 2, 3)), rtol=1e-9)
        np.testing.assert_allclose(total.std(), expected.std(axis=(0, 2, 3)), rtol=1e-9)
        pooled = total.pooled()
        assert pooled.mean[0] == pytest.approx(expected.mean(), rel=1e-9)
        assert pooled.std()[0] == pytest.approx(expected.std(), rel=1e-9)
        assert acc.rows == 60 and int(pooled.count[0]) == expected.size
        # the first batch is the first rows of the first shard, whatever order blocks arrived in
        first_rows = [i for i in range(60) if shards[i] == "a"][:5]
        np.testing.assert_allclose(
            merge_all(m for _, m in acc.head).mean, expected[first_rows].mean(axis=(0, 2, 3)), rtol=1e-9
        )
    assert sorted(first.units) == ["a", "b"]


def test_resampled_merge_equals_chan_merge_of_the_same_units():
    rng = np.random.default_rng(1)
    units = [Moments.of(rng.normal(3 + i, 1 + i / 10, size=(5, 2, 4, 4))).pooled() for i in range(6)]
    idx = np.array([0, 0, 3, 5, 5, 5])
    centre = 4.0
    n, offset, m2 = resampled(
        np.array([u.count[0] for u in units], float)[idx],
        np.array([u.mean[0] for u in units])[idx] - centre,
        np.array([u.m2[0] for u in units])[idx],
    )
    expected = merge_all(units[i] for i in idx)
    assert n == expected.count[0]
    assert centre + offset == pytest.approx(expected.mean[0], rel=1e-12)
    assert m2 == pytest.approx(expected.m2[0], rel=1e-9)


def synthetic_population(units: int = 400) -> list[Moments]:
    """Shards that differ from each other (their own mean and spread), as real shards do, so a
    sample of shards really is uncertain about the corpus-wide std."""
    rng = np.random.default_rng(7)
    return [Moments.of(rng.normal(rng.normal(0, 0.3), rng.lognormal(0, 0.35), size=(8, 4, 4, 4))) for _ in range(units)]


def test_bootstrap_interval_on_a_subsample_contains_the_full_corpus_value():
    population = synthetic_population()
    full = 1 / merge_all(population).pooled().std()[0]
    per_unit = [1 / u.pooled().std()[0] for u in population]
    rng = np.random.default_rng(3)
    hits, widths, estimates = 0, [], []
    for trial in range(100):
        subsample = [population[i] for i in rng.choice(len(population), 50, replace=False)]
        interval = bootstrap_interval(subsample, replicates=300, confidence=0.95, seed=trial)
        lo, hi = interval["scaling_factor"]
        estimates.append(1 / merge_all(subsample).pooled().std()[0])
        assert lo < estimates[-1] < hi
        hits += lo <= full <= hi
        widths.append(hi - lo)
    # The subsample estimates really scatter around the full value (containment is not automatic) ...
    spread = np.std(estimates)
    assert spread > 0.01 * full
    # ... and the interval has the width that scatter calls for: nominal 95% is about +-1.96 sd.
    assert 0.6 < np.median(widths) / (2 * 1.96 * spread) < 1.6
    assert 0.85 <= hits / 100 <= 1.0
    assert np.median(widths) < (max(per_unit) - min(per_unit)) / 5
    one = bootstrap_interval(population[:50], replicates=1000, confidence=0.95, seed=0)
    assert one["scaling_factor"][0] <= full <= one["scaling_factor"][1] and one["units"] == 50


def test_bootstrap_needs_two_units():
    assert bootstrap_interval(synthetic_population(1), replicates=100, confidence=0.95, seed=0) is None


# ---- end to end: caches and corpora on a real Ray --------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stats_shards")
    make_shards(folder, shards=3, per_shard=5, size=(72, 88), seed=5)
    return str(folder / "shard-{00000..00002}.tar")


@pytest.fixture(scope="module")
def caches(ray_session, kl_model, corpus, tmp_path_factory):
    """The same corpus under the three conventions (and both file formats)."""
    root = tmp_path_factory.mktemp("stats_caches")
    common = dict(input=corpus, model=kl_model, resolution=64, store_dtype="fp32", batch_size=4)
    assert encode(output=root / "scale", store_posterior=True, **common) == 0
    assert encode(output=root / "shift", shift_factor=SHIFT, tensor_layout="nested", **common) == 0
    assert encode(output=root / "per_channel", latents_mean=MEAN, latents_std=STD, format="safetensors", **common) == 0
    return {name: root / name for name in ("scale", "shift", "per_channel")}


@pytest.fixture(scope="module")
def cache_doc(caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache_doc")
    doc = stats(out, "scale", "--cache", str(caches["scale"]), "--plot", str(out / "stats.png"), "--batch-size", "4")
    return doc, out / "stats.png"


def test_cache_mode_is_exact_against_numpy(cache_doc, caches):
    doc, _ = cache_doc
    raw, _, _ = raw_of(caches["scale"])
    assert_matches(doc, raw, rtol=1e-9)
    assert doc["mode"] == "cache" and doc["posterior"] == "mode" and doc["errors"] == 0
    assert doc["current_latent_space"]["scaling_factor"] == pytest.approx(0.18215)
    assert doc["moments"]["count"] == [raw[:, 0].size] * 4


def test_document_has_interval_first_batch_and_working_config_fragments(cache_doc, caches):
    doc, _ = cache_doc
    raw, _, _ = raw_of(caches["scale"])
    ci = doc["confidence_interval"]
    assert ci["units"] == 3 and ci["replicates"] == 1000 and ci["level"] == 0.95
    assert ci["scaling_factor"][0] <= doc["suggested"]["scaling_factor"] <= ci["scaling_factor"][1]
    first = raw[:4]  # --batch-size 4: the first four rows in shard order
    assert doc["first_batch"]["images"] == 4
    assert doc["first_batch"]["scaling_factor"] == pytest.approx(1 / first.std(), rel=1e-9)
    assert doc["first_batch"]["relative_difference"] == pytest.approx(raw.std() / first.std() - 1, rel=1e-6)
    # each fragment, applied as diffusers applies it, standardises the raw latents
    for name, fragment in doc["diffusers_config"].items():
        model_ready = LatentSpace.from_model_config(fragment).to_model(raw)
        axes = (0, 2, 3) if name == "per_channel" else None
        np.testing.assert_allclose(model_ready.std(axis=axes), 1.0, rtol=1e-9)
        if name != "scale":
            np.testing.assert_allclose(model_ready.mean(axis=axes), 0.0, atol=1e-9)


def test_plot_is_a_valid_png(cache_doc):
    _, png = cache_doc
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 200 and img.height > 100
        img.verify()


def test_shift_and_per_channel_caches_are_unscaled(cache_doc, caches, tmp_path):
    reference, _ = cache_doc
    for name, convention in (("shift", "shift_scale"), ("per_channel", "per_channel")):
        doc = stats(tmp_path, name, "--cache", str(caches[name]))
        assert doc["current_latent_space"]["convention"] == convention
        assert_matches(doc, raw_of(caches[name])[0], rtol=1e-9)
        # the same raw latents as the plain cache, up to float32 storage rounding
        np.testing.assert_allclose(doc["channel_mean"], reference["channel_mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(doc["channel_std"], reference["channel_std"], rtol=1e-5)
        # undoing only the scaling_factor (ignoring the shift or per-channel terms) would be far off
        stored = np.concatenate([b.tensors["latent"] for b in Cache(str(caches[name])).blocks()]).astype(np.float64)
        naive = stored.mean(axis=(0, 2, 3)) / doc["current_latent_space"]["scaling_factor"]
        assert np.abs(naive - np.array(doc["channel_mean"])).max() > 0.2


def test_cache_mode_reads_and_writes_object_storage(cache_doc, caches, s3, capsys):
    from latentcache import storage

    bucket, options = s3
    fs, path = storage.url_to_fs(f"s3://{bucket}/cache", options)
    fs.put(str(caches["scale"]) + "/", path, recursive=True)
    assert (
        main(
            [
                "stats",
                "--cache",
                f"s3://{bucket}/cache",
                "--output",
                f"s3://{bucket}/stats.json",
                "--batch-size",
                "4",
                "--plot",
                f"s3://{bucket}/stats.png",
                "--storage-options",
                json.dumps(options),
            ]
        )
        == 0
    )
    doc = json.loads(storage.read_bytes(f"s3://{bucket}/stats.json", options))
    reference, _ = cache_doc
    for name in ("channel_mean", "channel_std", "suggested", "confidence_interval", "first_batch"):
        assert doc[name] == reference[name]
    assert storage.read_bytes(f"s3://{bucket}/stats.png", options)[:8] == b"\x89PNG\r\n\x1a\n"
    assert options["secret"] not in capsys.readouterr().out + json.dumps(doc)


def test_corpus_mode_agrees_with_cache_mode(ray_session, kl_model, corpus, caches, tmp_path):
    doc = stats(
        tmp_path,
        "corpus",
        "--input",
        corpus,
        "--model",
        str(kl_model),
        "--resolution",
        "64",
        "--rows-per-block",
        "2",
        "--batch-size",
        "3",
    )
    raw, _, _ = raw_of(caches["scale"])
    assert doc["mode"] == "corpus" and doc["sampling"]["method"] == "all rows" and doc["shards"] == 3
    assert_matches(doc, raw, rtol=1e-6)
    assert doc["confidence_interval"]["units"] == 3 and doc["first_batch"]["images"] == 3


def test_max_samples_is_a_uniform_sample_over_all_shards(ray_session, kl_model, corpus, caches, tmp_path):
    # 6 rows from shards of 5: the sample spans shards whatever the (path-dependent) priorities are
    doc = stats(
        tmp_path,
        "max",
        "--input",
        corpus,
        "--model",
        str(kl_model),
        "--resolution",
        "64",
        "--max-samples",
        "6",
        "--seed",
        "11",
    )
    raw, keys, shards = raw_of(caches["scale"])
    u = np.array([row_priority(11, s, k) for s, k in zip(shards, keys)])
    chosen = np.argsort(u)[:6]
    assert max(shards.count(s) for s in set(shards)) < 6 and len({shards[i] for i in chosen}) > 1
    assert doc["images"] == 6 and doc["sampling"]["max_samples"] == 6
    assert_matches(doc, raw[np.sort(chosen)], rtol=1e-6)


def test_sample_fraction_and_posterior_sample(ray_session, kl_model, corpus, caches, tmp_path):
    doc = stats(
        tmp_path,
        "fraction",
        "--input",
        corpus,
        "--model",
        str(kl_model),
        "--resolution",
        "64",
        "--sample-fraction",
        "0.6",
        "--posterior",
        "sample",
        "--seed",
        "2",
    )
    _, keys, shards = raw_of(caches["scale"])
    kept = [i for i, (s, k) in enumerate(zip(shards, keys)) if row_priority(2, s, k) < 0.6]
    assert doc["images"] == len(kept) and 0 < len(kept) < len(keys) and doc["posterior"] == "sample"
    # the cache stored the posterior: cache mode draws the same per-key samples as the encoder does
    from_cache = stats(
        tmp_path, "cache_sample", "--cache", str(caches["scale"]), "--posterior", "sample", "--seed", "2"
    )
    raw_sample = posterior_samples(caches["scale"], seed=2)
    assert from_cache["posterior"] == "sample" and from_cache["std"] > raw_of(caches["scale"])[0].std()
    assert_matches(from_cache, raw_sample, rtol=1e-9)
    assert_matches(doc, raw_sample[kept], rtol=1e-5)  # float32 (encoder) against float64 (here) arithmetic


def posterior_samples(cache_dir, seed: int) -> np.ndarray:
    """mean + std * noise per key, from the stored posterior, with encode's own per-key noise."""
    mean, keys, _ = raw_of(cache_dir, "posterior_mean")
    std = raw_of(cache_dir, "posterior_std")[
        0
    ]  # under the "scale" convention (no offset) to_raw of a std is std / scale
    return mean + std * per_key_noise(keys, mean.shape[1:], seed).numpy()


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "either --cache"),
        (["--input", "x.tar"], "--input needs --model"),
        (["--cache", "nowhere"], "no __latentcache__/manifest.json"),
        (["--cache", "c", "--max-samples", "3"], "apply to a raw corpus"),
        (["--input", "x.tar", "--model", "m", "--sample-fraction", "1.5"], "(0, 1]"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert main(["stats", "-q", "--output", str(tmp_path / "s.json"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_posterior_the_cache_cannot_give_is_refused(caches, capsys, tmp_path):
    assert (
        main(
            [
                "stats",
                "-q",
                "--cache",
                str(caches["shift"]),
                "--posterior",
                "sample",
                "--output",
                str(tmp_path / "s.json"),
            ]
        )
        == 2
    )
    assert "--store-posterior" in capsys.readouterr().err
