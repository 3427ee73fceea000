"""`latentcache audit`: metric functions, each integrity failure on a damaged copy of a real cache,
and the self-contained HTML report. Real Ray, real files, real diffusers models; nothing mocked."""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from latentcache.audit import AuditConfig, run_audit, sample_keys
from latentcache.audit.metrics import distribution, lpips_status, psnr, ssim
from latentcache.cli import main
from latentcache.reader import Cache
from latentcache.samples import make_shards, make_vae, write_tar
from latentcache.sinks import column_to_numpy, fixed_shape_tensor_array

from .helpers import encode, png_bytes

# ---- metric functions on known pairs -------------------------------------------------------------


def test_identical_images_give_infinite_psnr_and_ssim_one():
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert psnr(img, img.copy()) == float("inf")
    assert ssim(img, img.copy()) == pytest.approx(1.0)


@pytest.mark.parametrize("sigma", [0.01, 0.05])
def test_gaussian_noise_gives_the_expected_psnr(sigma):
    rng = np.random.default_rng(1)
    img = rng.uniform(0.25, 0.75, (256, 256, 3))  # far from 0 and 1, so no clipping changes the noise
    noisy = img + rng.normal(0.0, sigma, img.shape)
    expected = 10 * np.log10(1.0 / sigma**2)  # PSNR = 10 log10(range^2 / MSE), MSE = sigma^2
    assert psnr(img, noisy, data_range=1.0) == pytest.approx(expected, abs=0.05)
    assert ssim(img, noisy, data_range=1.0) < 1.0


def test_uint8_noise_psnr_matches_the_mse_formula():
    rng = np.random.default_rng(2)
    img = rng.integers(60, 190, (128, 128, 3)).astype(np.uint8)
    noisy = np.clip(img + np.rint(rng.normal(0, 4, img.shape)), 0, 255).astype(np.uint8)
    mse = np.mean((img.astype(np.float64) - noisy) ** 2)
    assert psnr(img, noisy) == pytest.approx(10 * np.log10(255.0**2 / mse), rel=1e-9)


def test_distribution_keeps_json_strict_for_exact_reconstructions():
    dist = distribution([float("inf"), float("inf"), 30.0])
    assert dist["mean"] == "inf" and dist["min"] == 30.0 and dist["count"] == 3
    json.dumps(dist, allow_nan=False)


def test_lpips_status_says_why_when_unavailable():
    status = lpips_status()
    assert status.reason
    assert status.available or status.reason.startswith("LPIPS unavailable")


def test_sample_is_seeded_and_order_free():
    keys = [f"k{i:03d}" for i in range(50)]
    assert sample_keys(keys, 5, 7) == sample_keys(list(reversed(keys)), 5, 7)
    assert sample_keys(keys, 5, 7) != sample_keys(keys, 5, 8)
    assert sample_keys(keys, 100, 0) == keys


# ---- a real cache, and damaged copies of it ------------------------------------------------------


@pytest.fixture(scope="module")
def input_pattern(shards) -> str:
    return str(shards[0].parent / "shard-{00000..00001}.tar")


