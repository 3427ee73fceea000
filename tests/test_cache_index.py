"""The duplicate index: keep-first in input order whatever the arrival order, exact key comparison,
idempotent reruns, only touched partitions rewritten; inline and on real Ray."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from latentcache.cache.index import (
    DuplicateIndexError,
    Duplicates,
    PartRef,
    apply_drops,
    blake2b_64,
    check_duplicates,
    map_parts,
    partition_slices,
    reduce_partition,
)


class Corpus:
    """Part files' keys, as JSON files on disk, read back by `read_keys` (the map's only input)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def part(self, shard: str, name: str, keys: list[str]) -> PartRef:
        path = self.root / f"{shard}-{name}.json"
        path.write_text(json.dumps(keys))
        return PartRef(shard, str(path))


def read_keys(path: str) -> list[str]:
    return json.loads(Path(path).read_text())


def expected(parts: list[PartRef]) -> Duplicates:
    """Keep-first by brute force over everything indexed so far: order (shard, path, row)."""
    keeper: dict[str, PartRef] = {}
    kept_rows: set[tuple[str, str]] = set()
    found = Duplicates()
    for ref in sorted(parts, key=lambda r: (r.shard, r.path)):
        for key in read_keys(ref.path):
            first = keeper.setdefault(key, ref)
            if first == ref and (ref.path, key) not in kept_rows:
                kept_rows.add((ref.path, key))  # the copy kept
            else:
                found.add(ref.path, key, first.shard, kept_here=first == ref)
    return found


def index_files(url: Path) -> dict[str, int]:
    return {str(p.relative_to(url)): p.stat().st_mtime_ns for p in url.rglob("*") if p.is_file()}


@pytest.fixture(params=["inline", "ray"])
def on_ray(request) -> bool:
    if request.param == "ray":
        request.getfixturevalue("ray_session")
    return request.param == "ray"


def check(tmp_path: Path, new: list[PartRef], **kwargs) -> Duplicates:
    return check_duplicates(url=str(tmp_path / "index"), storage_options={}, new=new, read_keys=read_keys, **kwargs)


def test_keep_first_whatever_the_arrival_order(tmp_path, on_ray):
    corpus = Corpus(tmp_path / "parts")
    b = corpus.part("shard-b", "0", ["k1", "k2", "k3"])
    c = corpus.part("shard-c", "0", ["k2", "k4"])
    a = corpus.part("shard-a", "0", ["k3", "k4", "k5"])
    first = check(tmp_path, [c, b], partitions=8, use_ray=on_ray)
    assert first == {c.path: {"k2": "shard-b"}}
    second = check(tmp_path, [a], partitions=8, use_ray=on_ray)  # an earlier shard arrives last: keeps k3, k4
    assert second == {c.path: {"k2": "shard-b", "k4": "shard-a"}, b.path: {"k3": "shard-a"}}
    assert second == expected([a, b, c])


def test_repeats_within_a_part_and_across_parts_of_one_shard(tmp_path, on_ray):
    corpus = Corpus(tmp_path / "parts")
    p0 = corpus.part("s1", "0", ["x", "y", "x", "x"])
    p1 = corpus.part("s1", "1", ["y", "z"])
    found = check(tmp_path, [p1, p0], partitions=4, use_ray=on_ray)
    assert found == {p0.path: {"x": "s1"}, p1.path: {"y": "s1"}} and found.kept_here == {p0.path: {"x"}}
    assert found.keep_mask(p0.path, read_keys(p0.path)) == [True, True, False, False]
    assert found.keep_mask(p1.path, read_keys(p1.path)) == [False, True]
    # an earlier shard later brings x: every copy of x in p0 goes, the first included
    early = corpus.part("s0", "0", ["x"])
    found = check(tmp_path, [early], partitions=4, use_ray=on_ray)
    assert found.keep_mask(p0.path, read_keys(p0.path)) == [False, True, False, False]
    assert found == expected([p0, p1, early]) and found.kept_here == {}


def colliding_hash(keys: list[str]) -> np.ndarray:
    """Every key has the same 64-bit hash: only the exact comparison tells them apart."""
    return np.full(len(keys), 12345, dtype=np.uint64)


def test_a_hash_collision_never_drops_a_key(tmp_path, on_ray):
    corpus = Corpus(tmp_path / "parts")
    b = corpus.part("b", "0", ["same", "other-b"])
    a = corpus.part("a", "0", ["same", "other-a"])
    assert check(tmp_path, [b], partitions=4, use_ray=on_ray, hash_keys=colliding_hash) == {}
    assert check(tmp_path, [a], partitions=4, use_ray=on_ray, hash_keys=colliding_hash) == {b.path: {"same": "a"}}
    with pytest.raises(DuplicateIndexError, match="colliding_hash"):
        check(tmp_path, [a], partitions=4, use_ray=on_ray)  # the default hash on an index made with another


