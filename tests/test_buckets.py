"""Aspect-ratio buckets, random crops, flipped latents and SDXL micro-conditioning metadata.

Unit tests call the Ray-free functions directly; the end-to-end tests run `latentcache encode`
through the CLI on the session's local Ray and compare every stored latent with a direct
diffusers encoding of the same crop, rebuilt with the same preprocess functions.
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import AutoencoderKL

from latentcache.buckets import BucketPlanner, generate_buckets, nearest_bucket, preprocess_bucketed, same_ratio_fit
from latentcache.encode import FLIP_SUFFIX, EncodeSpec, LatentEncoder, group_by_shape, per_key_noise
from latentcache.models import ModelSpec
from latentcache.preprocess import PreprocessSpec, preprocess_image
from latentcache.rows import RAW_SCHEMA, TENSOR_COLUMNS
from latentcache.samples import encode_image, natural_image, write_tar
from latentcache.seeding import crop_rng

from .helpers import encode, manifest

SPEC = PreprocessSpec(resolution=64)
# --bucket-area 64x64 --bucket-step 16 --bucket-min 32 --bucket-max 128
GENERATED = [(128, 32), (112, 32), (96, 32), (80, 48), (64, 64), (48, 80), (32, 96), (32, 112), (32, 128)]
BUCKET_FLAGS = dict(resolution=64, buckets=True, bucket_step=16, bucket_min=32, bucket_max=128)
# image (height, width) -> the bucket it must land in
EXPECTED = {
    (64, 64): (64, 64),
    (100, 100): (64, 64),
    (70, 80): (64, 64),
    (60, 100): (48, 80),
    (48, 96): (48, 80),
    (100, 60): (80, 48),
    (40, 120): (32, 96),
    (30, 100): (32, 112),
    (30, 120): (32, 128),
    (20, 200): (32, 128),
    (120, 40): (96, 32),
    (200, 20): (128, 32),
    (90, 30): (96, 32),
}


# ---- the bucket set and the nearest bucket ----------------------------------------------------


def test_generated_set_is_kohyas_within_area_and_sides():
    assert generate_buckets(64 * 64, step=16, min_side=32, max_side=128) == GENERATED
    sdxl = generate_buckets(1024 * 1024, step=64, min_side=512, max_side=2048)
    assert {(1024, 1024), (832, 1216), (1216, 832), (768, 1344), (896, 1152), (640, 1536)} <= set(sdxl)
    for h, w in sdxl:
        assert h % 64 == 0 and w % 64 == 0 and 512 <= min(h, w) and max(h, w) <= 2048 and h * w <= 1024 * 1024
        assert (w, h) in sdxl


@pytest.mark.parametrize("size, bucket", sorted(EXPECTED.items()))
def test_images_of_many_aspect_ratios_land_in_the_expected_bucket(size, bucket):
    assert nearest_bucket(*size, GENERATED) == bucket
    assert nearest_bucket(size[1], size[0], GENERATED) == bucket[::-1]  # log distance is symmetric


def test_nearest_bucket_is_the_minimum_log_ratio_distance():
    for h, w in itertools.product(range(16, 400, 23), repeat=2):
        chosen = nearest_bucket(h, w, GENERATED)
        best = min(abs(math.log(b[0] / b[1]) - math.log(h / w)) for b in GENERATED)
        assert abs(math.log(chosen[0] / chosen[1]) - math.log(h / w)) == best


def test_same_ratio_ties_go_to_the_closest_area():
    buckets = [(512, 512), (1024, 1024), (832, 1216)]
    assert nearest_bucket(600, 600, buckets) == (512, 512)
    assert nearest_bucket(2000, 2000, buckets) == (1024, 1024)


# ---- the no-upscale rule ----------------------------------------------------------------------


@pytest.mark.parametrize("bucket", [(1024, 1024), (832, 1216), (768, 1344), (64, 64), (48, 80)])
def test_no_upscale_picks_the_largest_same_ratio_bucket_inside_the_image(bucket):
    bh, bw = bucket
    for h, w in itertools.product(range(40, 1500, 37), repeat=2):
        fit = same_ratio_fit(bucket, h, w)
        if h >= bh and w >= bw:
            assert fit == bucket
            continue
        assert fit[0] * bw == fit[1] * bh and fit[0] % 16 == 0 and fit[1] % 16 == 0  # same ratio exactly
        unit = (bh // math.gcd(bh, bw) * 16, bw // math.gcd(bh, bw) * 16)
        if h >= unit[0] and w >= unit[1]:
            assert fit[0] <= h and fit[1] <= w  # no upscaling
            assert fit[0] + unit[0] > h or fit[1] + unit[1] > w  # and the largest such
        else:
            assert fit == unit  # smaller than any same-ratio size: the least upscaling


def test_no_upscale_planner_never_enlarges_the_image():
    planner = BucketPlanner(buckets=tuple(GENERATED), no_upscale=True)
    rng = np.random.default_rng(0)
    for h, w in [(40, 40), (50, 90), (90, 50), (100, 100), (33, 129), (200, 64)]:
        data = encode_image(natural_image(rng, h, w), "png")
        pixels, meta = preprocess_image(data, SPEC, key="k", planner=planner)
        resized_w = meta.crop_left + meta.bucket_width + meta.crop_left_flipped
        assert (meta.bucket_height, meta.bucket_width) == pixels.shape[1:]
        assert resized_w <= w and meta.bucket_height <= h, (h, w, meta)
    _, meta = preprocess_image(encode_image(natural_image(rng, 100, 100), "png"), SPEC, planner=planner)
    assert (meta.bucket_height, meta.bucket_width) == (64, 64)  # large enough: its own bucket


# ---- crops: SDXL meaning, reproducibility -----------------------------------------------------


def raw_table(images: dict[str, bytes], shard: str = "s0") -> pa.Table:
    rows = [{"key": k, "shard": shard, "index": i, "image": v, "caption": k} for i, (k, v) in enumerate(images.items())]
    rows.append({"shard": shard, "index": len(images), "shard_rows": len(images), "shard_status": "ok"})
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


@pytest.fixture(scope="module")
def varied_images() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    return {f"k{i:02d}": encode_image(natural_image(rng, h, w), "png") for i, (h, w) in enumerate(EXPECTED)}


def test_crop_coords_mean_offsets_in_the_resized_image(varied_images):
    from PIL import Image

    planner = BucketPlanner(buckets=tuple(GENERATED), crop="random", seed=5)
    for key, data in varied_images.items():
        pixels, meta = preprocess_image(data, SPEC, key=key, planner=planner)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        assert (meta.original_height, meta.original_width) == (img.height, img.width)
        scale = max(meta.bucket_height / img.height, meta.bucket_width / img.width)
        new_w, new_h = (
            max(meta.bucket_width, round(img.width * scale)),
            max(meta.bucket_height, round(img.height * scale)),
        )
        resized = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None))
        crop = resized[
            meta.crop_top : meta.crop_top + meta.bucket_height, meta.crop_left : meta.crop_left + meta.bucket_width
        ]
        np.testing.assert_array_equal(pixels.transpose(1, 2, 0), crop)
        flipped_crop = resized[:, ::-1][
            meta.crop_top : meta.crop_top + meta.bucket_height,
            meta.crop_left_flipped : meta.crop_left_flipped + meta.bucket_width,
        ]
        np.testing.assert_array_equal(pixels[:, :, ::-1].transpose(1, 2, 0), flipped_crop)


def test_random_crops_are_per_key_and_independent_of_batching(varied_images):
    planner = BucketPlanner(buckets=tuple(GENERATED), crop="random", seed=5)
    whole = preprocess_bucketed(raw_table(varied_images), SPEC, planner)
    items = list(varied_images.items())
    parts = [preprocess_bucketed(raw_table(dict(items[i : i + 3])), SPEC, planner) for i in range(0, len(items), 3)]
    cols = ("key", "crop_top", "crop_left", "bucket_height", "bucket_width", "pixels")

    def by_key(table):
        return {r["key"]: r for r in table.select(list(cols)).to_pylist() if r["key"] is not None}

    assert by_key(whole) == {k: v for p in parts for k, v in by_key(p).items()}
    center = by_key(preprocess_bucketed(raw_table(varied_images), SPEC, BucketPlanner(buckets=tuple(GENERATED))))
    moved = [
        k
        for k, r in by_key(whole).items()
        if (r["crop_top"], r["crop_left"]) != (center[k]["crop_top"], center[k]["crop_left"])
    ]
    assert len(moved) >= 3  # random crops really move (where the resized image has room)
    other_seed = by_key(
        preprocess_bucketed(
            raw_table(varied_images), SPEC, BucketPlanner(buckets=tuple(GENERATED), crop="random", seed=6)
        )
    )
    assert any(
        other_seed[k]["crop_left"] != r["crop_left"] or other_seed[k]["crop_top"] != r["crop_top"]
        for k, r in by_key(whole).items()
    )
    assert crop_rng(5, "a").integers(1 << 30) == crop_rng(5, "a").integers(1 << 30)


# ---- encoder batches hold one shape -----------------------------------------------------------


def test_group_by_shape_never_mixes_shapes_and_keeps_every_good_row(varied_images):
    planner = BucketPlanner(buckets=tuple(GENERATED))
    table = preprocess_bucketed(raw_table({**varied_images, "bad": b"nope"}), SPEC, planner)
    groups = group_by_shape(table)
    heights, widths = table.column("height").to_pylist(), table.column("width").to_pylist()
    for rows in groups:
        assert len({(heights[i], widths[i]) for i in rows}) == 1
    assert len({(heights[g[0]], widths[g[0]]) for g in groups}) == len(groups)  # one group per shape
    flat = sorted(i for g in groups for i in g)
    good = [
        i
        for i, (k, e) in enumerate(zip(table.column("key").to_pylist(), table.column("error").to_pylist()))
        if k is not None and e is None
    ]
    assert flat == good and len(good) == len(varied_images)


def test_sort_by_shape_keeps_shapes_contiguous_and_markers_last(varied_images):
    raw = raw_table({**varied_images, "bad": b"nope"})
    table = preprocess_bucketed(raw, SPEC, BucketPlanner(buckets=tuple(GENERATED)))
    shapes = [(h, w) for h, w in zip(table.column("height").to_pylist(), table.column("width").to_pylist())]
    good = [s for s in shapes if s[0] is not None]
    assert len(good) == len(varied_images) and shapes[-2:] == [(None, None)] * 2  # error and marker rows last
    runs = [s for s, _ in itertools.groupby(good)]
    assert len(runs) == len(set(good))  # each shape in one contiguous run


def test_encoder_runs_one_forward_per_shape_with_flips_in_the_same_pass(kl_model, varied_images):
    planner = BucketPlanner(buckets=tuple(GENERATED), crop="random", seed=1)
    table = preprocess_bucketed(raw_table(varied_images), SPEC, planner)
    encoder = LatentEncoder(
        model=ModelSpec(model=str(kl_model)),
        spec=EncodeSpec(flip="both", posterior="sample", seed=4, store_dtype="fp32"),
    )
    calls: list[tuple[int, ...]] = []
    encoder.vae.encoder.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    out = encoder(table)
    shapes = collections.Counter(
        (h, w) for h, w in zip(table.column("height").to_pylist(), table.column("width").to_pylist()) if h is not None
    )
    assert sorted(calls) == sorted((2 * n, 3, h, w) for (h, w), n in shapes.items())  # image + its mirror, one call
    # the flipped crop's sample uses its own per-key noise (key + "#flip"), as deterministic as the key's
    vae = AutoencoderKL.from_pretrained(kl_model).eval()
    keys = out.column("key").to_pylist()
    for i, key in enumerate(keys):
        if key is None:
            continue
        h, w = out.column("bucket_height")[i].as_py(), out.column("bucket_width")[i].as_py()
        x = torch.from_numpy(np.frombuffer(table.column("pixels")[i].as_buffer(), np.uint8).reshape(1, 3, h, w).copy())
        with torch.no_grad():
            dist = vae.encode(x.flip(-1).float() / 127.5 - 1).latent_dist
        noise = per_key_noise([key + FLIP_SUFFIX], tuple(dist.mean.shape[1:]), seed=4)
        expected = (dist.mean + dist.std * noise) * vae.config.scaling_factor
        stored = np.frombuffer(out.column("latent_flipped")[i].as_py(), np.float32).reshape(expected.shape)
        np.testing.assert_allclose(stored, expected.numpy(), atol=1e-5, rtol=0)
        unflipped = np.frombuffer(out.column("latent")[i].as_py(), np.float32)
        assert not np.allclose(unflipped.reshape(expected.shape), np.flip(stored, -1), atol=1e-3)


# ---- end to end through the CLI ---------------------------------------------------------------


@pytest.fixture(scope="module")
def varied_shards(tmp_path_factory, varied_images) -> tuple[str, dict[str, bytes]]:
    """Two shards of PNGs with the aspect ratios of EXPECTED (and a corrupt one)."""
    folder = tmp_path_factory.mktemp("varied")
    items = list(varied_images.items())
    write_tar(folder / "shard-00000.tar", [(f"{k}.png", v) for k, v in items[:7]] + [("bad.png", b"nope")])
    write_tar(folder / "shard-00001.tar", [(f"{k}.png", v) for k, v in items[7:]])
    return str(folder / "shard-{00000..00001}.tar"), varied_images


VARIED_RUN = dict(crop="random", flip="both", seed=5, store_dtype="fp32", **BUCKET_FLAGS)


def encode_varied(varied_shards: tuple[str, dict[str, bytes]], output: Path, model: Path, **flags: object) -> int:
    """The bucketed, random-crop, flipped encode of the varied shards that every cache here is made with."""
    return encode(input=varied_shards[0], output=output, model=model, **{**VARIED_RUN, **flags})


@pytest.fixture(scope="module")
def bucket_cache(ray_session, kl_model, varied_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bucketed") / "out"
    assert encode_varied(varied_shards, out, kl_model, batch_size=3) == 0
    return out


def cache_rows(out: Path) -> dict[str, dict]:
    """key -> row (metadata plus latent arrays), over every part the shard records name, with its
    path (relative to the cache) as `file` and `group` (its shard folder and bucket tag)."""
    from latentcache.reader import Cache
    from latentcache.sinks import column_to_numpy

    rows = {}
    for file in Cache(str(out)).files:
        table = pq.read_table(Path(out) / file.path)
        tensors = {n: column_to_numpy(table.column(n)) for n in TENSOR_COLUMNS if n in table.column_names}
        group = (str(Path(file.path).parent), Path(file.path).name.split("-")[1])
        for i, row in enumerate(table.drop_columns(list(tensors)).to_pylist()):
            rows[row["key"]] = {**row, **{n: t[i] for n, t in tensors.items()}, "file": file.path, "group": group}
    return rows


def test_rows_carry_bucket_and_sdxl_metadata(bucket_cache, varied_shards):
    rows = cache_rows(bucket_cache)
    _, images = varied_shards
    assert sorted(rows) == sorted(images)
    for key, (size, bucket) in zip(images, EXPECTED.items()):
        row = rows[key]
        assert (row["original_height"], row["original_width"]) == size
        assert (row["bucket_height"], row["bucket_width"]) == bucket
        assert Path(row["file"]).name.startswith(f"part-{bucket[0]}x{bucket[1]}-")  # parts are per (shard, bucket)
        assert row["latent"].shape == (4, bucket[0] // 8, bucket[1] // 8) == row["latent_flipped"].shape
    m = manifest(bucket_cache)
    assert m["counts"] == {"input": 14, "written": 13, "failed": 1, "fp32_fallback": 0}
    assert m["preprocess"]["buckets"] == [list(b) for b in GENERATED] and m["preprocess"]["crop"] == "random"
    for record in m["shards"].values():  # every file holds one latent shape, named after its bucket
        for f in record["files"]:
            assert len({v.shape for v in (r["latent"] for r in rows.values() if r["file"] == f["path"])}) == 1


def test_latents_equal_direct_diffusers_encoding_of_the_same_crop(bucket_cache, varied_shards, kl_model):
    vae = AutoencoderKL.from_pretrained(kl_model).eval()
    planner = BucketPlanner(buckets=tuple(GENERATED), crop="random", seed=5)
    for key, row in cache_rows(bucket_cache).items():
        pixels, meta = preprocess_image(varied_shards[1][key], SPEC, key=key, planner=planner)
        assert {n: row[n] for n in meta.__dict__} == meta.__dict__
        x = torch.from_numpy(pixels).unsqueeze(0).float() / 127.5 - 1.0
        with torch.no_grad():
            direct = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist.mode() * vae.config.scaling_factor
        np.testing.assert_allclose(row["latent"], direct[0].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(row["latent_flipped"], direct[1].numpy(), atol=1e-5, rtol=0)


def test_sdxl_time_ids_as_docs_build_them(bucket_cache):
    """The trainer recipe of the README: one file = one bucket = one batch shape."""
    from latentcache.reader import Cache

    cache = Cache(str(bucket_cache))
    rows = cache_rows(bucket_cache)
    for file in cache.files:
        block = cache.read(file)
        m = {k: torch.tensor(v) for k, v in block.meta.items() if k not in ("key", "shard", "caption")}
        flip = torch.arange(len(block.keys)) % 2 == 1
        latents = torch.where(
            flip[:, None, None, None],
            torch.tensor(block.tensors["latent_flipped"]),
            torch.tensor(block.tensors["latent"]),
        )
        crop_left = torch.where(flip, m["crop_left_flipped"], m["crop_left"])
        time_ids = torch.stack(
            [
                m["original_height"],
                m["original_width"],
                m["crop_top"],
                crop_left,
                m["bucket_height"],
                m["bucket_width"],
            ],
            dim=1,
        ).float()
        for i, key in enumerate(block.keys):
            row = rows[key]
            expected_left = row["crop_left_flipped"] if flip[i] else row["crop_left"]
            assert time_ids[i].tolist() == [
                row["original_height"],
                row["original_width"],
                row["crop_top"],
                expected_left,
                row["bucket_height"],
                row["bucket_width"],
            ]
            np.testing.assert_array_equal(latents[i].numpy(), row["latent_flipped" if flip[i] else "latent"])


def test_stats_merge_across_buckets(bucket_cache):
    stats = json.loads((bucket_cache / "__latentcache__" / "stats.json").read_text())
    raw = np.concatenate([r["latent"].reshape(4, -1) for r in cache_rows(bucket_cache).values()], axis=1)
    raw = raw.astype(np.float64) / stats["latent_space"]["scaling_factor"]
    np.testing.assert_allclose(stats["channel_mean"], raw.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(stats["channel_std"], raw.std(axis=1), rtol=1e-9)


def test_reruns_and_batch_sizes_agree_and_nested_layout_loads_per_bucket(
    bucket_cache, ray_session, kl_model, varied_shards, tmp_path
):
    import datasets

    from latentcache.reader import Cache

    out = tmp_path / "nested"
    assert encode_varied(varied_shards, out, kl_model, batch_size=7, tensor_layout="nested") == 0
    first, second = cache_rows(bucket_cache), cache_rows(out)
    assert first.keys() == second.keys()
    for key in first:
        for name in ("crop_top", "crop_left", "bucket_height", "bucket_width", "group"):
            assert first[key][name] == second[key][name]
        np.testing.assert_allclose(first[key]["latent"], second[key]["latent"], atol=1e-5, rtol=0)
    # Hugging Face datasets: one dataset per bucket (as the README shows), each of one shape
    by_bucket: dict[str, list[str]] = {}
    for file in Cache(str(out)).files:
        by_bucket.setdefault(Path(file.path).name.split("-")[1], []).append(str(out / file.path))
    splits = {
        bucket: datasets.load_dataset("parquet", data_files=paths, split="train").with_format("torch")
        for bucket, paths in by_bucket.items()
    }
    assert sorted(splits) == sorted(f"{h}x{w}" for h, w in set(EXPECTED.values()))
    assert sum(len(split) for split in splits.values()) == len(second)
    for bucket, split in splits.items():
        h, w = map(int, bucket.split("x"))
        batch = split[:]
        assert tuple(batch["latent"].shape) == (len(split), 4, h // 8, w // 8) == tuple(batch["latent_flipped"].shape)
        assert batch["bucket_height"].eq(h).all() and batch["bucket_width"].eq(w).all()


def test_yaml_bucket_list_no_upscale_and_safetensors_stack_per_bucket(ray_session, kl_model, varied_shards, tmp_path):
    from safetensors.numpy import load_file

    from latentcache.cli import main
    from latentcache.reader import Cache

    config = tmp_path / "run.yaml"
    out = tmp_path / "st"
    config.write_text(
        f"input: '{varied_shards[0]}'\noutput: {out}\nmodel: {kl_model}\nformat: safetensors\n"
        "buckets: [[64, 64], [48, 80], [80, 48], [32, 128], [128, 32]]\nbucket-no-upscale: true\n"
    )
    assert main(["encode", "--quiet", "--config", str(config)]) == 0
    cache = Cache(str(out))
    listed = tuple(tuple(b) for b in manifest(out)["preprocess"]["buckets"])
    seen, shrunk = 0, 0
    for file in cache.files:
        loaded = load_file(out / file.path)
        block = cache.read(file)
        assert loaded["latent"].shape == (file.rows, *file.latent_shape)  # one stacked tensor per (shard, bucket)
        heights, widths = set(block.meta["bucket_height"]), set(block.meta["bucket_width"])
        assert len(heights) == len(widths) == 1 and file.path.endswith(".safetensors")
        assert Path(file.path).name.startswith(f"part-{heights.pop()}x{widths.pop()}-")
        for h, w, bh, bw in zip(
            block.meta["original_height"],
            block.meta["original_width"],
            block.meta["bucket_height"],
            block.meta["bucket_width"],
        ):
            assert (bh, bw) == same_ratio_fit(nearest_bucket(h, w, listed), h, w)
            shrunk += (bh, bw) != nearest_bucket(h, w, listed)
            seen += 1
    assert seen == 13 and shrunk >= 3  # (30, 100), (40, 120), (20, 200) got 16x64 instead of 32x128


def test_bucket_settings_are_part_of_the_cache_identity(bucket_cache, kl_model, varied_shards, capsys):
    assert encode_varied(varied_shards, bucket_cache, kl_model, bucket_step=32) == 2
    assert "different preprocess" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(buckets=True, bucket_area="64by64"), "--bucket-area must look like"),
        (dict(buckets=True, bucket_step=12), "--bucket-step must be a positive multiple of 8"),
        (dict(buckets=True, bucket_min=256, bucket_max=128), "larger than --bucket-max"),
        (dict(buckets=True, bucket_min=40, bucket_step=16), "--bucket-min must be a positive multiple"),
        (dict(bucket_area="64x64"), "--bucket-area needs --buckets"),
    ],
)
def test_bad_bucket_flags_are_one_line_errors(flags, message, capsys, tmp_path, kl_model):
    assert encode(input=tmp_path / "x.tar", output=tmp_path / "o", model=kl_model, **flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.parametrize(
    "value, message",
    [("[[64, 60]]", "multiples of 8"), ("[]", "empty"), ("[[64]]", "[height, width]"), ("yes please", "expected bool")],
)
def test_bad_yaml_bucket_lists_are_one_line_errors(value, message, capsys, tmp_path):
    from latentcache.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(f"input: x.tar\noutput: {tmp_path / 'o'}\nmodel: m\nbuckets: {value}\n")
    assert main(["encode", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
