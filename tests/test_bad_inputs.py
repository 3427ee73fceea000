"""The bad-input matrix: one fixture shard per case, all encoded by one real run.

Each case is either encoded correctly (checked against a direct diffusers encode of the pixels it
should have become) or recorded in `_errors` with a reason; every case's shard reconciles
(input = written + failed) and every key is in the cache at most once. Shards whose container
cannot be read (a cut tar, a truncated Parquet file) fail whole: tests/test_failed_shards.py.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from latentcache.samples import write_tar

from .helpers import encode, errors, latents, manifest, png_bytes, read_cache

SIZE = 64
MAX_PIXELS = 20_000  # 64x64 passes, 200x200 is over


@dataclass
class Case:
    members: list[tuple[str, bytes]]
    written: dict[str, np.ndarray | None]  # key -> the RGB pixels it must be encoded from (None: not compared)
    failed: dict[str, str]  # key -> a phrase of the reason
    captions: dict[str, str] = field(default_factory=dict)
    original_size: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (height, width)


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def rotated_jpeg(array: np.ndarray) -> bytes:
    """A JPEG whose EXIF orientation 6 says: rotate 90 degrees clockwise to display."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(Image.fromarray(array), "JPEG", quality=95, exif=exif)


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def build_cases(rng: np.random.Generator) -> dict[str, Case]:
    def noise(h: int = SIZE, w: int = SIZE) -> np.ndarray:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    def good(prefix: str) -> tuple[tuple[str, bytes], dict[str, np.ndarray]]:
        img = noise()
        return (f"{prefix}/good.png", png_bytes(img)), {f"{prefix}/good": img}

    cases: dict[str, Case] = {}

    def add(name: str, members: list, written: dict, failed: dict, **kw) -> None:
        g, gw = good(name)
        cases[name] = Case([g, *members], {**gw, **written}, failed, **kw)

    half_png = png_bytes(noise())
    add("corrupt", [("corrupt/x.png", b"\x89PNG\r\n\x1a\n" + rng.bytes(300))], {}, {"corrupt/x": "cannot decode"})
    add(
        "truncated_image",
        [("truncated_image/x.png", half_png[: len(half_png) // 2])],
        {},
        {"truncated_image/x": "cannot decode"},
    )
    add("zero_byte", [("zero_byte/x.jpg", b"")], {}, {"zero_byte/x": "0 bytes"})
    add(
        "not_image",
        [("not_image/x.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n")],
        {},
        {"not_image/x": "cannot decode"},
    )
    add("caption_only", [("caption_only/x.txt", b"a caption, no image")], {}, {"caption_only/x": "no image member"})
    first, second, c1, c2 = noise(), noise(), noise(), noise()
    add(
        "dup_within",
        [
            ("dup_within/a.png", png_bytes(first)),
            ("dup_within/a.txt", b"first a"),
            ("dup_within/b.png", png_bytes(noise())),
            ("dup_within/a.png", png_bytes(second)),
            ("dup_within/c.png", png_bytes(c1)),
            ("dup_within/c.png", png_bytes(c2)),
        ],
        {"dup_within/a": first, "dup_within/b": None, "dup_within/c": c1},
        {"dup_within/a": "duplicate key in shard", "dup_within/c": "duplicate key in shard"},
        captions={"dup_within/a": "first a"},
    )
    kept, dropped = noise(), noise()
    add(
        "dup_across_a",
        [("shared/key.png", png_bytes(kept)), ("shared/key.txt", b"from a")],
        {"shared/key": kept},
        {},
        captions={"shared/key": "from a"},
    )
    add(
        "dup_across_b",
        [("shared/key.png", png_bytes(dropped)), ("shared/key.txt", b"from b")],
        {},
        {"shared/key": "duplicate key across shards"},
    )
    add(
        "over_max_pixels",
        [("over_max_pixels/x.png", png_bytes(noise(200, 200)))],
        {},
        {"over_max_pixels/x": "over the limit"},
    )
    add(
        "small_upscaled",
        [("small_upscaled/x.png", png_bytes(noise(16, 20)))],
        {"small_upscaled/x": None},
        {},
        original_size={"small_upscaled/x": (16, 20)},
    )
    gray = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    add("grayscale", [("grayscale/x.png", png_bytes(gray))], {"grayscale/x": np.stack([gray] * 3, -1)}, {})
    palette_colors = np.array([[10, 20, 30], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    indices = rng.integers(0, 4, (SIZE, SIZE), dtype=np.uint8)
    pal = Image.fromarray(indices, "P")
    pal.putpalette(palette_colors.reshape(-1).tolist())
    on_white = np.where(indices[..., None] == 0, 255, palette_colors[indices]).astype(np.uint8)
    add("palette", [("palette/x.png", encoded(pal, "PNG", transparency=0))], {"palette/x": on_white}, {})
    cmyk = encoded(Image.fromarray(noise()).convert("CMYK"), "JPEG", quality=95)
    add("cmyk", [("cmyk/x.jpg", cmyk)], {"cmyk/x": decoded(cmyk)}, {})
    rgb, alpha = noise(), np.where(rng.random((SIZE, SIZE)) < 0.5, 0, 255).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    add(
        "rgba",
        [("rgba/x.png", encoded(rgba, "PNG"))],
        {"rgba/x": np.where(alpha[..., None] == 0, 255, rgb).astype(np.uint8)},
        {},
    )
    gray16 = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    png16 = encoded(Image.fromarray(gray16.astype(np.uint16) * 257), "PNG")
    add("sixteen_bit", [("sixteen_bit/x.png", png16)], {"sixteen_bit/x": np.stack([gray16] * 3, -1)}, {})
    square, wide = rotated_jpeg(noise()), rotated_jpeg(noise(32, 64))
    add(
        "exif_rotated",
        [("exif_rotated/square.jpg", square), ("exif_rotated/wide.jpg", wide)],
        {
            "exif_rotated/square": np.rot90(np.asarray(Image.open(io.BytesIO(square)).convert("RGB")), -1),
            "exif_rotated/wide": None,
        },
        {},
        original_size={"exif_rotated/wide": (64, 32)},
    )
    blocks = np.kron(rng.integers(0, 4, (8, 8)), np.ones((8, 8), dtype=np.int64))
    frames = [Image.fromarray(palette_colors[(blocks + shift) % 4]) for shift in (0, 1)]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("animated_gif", [("animated_gif/x.gif", gif)], {"animated_gif/x": decoded(gif)}, {})
    webp_frames = [noise(), noise()]
    webp = encoded(
        Image.fromarray(webp_frames[0]),
        "WEBP",
        save_all=True,
        lossless=True,
        duration=100,
        append_images=[Image.fromarray(webp_frames[1])],
    )
    add("animated_webp", [("animated_webp/x.webp", webp)], {"animated_webp/x": webp_frames[0]}, {})
    unicode_keys = ["unicode/ünïcödé", "unicode/日本語/ключ", "unicode/emoji😀"]
    add("unicode", [(f"{k}.png", png_bytes(noise())) for k in unicode_keys], dict.fromkeys(unicode_keys), {})
    traversal = ["../../escape", "/abs/root", "a/../../b"]
    add("traversal ..ü #1", [(f"{k}.png", png_bytes(noise())) for k in traversal], dict.fromkeys(traversal), {})
    return cases


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("badinputs")
    cases = build_cases(np.random.default_rng(7))
    for name, case in cases.items():
        path = root / "shards" / f"{name}.tar"
        write_tar(path, case.members)
    empty = root / "shards" / "empty_shard.tar"
    tarfile.open(empty, "w").close()
    cases["empty_shard"] = Case([], {}, {})
    return root, cases


def encode_matrix(root: Path, out: Path, model: Path) -> int:
    """The one encode command over the matrix's shards (a rerun must be the same command)."""
    return encode(
        input=root / "shards" / "*.tar",
        output=out,
        model=model,
        resolution=SIZE,
        store_dtype="fp32",
        max_pixels=MAX_PIXELS,
        batch_size=8,
    )


@pytest.fixture(scope="module")
def cache(ray_session, kl_model, matrix):
    root, _ = matrix
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    out = root / "out"
    assert encode_matrix(root, out, kl_model) == 0
    created = sorted(p.relative_to(root) for p in root.rglob("*") if p.relative_to(root) not in before)
    return out, created


@pytest.fixture(scope="module")
def expected_latents(kl_model, matrix):
    vae = AutoencoderKL.from_pretrained(kl_model).eval()
    pixels = {k: v for case in matrix[1].values() for k, v in case.written.items() if v is not None}
    x = torch.from_numpy(np.stack(list(pixels.values()))).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    return dict(zip(pixels, z.numpy()))


def shard_rows(out: Path, shard: Path) -> tuple[list[dict], list[dict]]:
    rows = [
        r
        for r in read_cache(out).select(["key", "shard", "caption", "original_height", "original_width"]).to_pylist()
        if r["shard"] == str(shard)
    ]
    errs = [r for r in errors(out).to_pylist() if r["shard"] == str(shard)]
    return rows, errs


def test_every_key_at_most_once_and_counts_reconcile(cache, matrix):
    out, _ = cache
    keys = read_cache(out).column("key").to_pylist()
    assert len(keys) == len(set(keys))
    m = manifest(out)
    c = m["counts"]
    assert c["input"] == c["written"] + c["failed"] == sum(len(case_input(case)) for case in matrix[1].values())
    assert c["written"] == len(keys) and c["failed"] == errors(out).num_rows
    assert m["complete"] and not m["failed_shards"]


def case_input(case: Case) -> list:
    """What a shard's reader yields: one row per sample (duplicates included)."""
    return [None] * (len(case.written) + len(case.failed))


@pytest.mark.parametrize(
    "name",
    [
        "corrupt",
        "truncated_image",
        "zero_byte",
        "not_image",
        "empty_shard",
        "caption_only",
        "dup_within",
        "dup_across_a",
        "dup_across_b",
        "over_max_pixels",
        "small_upscaled",
        "grayscale",
        "palette",
        "cmyk",
        "rgba",
        "sixteen_bit",
        "exif_rotated",
        "animated_gif",
        "animated_webp",
        "unicode",
        "traversal ..ü #1",
    ],
)
def test_case_is_encoded_or_recorded_with_a_reason(name, cache, matrix, expected_latents):
    out, _ = cache
    root, cases = matrix
    case = cases[name]
    shard = root / "shards" / f"{name}.tar"
    rows, errs = shard_rows(out, shard)
    assert sorted(r["key"] for r in rows) == sorted(case.written)
    assert sorted(e["key"] for e in errs) == sorted(case.failed)
    for e in errs:
        assert case.failed[e["key"]] in e["reason"], e
    record = next(r for r in manifest(out)["shards"].values() if r["shard"] == str(shard))
    assert record["input"] == record["written"] + record["failed"]
    assert (record["written"], record["failed"]) == (len(case.written), len(case.failed))
    assert record["shard_status"] == "ok"
    table = read_cache(out)
    by_key = dict(zip(table.column("key").to_pylist(), latents(table)))
    for key, pixels in case.written.items():
        if pixels is not None:
            np.testing.assert_allclose(by_key[key], expected_latents[key], atol=1e-5, rtol=0, err_msg=key)
    meta = {r["key"]: r for r in rows}
    for key, caption in case.captions.items():
        assert meta[key]["caption"] == caption
    for key, (h, w) in case.original_size.items():
        assert (meta[key]["original_height"], meta[key]["original_width"]) == (h, w)


def test_duplicate_across_shards_names_the_shard_that_kept_it(cache, matrix):
    out, _ = cache
    (reason,) = [e["reason"] for e in errors(out).to_pylist() if e["key"] == "shared/key"]
    assert "dup_across_a" in reason


def test_nothing_is_written_outside_the_output_prefix(cache, matrix):
    out, created = cache
    root = matrix[0]
    assert created and all(p.parts[0] == "out" for p in created), created
    (record,) = [r for r in manifest(out)["shards"].values() if r["name"] == "traversal_..ü_1"]  # a safe output name
    assert record["files"] and all(f["path"].startswith("data/traversal_..ü_1/part-") for f in record["files"])
    assert all((out / f["path"]).is_file() for f in record["files"])
    assert not any("escape" in p.name for p in root.parent.rglob("*"))


def test_min_size_rejects_small_images(ray_session, kl_model, matrix, tmp_path):
    root, cases = matrix
    out = tmp_path / "minsize"
    assert (
        encode(input=root / "shards" / "small_upscaled.tar", output=out, model=kl_model, resolution=SIZE, min_size=32)
        == 0
    )
    errs = {e["key"]: e["reason"] for e in errors(out).to_pylist()}
    assert set(errs) == {"small_upscaled/x"} and "smaller than --min-size 32" in errs["small_upscaled/x"]
    assert read_cache(out).column("key").to_pylist() == ["small_upscaled/good"]
    c = manifest(out)["counts"]
    assert c["input"] == c["written"] + c["failed"] == 2


def test_rerun_of_a_complete_cache_changes_nothing(cache, matrix, kl_model):
    out, _ = cache
    root = matrix[0]
    files = {p: p.stat().st_mtime_ns for p in out.glob("data/**/*.parquet")}
    before = manifest(out)
    assert encode_matrix(root, out, kl_model) == 0
    after = manifest(out)
    assert after["counts"] == before["counts"] and after["shards"] == before["shards"]
    assert {p: p.stat().st_mtime_ns for p in files} == files  # resumed: nothing re-encoded or rewritten


def test_a_key_first_seen_in_a_later_run_stays_with_the_first_shard(ray_session, kl_model, matrix, tmp_path):
    """Shard b is committed alone; when shard a (earlier in input order) arrives, b's copy moves to _errors."""
    root = matrix[0]
    out = tmp_path / "grow"
    flags = dict(output=out, model=kl_model, resolution=SIZE, store_dtype="fp32")
    assert encode(input=root / "shards" / "dup_across_b.tar", **flags) == 0
    assert "shared/key" in read_cache(out).column("key").to_pylist()
    assert encode(input=root / "shards" / "dup_across_{a,b}.tar", **flags) == 0
    rows = read_cache(out).to_pylist()
    assert sorted(r["key"] for r in rows) == ["dup_across_a/good", "dup_across_b/good", "shared/key"]
    assert next(r for r in rows if r["key"] == "shared/key")["caption"] == "from a"
    m = manifest(out)
    assert m["counts"] == {**m["counts"], "input": 4, "written": 3, "failed": 1}
    assert m["shards"]["dup_across_b"]["written"] == 1 and m["shards"]["dup_across_b"]["failed"] == 1
    (err,) = errors(out).to_pylist()
    assert err["key"] == "shared/key" and "dup_across_a" in err["reason"]


@pytest.mark.parametrize("relative", ["../../etc/passwd", "/abs/shard", "a/../../b", "..", ".hidden/x", "ü ñ #?*"])
def test_output_names_from_input_names_stay_inside_the_prefix(relative, tmp_path):
    import posixpath

    from latentcache.sources import safe_name

    name = safe_name(relative)
    target = posixpath.normpath(posixpath.join(str(tmp_path), name))
    assert target.startswith(str(tmp_path) + "/") and ".." not in name.split("/") and not name.startswith("/")