@pytest.fixture(scope="module")
def clean_cache(ray_session, kl_model, input_pattern, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "cache"
    assert encode(input=input_pattern, output=out, model=kl_model, resolution=64, batch_size=6) == 0
    return out


def audit_cli(cache: Path, *extra: str) -> tuple[int, dict]:
    rc = main(["audit", "--cache", str(cache), *extra])
    return rc, json.loads((cache / "__latentcache__" / "audit" / "summary.json").read_text())


@pytest.fixture(scope="module")
def clean_audit(clean_cache, kl_model, input_pattern):
    rc, summary = audit_cli(
        clean_cache, "--input", input_pattern, "--model", str(kl_model), "--sample", "5", "--top-k", "2"
    )
    return rc, summary, clean_cache / "__latentcache__" / "audit"


def test_clean_cache_passes_every_check(clean_audit):
    rc, summary, _ = clean_audit
    assert rc == 0 and summary["ok"] and summary["failures"] == [] and summary["failures_by_kind"] == {}
    assert {
        "files",
        "row_count",
        "shape",
        "dtype",
        "non_finite",
        "duplicate_key",
        "model_identity",
        "input_keys",
    } <= set(summary["checks"])
    assert summary["counts"] == {
        "files": 2,
        "rows_recorded": 12,
        "rows_read": 12,
        "keys": 12,
        "error_rows": 0,
        "sampled": 5,
        "scored": 5,
    }
    psnr_stats = summary["metrics"]["psnr"]
    assert psnr_stats["count"] == 5 and psnr_stats["p5"] <= psnr_stats["median"] <= psnr_stats["max"]
    assert set(summary["metrics"]["ssim"]) >= {"mean", "median", "p5"}
    assert summary["lpips"]["available"] == ("lpips" in summary["metrics"])
    assert summary["decode"]["where"] == "driver"


def test_metrics_parquet_has_one_row_per_audited_key(clean_audit, clean_cache):
    _, _, out = clean_audit
    rows = pq.read_table(out / "metrics.parquet").to_pylist()
    assert len(rows) == 5 and len({r["key"] for r in rows}) == 5
    cached = set(Cache(str(clean_cache)).errors().column("key").to_pylist()) | {
        k for b in Cache(str(clean_cache)).blocks() for k in b.keys
    }
    for r in rows:
        assert r["key"] in cached and r["status"] == "ok" and r["crop_matches"] is True
        assert np.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1 and (r["height"], r["width"]) == (64, 64)


def test_reconstruction_metrics_equal_a_direct_diffusers_decode(clean_audit, clean_cache, kl_model, shards):
    """The audit's PSNR for a key equals decoding the stored latent with diffusers by hand."""
    import torch
    from diffusers import AutoencoderKL

    from latentcache.preprocess import PreprocessSpec, preprocess_image
    from latentcache.sources import iter_tar_samples

    row = pq.read_table(clean_audit[2] / "metrics.parquet").to_pylist()[0]
    block = next(b for b in Cache(str(clean_cache)).blocks() if row["key"] in b.keys)
    stored = block.tensors["latent"][block.keys.index(row["key"])].astype(np.float32)
    vae = AutoencoderKL.from_pretrained(kl_model).eval()
    with torch.no_grad():
        x = vae.decode(torch.from_numpy(stored)[None] / vae.config.scaling_factor).sample
    recon = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    with open(next(s for s in shards if Path(s).name.startswith("shard-" + row["key"][:5])), "rb") as f:
        image = next(s.image for s in iter_tar_samples(f) if s.key == row["key"])
    original = preprocess_image(image, PreprocessSpec(resolution=64))[0].transpose(1, 2, 0)
    assert row["psnr"] == pytest.approx(psnr(original, recon), abs=1e-3)


class StrictHTML(HTMLParser):
    """Fails on unbalanced or misnested tags; collects <img> sources."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "rect"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.svg = 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self.svg += tag == "svg"
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def test_report_is_self_contained_html_with_the_images(clean_audit):
    _, summary, out = clean_audit
    text = (out / "report.html").read_text()
    parser = StrictHTML()
    parser.feed(text)
    parser.close()
    assert parser.stack == [] and text.startswith("<!DOCTYPE html>")
    assert parser.svg == 1, "the PSNR histogram is an inline SVG"
    assert len(parser.images) == 2 * 2 * 2  # worst 2 and best 2 keys, original + reconstruction each
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size == (64, 64)
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    assert "PASSED" in text and html.escape(summary["lpips"]["reason"]) in text


@pytest.fixture()
def damaged(clean_cache, tmp_path) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(clean_cache, copy, ignore=shutil.ignore_patterns("audit"))
    return copy


def first_file(cache: Path) -> Path:
    return cache / Cache(str(cache)).files[0].path


def delete_last_row(cache: Path) -> str:
    path = first_file(cache)
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 1), path)
    return table.column("key")[-1].as_py()


def inject_nan(cache: Path) -> str:
    path = first_file(cache)
    table = pq.read_table(path)
    latent = column_to_numpy(table.column("latent")).copy()
    latent[1, 2, 3, 4] = np.nan
    idx = table.column_names.index("latent")
    pq.write_table(table.set_column(idx, "latent", fixed_shape_tensor_array(latent)), path)
    return table.column("key")[1].as_py()


def truncate_file(cache: Path) -> str:
    path = first_file(cache)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.name


def delete_file(cache: Path) -> str:
    path = first_file(cache)
    path.unlink()
    return path.name


def duplicate_key(cache: Path) -> str:
    files = Cache(str(cache)).files
    key = pq.read_table(cache / files[0].path).column("key")[0].as_py()
    path = cache / files[1].path
    table = pq.read_table(path)
    keys = table.column("key").to_pylist()
    keys[0] = key
    pq.write_table(table.set_column(table.column_names.index("key"), "key", pa.array(keys)), path)
    return key


DAMAGES = {
    "deleted_row": (delete_last_row, {"row_count", "missing_key"}),
    "nan_injected": (inject_nan, {"non_finite"}),
    "file_truncated": (truncate_file, {"unreadable_file", "missing_key"}),
    "file_deleted": (delete_file, {"missing_file", "missing_key"}),
    "duplicate_key": (duplicate_key, {"duplicate_key", "missing_key"}),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_each_damage_is_detected_and_named(damage, damaged, input_pattern):
    apply, kinds = DAMAGES[damage]
    named = apply(damaged)
    rc, summary = audit_cli(damaged, "--input", input_pattern, "--sample", "2")
    assert rc == 1 and not summary["ok"]
    assert set(summary["failures_by_kind"]) == kinds
    assert any(named in f["detail"] for f in summary["failures"]), summary["failures"]
    assert "FAILED" in (damaged / "__latentcache__" / "audit" / "report.html").read_text()


def test_a_different_model_is_a_stale_cache(clean_cache, tmp_path):
    other = make_vae(tmp_path / "other_vae", seed=1)
    rc, summary = audit_cli(clean_cache, "--model", str(other), "--sample", "0")
    assert rc == 1 and set(summary["failures_by_kind"]) == {"model_mismatch"}
    assert "model_sha256" in summary["failures"][0]["detail"]


def test_other_preprocessing_is_a_stale_cache(clean_cache, kl_model):
    rc, summary = audit_cli(clean_cache, "--model", str(kl_model), "--resolution", "128", "--sample", "0")
    assert rc == 1 and set(summary["failures_by_kind"]) == {"preprocess_mismatch"}


def test_an_input_key_missing_from_the_cache_is_named(clean_cache, shards, tmp_path):
    folder = tmp_path / "input"
    folder.mkdir()
    for shard in shards:
        shutil.copy(shard, folder / shard.name)
    extra = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    write_tar(folder / "shard-00002.tar", [("late0001.png", png_bytes(extra))])
    rc, summary = audit_cli(clean_cache, "--input", str(folder / "*.tar"), "--sample", "0")
    assert rc == 1 and summary["failures_by_kind"] == {"missing_key": 1}
    assert "'late0001'" in summary["failures"][0]["detail"]


def test_a_cache_on_s3_is_audited_in_place(clean_cache, s3):
    import fsspec

    bucket, options = s3
    fs = fsspec.filesystem("s3", **options)
    for path in clean_cache.rglob("*"):
        if path.is_file() and "audit" not in path.parts:
            fs.pipe_file(f"{bucket}/cache/{path.relative_to(clean_cache).as_posix()}", path.read_bytes())
    url = f"s3://{bucket}/cache"
    assert main(["audit", "--cache", url, "--storage-options", json.dumps(options), "--sample", "2"]) == 0
    summary = json.loads(fs.cat_file(f"{bucket}/cache/__latentcache__/audit/summary.json"))
    assert summary["ok"] and summary["counts"]["scored"] == 2
    assert all(fs.exists(f"{bucket}/cache/__latentcache__/audit/{n}") for n in ("metrics.parquet", "report.html"))
    assert options["secret"] not in fs.cat_file(f"{bucket}/cache/__latentcache__/audit/report.html").decode()


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["audit", "--cache", str(tmp_path / "nothing")]) == 2
    assert "no __latentcache__/manifest.json" in capsys.readouterr().err
    assert main(["audit", "--cache", str(tmp_path), "--sample", "-1"]) == 2


def test_bucketed_random_crop_cache_rebuilds_the_same_sources(ray_session, kl_model, tmp_path):
    """Aspect buckets + seeded random crops: the audit re-runs the encoder's planner, so crops match."""
    make_shards(tmp_path / "in", shards=1, per_shard=6, sizes=[(80, 96), (96, 64), (64, 128)])
    out = tmp_path / "cache"
    assert (
        encode(
            input=tmp_path / "in" / "shard-00000.tar",
            output=out,
            model=kl_model,
            resolution=64,
            buckets=True,
            bucket_step=16,
            crop="random",
            flip="both",
            seed=3,
        )
        == 0
    )
    assert len(Cache(str(out)).files) > 1, "several bucket shapes"
    rc, summary = audit_cli(out, "--input", str(tmp_path / "in" / "shard-00000.tar"), "--sample", "6")
    rows = pq.read_table(out / "__latentcache__" / "audit" / "metrics.parquet").to_pylist()
    assert rc == 0 and summary["sample"]["status"] == {"ok": 6} and summary["sample"]["crop_mismatches"] == 0
    assert len({(r["height"], r["width"]) for r in rows}) > 1 and all(r["crop_matches"] for r in rows)


# ---- decoding paths ------------------------------------------------------------------------------


def audit_metrics(cache: Path, **overrides) -> dict[str, float]:
    run_audit(AuditConfig(cache=str(cache), sample=3, **overrides))
    return {
        r["key"]: r["psnr"] for r in pq.read_table(cache / "__latentcache__" / "audit" / "metrics.parquet").to_pylist()
    }


def test_ray_actors_and_exact_banded_decode_agree_with_the_driver(clean_cache, ray_session):
    driver = audit_metrics(clean_cache, decode_on="driver", decode_tiling="none")
    actors = audit_metrics(clean_cache, decode_on="ray", decode_tiling="none")
    exact = audit_metrics(clean_cache, decode_on="driver", decode_tiling="exact")
    assert driver == pytest.approx(actors, abs=1e-3)  # other thread counts may round a pixel differently
    assert list(driver) == list(exact) and driver == pytest.approx(exact, abs=0.05)
    assert (
        json.loads((clean_cache / "__latentcache__" / "audit" / "summary.json").read_text())["decode"]["tiling"]
        == "exact"
    )
