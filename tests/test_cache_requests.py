"""What a run costs the object store: requests per shard and bytes written per committed byte,
counted by an HTTP proxy (tests/faultproxy.py, no faults) in front of the loopback moto S3."""

from __future__ import annotations

from collections import Counter

import boto3

from latentcache.cache.layout import META
from latentcache.samples import make_shards

from .faultproxy import FaultProxy
from .helpers import encode

SHARDS = 200


def object_sizes(bucket: str, endpoint: str, prefix: str) -> dict[str, int]:
    client = boto3.client("s3", endpoint_url=endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def test_requests_per_shard_and_write_amplification(ray_session, s3, s3_server, kl_model, tmp_path, capsys):
    bucket, options = s3
    client = boto3.client("s3", endpoint_url=s3_server)
    for path in make_shards(tmp_path / "in", shards=SHARDS, per_shard=1, size=(32, 32)):
        client.upload_file(str(path), bucket, f"in/{path.name}")
    with FaultProxy(s3_server, rate=0.0) as proxy:
        flags = dict(
            input=f"s3://{bucket}/in/shard-{{00000..{SHARDS - 1:05d}}}.tar",
            output=f"s3://{bucket}/cache",
            model=kl_model,
            resolution=32,
            batch_size=16,
            storage_options={**options, "endpoint_url": proxy.endpoint},
        )
        assert encode(**flags) == 0
        first, uploaded = proxy.stats["requests"], dict(proxy.put_bytes)
        kinds = Counter(
            f"{m} {'/'.join(p.split('/')[2:5]) if '/cache/' in p else p.split('/')[2] if '/in/' in p else p}"
            for m, p in proxy.requests
        )
        assert encode(**flags) == 0
        rerun = proxy.stats["requests"] - first
    stored = object_sizes(bucket, s3_server, "cache/")
    data = {k: v for k, v in stored.items() if k.startswith("cache/data/")}
    assert len(data) == SHARDS
    written_data = sum(v for k, v in uploaded.items() if "/cache/data/" in k)
    amplification = written_data / sum(data.values())
    overall = sum(v for k, v in uploaded.items() if "/cache/" in k) / sum(data.values())
    print(
        f"requests: first run {first} ({first / SHARDS:.2f} per shard), no-op rerun {rerun}; bytes written per "
        f"committed data byte {amplification:.3f} (data), {overall:.3f} (everything, metadata included)"
    )
    with capsys.disabled():
        print({k: v for k, v in kinds.items() if v > 3})
        print(
            f"\n[cache-requests] first={first} per_shard={first / SHARDS:.2f} rerun={rerun} "
            f"amplification={amplification:.3f} overall={overall:.3f}"
        )
    assert first <= 6 * SHARDS, f"{first / SHARDS:.2f} requests per shard"
    assert rerun <= 40, f"{rerun} requests for a rerun with nothing to do"
    assert amplification <= 1.25
    assert any(k.startswith(f"cache/{META}/") for k in stored)
