"""A shard that cannot be read, wholly or in part, is a failed shard, in every input format.

Each damaged shard must end the run with exit 3, be named in the manifest's failed_shards and in
the errors dataset (a row with a null key naming the shard and the reason, then one row per key read
before it broke), make `latentcache audit` fail with `incomplete`, and be retried by a rerun: once
the input is fixed, the rerun completes and the failed shard's rows leave the errors table.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latentcache.cache.reader import Cache
from latentcache.cli import main
from latentcache.samples import write_tar

from .helpers import encode, errors, manifest, png_bytes

SIZE = 32


def image(seed: int) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def members(prefix: str, n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        out += [
            (f"{prefix}/{i}.png", image(zlib.crc32(prefix.encode()) + i)),
            (f"{prefix}/{i}.txt", f"caption {i}".encode()),
        ]
    return out


def tar_bytes(items: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member_offsets(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


# Each damaged tar: (bytes, keys a reader can know, a phrase of the shard's reason)
def damaged_tars() -> dict[str, tuple[bytes, list[str], str]]:
    def cut(name: str, where) -> bytes:
        whole = tar_bytes(members(name, 2))
        return whole[: where(member_offsets(whole))]

    return {
        "random_bytes": (np.random.default_rng(1).bytes(10_000), [], "tar shard is damaged"),
        "empty_file": (b"", [], "empty file"),
        # cut inside the second image: the first sample is complete, the second is known but cut
        "cut_mid_member": (
            cut("cut_mid_member", lambda m: m[2].offset_data + m[2].size // 2),
            ["cut_mid_member/0", "cut_mid_member/1"],
            "tar shard is damaged",
        ),
        # cut exactly after the first sample's last member: tarfile alone would call this a whole tar
        "cut_at_boundary": (
            cut("cut_at_boundary", lambda m: m[2].offset),
            ["cut_at_boundary/0"],
            "without its end-of-archive marker",
        ),
        "garbage_after_member": (
            cut("garbage_after_member", lambda m: m[2].offset) + b"\x7f" * 512,
            ["garbage_after_member/0"],
            "invalid member header",
        ),
        "cut_in_header": (
            cut("cut_in_header", lambda m: m[2].offset + 100),
            ["cut_in_header/0"],
            "cut inside a member header",
        ),
    }


def truncated_parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def corrupt_second_row_group(table: pa.Table) -> bytes:
    """Two row groups; the image column's page header in the second is overwritten."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2)
    data = bytearray(buf.getvalue())
    column = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(1).column(1)
    data[column.data_page_offset : column.data_page_offset + 16] = b"\xff" * 16
    return bytes(data)


def parquet_table(prefix: str, n: int) -> pa.Table:
    return pa.table({"key": [f"{prefix}/{i}" for i in range(n)], "image": [image(100 + i) for i in range(n)]})


def damaged_parquets() -> dict[str, tuple[bytes, list[str], str]]:
    return {  # "a_" sorts first: the driver's column check meets the unreadable file first
        "a_truncated": (truncated_parquet(parquet_table("a_truncated", 4)), [], "Parquet shard cannot be read"),
        "corrupt_page": (
            corrupt_second_row_group(parquet_table("corrupt_page", 4)),
            ["corrupt_page/0", "corrupt_page/1"],
            "Parquet shard cannot be read",
        ),
        "no_image_column": (_plain_parquet(pa.table({"key": ["n/0"]})), [], "image column 'image' not found"),
    }


def _plain_parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def cached_keys(out: Path) -> set[str]:
    """Keys in the cache's part files (those the committed shard records name)."""
    files = Cache(str(out)).files
    return {k for f in files for k in pq.read_table(out / f.path, columns=["key"]).column("key").to_pylist()}


def failed_rows(out: Path) -> dict[str, list[dict]]:
    by_shard: dict[str, list[dict]] = {}
    for row in errors(out).to_pylist():
        if row["reason"].startswith("shard failed"):
            by_shard.setdefault(row["shard"], []).append(row)
    return by_shard


def audit(out: Path, capsys) -> tuple[int, dict]:
    rc = main(["audit", "--cache", str(out), "--sample", "0"])
    capsys.readouterr()
    return rc, json.loads((out / "__latentcache__" / "audit" / "summary.json").read_text())


def check_failed_run(out: Path, shards: dict[str, tuple[str, list[str], str]], capsys) -> None:
    """shards: shard id -> (name, known keys, reason phrase)."""
    m = manifest(out)
    assert not m["complete"]
    assert set(m["failed_shards"]) == set(shards)
    rows = failed_rows(out)
    assert set(rows) == set(shards)
    for shard, (name, keys, phrase) in shards.items():
        assert phrase in m["failed_shards"][shard], (name, m["failed_shards"][shard])
        (named,) = [r for r in rows[shard] if r["key"] is None]
        assert phrase in named["reason"], named
        assert [r["key"] for r in rows[shard] if r["key"] is not None] == keys, name
    assert not cached_keys(out) & {k for _, keys, _ in shards.values() for k in keys}  # a failed shard commits nothing
    rc, summary = audit(out, capsys)
    assert rc == 1 and summary["failures_by_kind"].get("incomplete", 0) >= len(shards), summary["failures_by_kind"]


