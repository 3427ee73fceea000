"""`--model` as an fsspec URL: fetched into a per-node cache keyed by the files' sha256, once per node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentcache.models import ModelError, fetch_model, load_vae, sha256_file
from latentcache.models.remote import files_key
from latentcache.samples import make_shards

from .helpers import manifest
from .test_cluster import private_dir, run_cluster_script  # noqa: F401 - a fixture

MODEL_PREFIX = "vaes/kl"


def upload(folder: Path, bucket: str, options: dict, prefix: str = MODEL_PREFIX) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": options["endpoint_url"]}, key=options["key"], secret=options["secret"]
    )
    for path in folder.iterdir():
        fs.put_file(str(path), f"{bucket}/{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}/"


def fetches(cache: Path) -> list[dict]:
    log = cache / "fetches.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_url_model_is_fetched_once_keyed_by_sha256_and_verified(s3, kl_model, tmp_path, monkeypatch):
    bucket, options = s3
    url = upload(kl_model, bucket, options)
    monkeypatch.setenv("LATENTCACHE_MODEL_CACHE", str(tmp_path / "cache"))
    local, files = fetch_model(url, options)
    assert files == {p.name: sha256_file(p) for p in kl_model.iterdir()}
    assert local == tmp_path / "cache" / files_key(files) and sorted(p.name for p in local.iterdir()) == sorted(files)
    assert fetch_model(url, options) == (local, files) and fetch_model(url, {}, expected=files) == (local, files)
    assert len(fetches(tmp_path / "cache")) == 1  # the listing and the hashes found the copy
    vae, family = load_vae(
        __import__("latentcache.models", fromlist=["ModelSpec"]).ModelSpec(model=url, storage_options=options)
    )
    assert family.name == "kl" and len(fetches(tmp_path / "cache")) == 1
    with pytest.raises(ModelError, match="changed since this run started"):
        fetch_model(url, options, expected={**files, "config.json": "0" * 64})


def test_two_nodes_fetch_the_s3_model_once_each(s3, kl_model, private_dir, tmp_path):  # noqa: F811
    bucket, options = s3
    url = upload(kl_model, bucket, options)
    make_shards(tmp_path / "shards", shards=2, per_shard=4, size=(64, 64))
    out, head_cache, gpu_cache = tmp_path / "cache", tmp_path / "models-head", tmp_path / "models-gpu"
    shards = str(tmp_path / "shards" / "shard-{00000..00001}.tar")
    run = run_cluster_script(
        "tests._cluster_model_fetch",
        private_dir,
        shards,
        str(out),
        url,
        json.dumps(options),
        str(head_cache),
        str(gpu_cache),
    )
    assert run["status"] == 0 and run["encoders"] == 2 and run["encoder_nodes"] == [run["gpu_node"]]
    weights = {p.name: sha256_file(p) for p in kl_model.iterdir()}
    for cache in (head_cache, gpu_cache):  # the driver on the head; two encoder actors on the GPU node
        assert [f["key"] for f in fetches(cache)] == [files_key(weights)]
    m = manifest(out)
    assert m["model"] == url and m["complete"] and m["counts"]["written"] == 8
    assert m["model_sha256"] == {"diffusion_pytorch_model.safetensors": weights["diffusion_pytorch_model.safetensors"]}
