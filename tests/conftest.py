"""Shared fixtures: one local Ray for the whole session, one moto S3 server, tiny models and shards.

Everything is real: Ray, files, a loopback S3 endpoint, diffusers models saved with
save_pretrained. Images and models are tiny so the suite stays fast on two cores.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from latentcache.samples import make_shards, make_vae


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # address="local": never join a cluster another test (or user) started with `ray start`.
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            object_store_memory=400 << 20,
        )
    from latentcache.pipeline import ensure_ray

    ensure_ray()
    yield ray


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"kl": make_vae(root / "kl")}


@pytest.fixture(scope="session")
def kl_model(models) -> Path:
    return models["kl"]


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> list[Path]:
    """Two WebDataset shards of six 80x96 JPEGs each."""
    return make_shards(tmp_path_factory.mktemp("shards"), shards=2, per_shard=6, size=(80, 96))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on loopback (moto's ThreadedMotoServer), as s3fs's own tests use."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    yield endpoint
    server.stop()


@pytest.fixture()
def s3(s3_server, monkeypatch):
    """A fresh bucket on the shared server; yields (bucket, storage_options)."""
    import boto3
    import requests

    requests.post(f"{s3_server}/moto-api/reset")
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="lcache")  # S3 names need 3+ characters
    yield "lcache", {"endpoint_url": s3_server, "key": "testing", "secret": "s3cr3t-SECRET-value"}