def check_fixed_run(out: Path, expected_keys: set[str], capsys) -> None:
    m = manifest(out)
    assert m["complete"] and not m["failed_shards"]
    assert cached_keys(out) == expected_keys
    assert errors(out).num_rows == 0
    assert {r["shard_status"] for r in m["shards"].values()} == {"ok"}
    rc, summary = audit(out, capsys)
    assert rc == 0, summary["failures"]


def test_damaged_tars_fail_their_shards_and_a_rerun_retries_them(ray_session, kl_model, tmp_path, capsys):
    folder, out = tmp_path / "tars", tmp_path / "out"
    write_tar(folder / "good.tar", members("good", 2))
    cases = damaged_tars()
    for name, (data, _, _) in cases.items():
        (folder / f"{name}.tar").write_bytes(data)
    flags = dict(input=folder / "*.tar", output=out, model=kl_model, resolution=SIZE)
    assert encode(**flags) == 3
    check_failed_run(
        out, {str(folder / f"{n}.tar"): (n, keys, phrase) for n, (_, keys, phrase) in cases.items()}, capsys
    )
    assert cached_keys(out) == {"good/0", "good/1"}

    for name in cases:
        write_tar(folder / f"{name}.tar", members(name, 2))
    assert encode(**flags) == 0
    check_fixed_run(out, {f"{n}/{i}" for n in [*cases, "good"] for i in range(2)}, capsys)


def test_damaged_parquet_files_fail_their_shards_and_a_rerun_retries_them(ray_session, kl_model, tmp_path, capsys):
    folder, out = tmp_path / "pq", tmp_path / "out"
    folder.mkdir()
    pq.write_table(parquet_table("good", 2), folder / "good.parquet")
    cases = damaged_parquets()
    for name, (data, _, _) in cases.items():
        (folder / f"{name}.parquet").write_bytes(data)
    flags = dict(input=folder / "*.parquet", output=out, model=kl_model, resolution=SIZE)
    assert encode(**flags) == 3
    check_failed_run(out, {str(folder / f"{n}.parquet"): (n, k, p) for n, (_, k, p) in cases.items()}, capsys)

    for name in cases:
        pq.write_table(parquet_table(name, 4), folder / f"{name}.parquet")
    assert encode(**flags) == 0
    check_fixed_run(out, {f"{n}/{i}" for n in cases for i in range(4)} | {"good/0", "good/1"}, capsys)


def test_unreadable_folder_images_fail_the_chunk_with_every_key_known(ray_session, kl_model, tmp_path, capsys):
    folder, out = tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    for i in range(2):
        (folder / f"ok{i}.png").write_bytes(image(i))
    os.symlink("nowhere.png", folder / "dangling.png")  # listed, cannot be read
    os.symlink("loop.png", folder / "loop.png")  # ELOOP: unreadable even for root, unlike a chmod 000 file
    flags = dict(input=folder, output=out, model=kl_model, resolution=SIZE)
    assert encode(**flags) == 3
    shard = f"{folder}#part-00000"
    check_failed_run(
        out, {shard: ("part-00000", ["dangling", "loop", "ok0", "ok1"], "2 of 4 image files cannot be read")}, capsys
    )
    reasons = {r["key"]: r["reason"] for r in failed_rows(out)[shard]}
    assert "this sample: cannot read image file" in reasons["loop"] and "this sample" not in reasons["ok0"]

    for name in ("dangling", "loop"):
        (folder / f"{name}.png").unlink()
        (folder / f"{name}.png").write_bytes(image(7))
    assert encode(**flags) == 0
    check_fixed_run(out, {"dangling", "loop", "ok0", "ok1"}, capsys)


@pytest.mark.parametrize("name", list(damaged_tars()))
def test_tar_reader_yields_known_keys_then_raises(name):
    from latentcache.sources import ShardDataError, iter_tar_samples

    data, keys, phrase = damaged_tars()[name]
    seen = []
    with pytest.raises(ShardDataError, match=phrase):
        for sample in iter_tar_samples(io.BytesIO(data)):
            seen.append(sample.key)
    assert seen == keys


def test_a_whole_tar_with_padding_reads_without_error():
    from latentcache.sources import iter_tar_samples

    data = tar_bytes(members("whole", 2)) + b"\0" * 4096  # trailing zero records, as GNU tar pads
    assert [s.key for s in iter_tar_samples(io.BytesIO(data))] == ["whole/0", "whole/1"]
