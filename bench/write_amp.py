"""Write amplification of an encode on an object store: bytes uploaded per committed data byte.

    python bench/write_amp.py --shards 8 --per-shard 64 --resolution 64 128 --out bench/results/write_amp.json

Encodes realistic shards (photo-like JPEGs of 64-128 px sides) into a loopback moto S3 behind the
counting proxy of tests/faultproxy.py (no faults), then divides the bytes PUT under the cache's
prefix by the bytes of the data files its records name: `latent` counts only uploads under data/,
`overall` counts everything (metadata, log, checkpoints, index, errors, manifest, stats).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3

from latentcache.cli import main
from latentcache.samples import make_shards, make_vae
from tests.faultproxy import FaultProxy

SIZES = [(64, 64), (96, 128), (128, 96), (80, 112), (128, 128), (72, 100)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def object_sizes(client, bucket: str, prefix: str) -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def measure(endpoint: str, model: Path, shards: list[Path], resolution: int, store_dtype: str) -> dict:
    client = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"amp-{resolution}-{store_dtype}"
    client.create_bucket(Bucket=bucket)
    for path in shards:
        client.upload_file(str(path), bucket, f"in/{path.name}")
    with FaultProxy(endpoint, rate=0.0) as proxy:
        options = {"endpoint_url": proxy.endpoint, "key": "testing", "secret": "testing"}
        argv = [
            "encode",
            "--quiet",
            "--input",
            f"s3://{bucket}/in/shard-{{00000..{len(shards) - 1:05d}}}.tar",
            "--output",
            f"s3://{bucket}/cache",
            "--model",
            str(model),
            "--resolution",
            str(resolution),
            "--store-dtype",
            store_dtype,
            "--storage-options",
            json.dumps(options),
        ]
        assert main(argv) == 0
        uploaded, requests = dict(proxy.put_bytes), proxy.stats["requests"]
    data = {k: v for k, v in object_sizes(client, bucket, "cache/").items() if k.startswith("cache/data/")}
    committed = sum(data.values())
    latent = sum(v for k, v in uploaded.items() if "/cache/data/" in k)
    overall = sum(v for k, v in uploaded.items() if "/cache/" in k)
    by_kind: dict[str, int] = {}
    for path, size in ((p, n) for p, n in uploaded.items() if "/cache/" in p):  # per metadata folder; data/ as one
        rest = path.split("/cache/", 1)[-1].split("/")
        kind = "/".join(rest[:2]) if rest[0] != "data" else "data"
        by_kind[kind] = by_kind.get(kind, 0) + size
    return {
        "resolution": resolution,
        "put_bytes_by_folder": by_kind,
        "store_dtype": store_dtype,
        "data_files": len(data),
        "committed_bytes": committed,
        "put_bytes_data": latent,
        "put_bytes_all": overall,
        "requests": requests,
        "amplification_latent": round(latent / committed, 4),
        "amplification_overall": round(overall / committed, 4),
    }


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--resolution", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--store-dtype", default="fp16")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(name, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            shards = make_shards(Path(tmp) / "in", shards=args.shards, per_shard=args.per_shard, sizes=SIZES)
            model = make_vae(Path(tmp) / "vae")
            results = [measure(f"http://127.0.0.1:{port}", model, shards, r, args.store_dtype) for r in args.resolution]
    finally:
        server.stop()
    for r in results:
        print(json.dumps(r))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {"shards": args.shards, "per_shard": args.per_shard, "results": results}
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main_bench()