def test_a_rerun_with_the_same_parts_gives_the_same_answer_and_writes_nothing(tmp_path, on_ray):
    corpus = Corpus(tmp_path / "parts")
    b = corpus.part("b", "0", ["k1", "k2", "k1"])
    a = corpus.part("a", "0", ["k2"])
    check(tmp_path, [b], partitions=4, use_ray=on_ray)
    answer = check(tmp_path, [a], partitions=4, use_ray=on_ray)
    files = index_files(tmp_path / "index")
    assert check(tmp_path, [a], partitions=4, use_ray=on_ray) == answer  # killed after the pointer, run again
    assert check(tmp_path, [a, b], partitions=4, use_ray=on_ray) == answer == expected([a, b])
    assert index_files(tmp_path / "index") == files


def test_only_partitions_that_received_keys_are_rewritten(tmp_path, on_ray):
    corpus = Corpus(tmp_path / "parts")
    check(tmp_path, [corpus.part("a", "0", [f"key{i}" for i in range(200)])], partitions=16, use_ray=on_ray)
    before = index_files(tmp_path / "index")
    assert sum(name.startswith("partitions/") for name in before) == 16
    check(tmp_path, [corpus.part("b", "0", ["new-key"])], partitions=16, use_ray=on_ray)
    after = index_files(tmp_path / "index")
    changed = {name for name in after if before.get(name) != after[name]}
    partition = int(blake2b_64(["new-key"])[0] % 16)
    assert {n for n in changed if n.startswith("partitions/")} == {
        n for n in after if n.startswith(f"partitions/p{partition:05d}-")
    }
    assert len(after) == len(before)  # the superseded version and the old parts table are gone


def test_applied_drops_rename_parts_and_leave_nothing_pending(tmp_path, on_ray):
    corpus = Corpus(tmp_path / "parts")
    b = corpus.part("b", "0", ["k1", "k2"])
    check(tmp_path, [b], partitions=4, use_ray=on_ray)
    a = corpus.part("a", "0", ["k2"])
    assert check(tmp_path, [a], partitions=4, use_ray=on_ray) == {b.path: {"k2": "a"}}
    rewritten = corpus.part("b", "0-v2", ["k1"])  # copy-on-write: b's part without k2
    apply_drops(url=str(tmp_path / "index"), storage_options={}, replaced={b.path: rewritten.path})
    assert check(tmp_path, [], partitions=4, use_ray=on_ray) == {}
    c = corpus.part("c", "0", ["k1"])
    assert check(tmp_path, [c], partitions=4, use_ray=on_ray) == {c.path: {"k1": "b"}}
    known = PartRef("b", rewritten.path)  # checked again under its new name: not a copy of itself
    assert check(tmp_path, [known], partitions=4, use_ray=on_ray) == {c.path: {"k1": "b"}}
    with pytest.raises(DuplicateIndexError, match="indexed for shard b"):
        check(tmp_path, [PartRef("z", rewritten.path)], partitions=4, use_ray=on_ray)


def test_a_killed_check_leaves_the_old_index_whole(tmp_path, on_ray):
    corpus = Corpus(tmp_path / "parts")
    b = corpus.part("b", "0", ["k1"])
    check(tmp_path, [b], partitions=4, use_ray=on_ray)
    stray = tmp_path / "index" / "partitions" / "p00001-killed.parquet"
    stray.write_bytes(b"half a version no pointer names")
    a = corpus.part("a", "0", ["k1"])
    assert check(tmp_path, [a], partitions=4, use_ray=on_ray) == {b.path: {"k1": "a"}}
    assert not stray.exists()


def test_random_arrivals_match_brute_force(tmp_path, on_ray):
    rng = random.Random(14)
    corpus = Corpus(tmp_path / "parts")
    parts = [
        corpus.part(f"s{s:03d}", str(p), [f"k{rng.randrange(150)}" for _ in range(rng.randrange(0, 12))])
        for s in range(40)
        for p in range(rng.randrange(1, 3))
    ]
    rng.shuffle(parts)
    seen: list[PartRef] = []
    for start in range(0, len(parts), 9):
        seen += parts[start : start + 9]
        found = check(tmp_path, parts[start : start + 9], partitions=8, use_ray=on_ray, map_tasks=3)
        assert found == expected(seen)


def test_map_and_reduce_are_plain_functions(tmp_path):
    corpus = Corpus(tmp_path / "parts")
    ref = corpus.part("a", "0", ["x", "y", "x"])
    table, counts = map_parts([(0, ref.path)], read_keys, blake2b_64, 2)
    assert counts.sum() == table.num_rows == 3
    x_partition = int(blake2b_64(["x"])[0] % 2)
    spec = {
        "url": str(tmp_path / "index"),
        "storage_options": {},
        "partition": x_partition,
        "current": None,
        "slices": partition_slices([counts], x_partition),
    }
    result = reduce_partition(spec, np.array([0]), table)
    assert result.drops == [(0, "x", 0)] and result.version.startswith(f"partitions/p{x_partition:05d}-")
