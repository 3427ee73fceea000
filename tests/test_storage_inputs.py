"""Object storage and input formats, end to end through `latentcache encode` on a real local Ray.

One small corpus (lossless PNGs of several sizes, captioned, one key in a subfolder) is written
as a WebDataset tar, as a Parquet file of image bytes (Hugging Face `Image` structs, non-default
column names) and as a folder of files; the tar is also uploaded to a loopback S3 (moto). Every
run must give the same keys, captions and latents as the local tar run.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latentcache import storage
from latentcache.cache.layout import META
from latentcache.samples import natural_image, write_tar
from latentcache.sources import plan_shards

from .helpers import encode, latents, manifest, png_bytes, read_cache

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(64, 64), (80, 96), (96, 72), (64, 80), (72, 64), (88, 64)]
RUN = dict(resolution=64, store_dtype="fp32", batch_size=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[bytes, str]]:
    """key -> (PNG bytes, caption), keys in sorted order so every format lists them alike."""
    rng = np.random.default_rng(3)
    keys = [f"img{i:03d}" for i in range(5)] + ["sub/img005"]
    return {k: (png_bytes(np.asarray(natural_image(rng, h, w))), f"caption of {k}") for k, (h, w) in zip(keys, SIZES)}


@pytest.fixture(scope="module")
def inputs(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    members = [m for k, (img, cap) in corpus.items() for m in ((f"{k}.png", img), (f"{k}.txt", cap.encode()))]
    write_tar(root / "tars" / "shard-00000.tar", members)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image() on disk
    table = pa.table(
        {
            "id": list(corpus),
            "jpg": pa.array([{"bytes": img, "path": None} for img, _ in corpus.values()], image_type),
            "text": [cap for _, cap in corpus.values()],
            "url": [f"https://example.com/{k}" for k in corpus],
        }
    )
    (root / "parquet").mkdir()
    pq.write_table(table, root / "parquet" / "laion-part-7.parquet")
    for key, (img, cap) in corpus.items():
        (root / "folder" / key).parent.mkdir(parents=True, exist_ok=True)
        (root / "folder" / f"{key}.png").write_bytes(img)
        (root / "folder" / f"{key}.txt").write_text(cap)
    return {
        "tar": root / "tars" / "shard-00000.tar",
        "parquet": root / "parquet" / "laion-part-7.parquet",
        "folder": root / "folder",
    }


PARQUET_FLAGS = dict(image_column="jpg", key_column="id", caption_column="text")


@pytest.fixture(scope="module")
def tar_cache(ray_session, kl_model, inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tar") / "cache"
    assert encode(input=inputs["tar"], output=out, model=kl_model, **RUN) == 0
    return out


def by_key(table: pa.Table) -> dict[str, tuple[np.ndarray, str]]:
    return {
        k: (lat, cap)
        for k, lat, cap in zip(table.column("key").to_pylist(), latents(table), table.column("caption").to_pylist())
    }


@pytest.mark.parametrize("fmt, name", [("parquet", "laion-part-7"), ("folder", "part-00000")])
def test_parquet_and_folder_inputs_give_the_tar_latents(fmt, name, tar_cache, inputs, corpus, kl_model, tmp_path):
    out = tmp_path / "cache"
    assert (
        encode(input=inputs[fmt], output=out, model=kl_model, **RUN, **(PARQUET_FLAGS if fmt == "parquet" else {})) == 0
    )
    got, want = by_key(read_cache(out)), by_key(read_cache(tar_cache))
    assert sorted(got) == sorted(want) == sorted(corpus)
    for key, (latent, caption) in got.items():
        assert caption == corpus[key][1] == want[key][1]
        np.testing.assert_array_equal(latent, want[key][0])  # same bytes, same batches: same latents
    assert list((out / "data" / name).glob("part-*.parquet"))  # parts under data/<input name>/
    assert manifest(out)["config"]["input_format"] == "auto" and manifest(out)["counts"]["written"] == len(corpus)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({}, "image column 'image' not found; columns are id, jpg, text, url (use --image-column)"),
        ({"image_column": "jpg", "key_column": "uid"}, "key column 'uid' not found (use --key-column)"),
        ({"image_column": "jpg", "caption_column": "caption_text"}, "caption column 'caption_text' not found"),
        ({"image_column": "url"}, "image column 'url' holds string, not image bytes"),
    ],
)
def test_missing_parquet_column_is_one_line_error_before_any_work(flags, message, inputs, kl_model, tmp_path, capsys):
    out = tmp_path / "cache"
    assert encode(input=inputs["parquet"], output=out, model=kl_model, **RUN, **flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentcache: error:") and message in err and "\n" not in err
    assert not out.exists()  # checked on the driver before the output is claimed


def test_auto_format_from_the_url_and_other_fsspec_protocols(inputs):
    assert [s.format for s in plan_shards(str(inputs["tar"]), "auto", {})] == ["webdataset"]
    assert [s.format for s in plan_shards(str(inputs["parquet"].parent), "auto", {})] == ["parquet"]
    assert [(s.format, s.name) for s in plan_shards(str(inputs["folder"]), "auto", {})] == [("folder", "part-00000")]
    assert plan_shards(f"file://{inputs['tar']}", "auto", {})[0].url == str(inputs["tar"])
    memory = f"memory://lc-{uuid.uuid4().hex}/in"
    storage.write_bytes(f"{memory}/a.tar", inputs["tar"].read_bytes())
    assert [(s.format, s.name) for s in plan_shards(memory, "auto", {})] == [("webdataset", "a")]
    with pytest.raises(ValueError, match="pass --input-format"):
        plan_shards(str(inputs["tar"].parents[1]), "auto", {})  # a tar next to a Parquet file


# ---- S3 (moto on loopback) ---------------------------------------------------------------------


def s3_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def ray_log_text() -> bytes:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return b"".join(p.read_bytes() for p in logs.rglob("*") if p.is_file())


def test_s3_round_trip_matches_local_byte_for_byte_and_keeps_the_secret(
    s3, s3_server, tar_cache, inputs, kl_model, capfd
):
    bucket, options = s3
    secret = f"lc-secret-{uuid.uuid4().hex}"  # unique: found anywhere, it leaked from this test
    options = {**options, "secret": secret}
    storage.write_bytes(f"s3://{bucket}/in/shard-00000.tar", inputs["tar"].read_bytes(), options)
    assert (
        encode(
            input=f"s3://{bucket}/in/shard-{{00000..00000}}.tar",
            output=f"s3://{bucket}/cache",
            model=kl_model,
            storage_options=options,
            **RUN,
        )
        == 0
    )
    objects = s3_objects(s3_server, bucket)
    meta = f"cache/{META}"
    assert {f"{meta}/manifest.json", f"{meta}/stats.json"} <= set(objects)
    parts = [k for k in objects if k.startswith("cache/data/shard-00000/")]
    assert len(parts) == 1
    remote = pq.read_table(pa.BufferReader(objects[parts[0]]))
    local = read_cache(tar_cache)
    assert remote.column("key").to_pylist() == local.column("key").to_pylist()
    assert latents(remote).tobytes() == latents(local).tobytes()
    m = json.loads(objects[f"{meta}/manifest.json"])
    assert m["complete"] and "storage_options" not in m["config"] and m["config"]["output"] == f"s3://{bucket}/cache"
    leaks = [k for k, body in objects.items() if secret.encode() in body]
    assert leaks == []
    out, err = capfd.readouterr()
    assert secret not in out + err and secret.encode() not in ray_log_text()


def test_s3_errors_are_one_line_without_the_secret(s3, kl_model, capsys):
    bucket, options = s3
    options = {**options, "secret": "lc-secret-in-an-error"}
    assert (
        encode(
            input=f"s3://{bucket}/nothing/shard-{{0..2}}.tar",
            output=f"s3://{bucket}/cache",
            model=kl_model,
            storage_options=options,
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "input not found: s3://" in err and "\n" not in err and "lc-secret" not in err
    assert (
        encode(
            input=f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x.tar",
            output=f"s3://{bucket}/cache",
            model=kl_model,
            storage_options=options,
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentcache: error:") and "\n" not in err and "lc-secret" not in err


def test_new_objects_are_seen_in_the_same_process(s3, s3_server, monkeypatch):
    """fsspec keeps one filesystem per options; a cached listing must not hide later uploads."""
    bucket, options = s3
    storage.write_bytes(f"s3://{bucket}/in/a.tar", b"a", options)
    assert storage.expand_inputs(f"s3://{bucket}/in/*.tar", options) == [f"s3://{bucket}/in/a.tar"]
    assert storage.expand_inputs(f"s3://{bucket}/in/", options) == [f"s3://{bucket}/in/a.tar"]
    storage.write_bytes(f"s3://{bucket}/in/b.tar", b"b", {**options, "secret": "another-instance"})
    want = [f"s3://{bucket}/in/a.tar", f"s3://{bucket}/in/b.tar"]
    assert storage.expand_inputs(f"s3://{bucket}/in/*.tar", options) == want
    assert storage.expand_inputs(f"s3://{bucket}/in/{{a,b}}.tar", options) == want
    assert storage.list_files(f"s3://{bucket}/in", options) == want
    # The usual AWS variables alone (endpoint included) reach the same store.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert storage.expand_inputs(f"s3://{bucket}/in/", {}) == want


def test_example_configs_parse(tmp_path):
    from latentcache.config import EncodeConfig, build_config

    s3 = build_config(EncodeConfig, {"config": str(ROOT / "configs" / "s3.yaml")})
    assert s3.input.startswith("s3://") and set(s3.storage_options) == {"endpoint_url"}
    assert "endpoint_url" not in repr(s3)  # storage options never appear in a printed config
    local = build_config(EncodeConfig, {"config": str(ROOT / "configs" / "local.yaml"), "num_encoders": 2})
    assert local.num_encoders == 2 and local.input_format == "auto"
