"""End-to-end `latentcache encode` through the CLI entry point on a real local Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from latentcache.samples import write_tar

from .helpers import encode, errors, latents, manifest, png_bytes, read_cache
from .helpers import stats as read_stats


@pytest.fixture(scope="module")
def mixed_shard(tmp_path_factory):
    """Good PNGs at the target size, plus a corrupt, an empty and a truncated image."""
    rng = np.random.default_rng(1)
    folder = tmp_path_factory.mktemp("mixed")
    images = {f"img{i:03d}": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(5)}
    good = png_bytes(images["img000"])
    members = [(f"{k}.png", png_bytes(v)) for k, v in images.items()]
    members += [
        ("bad/corrupt.png", b"not an image at all"),
        ("bad/corrupt.txt", b"caption"),
        ("bad/empty.jpg", b""),
        ("bad/truncated.png", good[: len(good) // 2]),
    ]
    write_tar(folder / "shard-00000.tar", members)
    return folder / "shard-00000.tar", images


@pytest.fixture(scope="module")
def mixed_cache(ray_session, kl_model, mixed_shard, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "out"
    assert (
        encode(input=mixed_shard[0], output=out, model=kl_model, resolution=64, store_dtype="fp32", batch_size=3) == 0
    )
    return out


def test_every_good_key_once_and_bad_images_in_errors(mixed_cache, mixed_shard):
    table = read_cache(mixed_cache)
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(mixed_shard[1])
    errs = {r["key"]: r["reason"] for r in errors(mixed_cache).to_pylist()}
    assert set(errs) == {"bad/corrupt", "bad/empty", "bad/truncated"}
    assert "0 bytes" in errs["bad/empty"] and "cannot decode" in errs["bad/corrupt"]
    assert all(r for r in errs.values())


def test_lossless_png_latent_equals_direct_diffusers_encode(mixed_cache, mixed_shard, kl_model):
    vae = AutoencoderKL.from_pretrained(kl_model).eval()
    table = read_cache(mixed_cache)
    stored = latents(table)
    images = np.stack([mixed_shard[1][k] for k in table.column("key").to_pylist()])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    assert stored.dtype == np.float32 and stored.shape == (5, 4, 8, 8)
    np.testing.assert_allclose(stored, expected.numpy(), atol=1e-5, rtol=0)


def test_manifest_counts_reconcile(mixed_cache):
    m = manifest(mixed_cache)
    counts = m["counts"]
    assert counts == {"input": 8, "written": 5, "failed": 3, "fp32_fallback": 0}
    assert counts["input"] == counts["written"] + counts["failed"]
    shard = m["shards"]["shard-00000"]
    assert shard["input"] == shard["written"] + shard["failed"]
    assert m["complete"] and m["latent_space"]["scaling_factor"] == pytest.approx(0.18215)
    assert len(next(iter(m["model_sha256"].values()))) == 64
    assert m["versions"]["diffusers"] and m["preprocess"]["resolution"] == 64


def test_stats_equal_numpy_over_the_cache(mixed_cache):
    stats = read_stats(mixed_cache)
    raw = latents(read_cache(mixed_cache)).astype(np.float64) / stats["latent_space"]["scaling_factor"]
    np.testing.assert_allclose(stats["channel_mean"], raw.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(stats["channel_std"], raw.std(axis=(0, 2, 3)), rtol=1e-9)
    assert stats["mean"] == pytest.approx(raw.mean(), rel=1e-9)
    assert stats["std"] == pytest.approx(raw.std(), rel=1e-9)
    assert stats["suggested"]["scaling_factor"] == pytest.approx(1 / raw.std(), rel=1e-9)
    assert stats["suggested"]["shift_factor"] == pytest.approx(raw.mean(), rel=1e-9)


def test_sample_is_per_key_and_independent_of_batch_size(ray_session, kl_model, shards, tmp_path):
    runs = {}
    for name, batch in (("a", 2), ("b", 5)):
        out = tmp_path / name
        assert (
            encode(
                input=shards[0].parent / "shard-{00000..00001}.tar",
                output=out,
                model=kl_model,
                resolution=64,
                posterior="sample",
                seed=7,
                batch_size=batch,
                store_dtype="fp32",
            )
            == 0
        )
        table = read_cache(out)
        runs[name] = dict(zip(table.column("key").to_pylist(), latents(table)))
    assert runs["a"].keys() == runs["b"].keys() and len(runs["a"]) == 12
    for key in runs["a"]:  # the noise is the same per key; batched convs differ only by float rounding
        np.testing.assert_allclose(runs["a"][key], runs["b"][key], atol=1e-5, rtol=0)
    out = tmp_path / "mode"
    assert encode(input=shards[0], output=out, model=kl_model, resolution=64, store_dtype="fp32") == 0
    mode = dict(zip(read_cache(out).column("key").to_pylist(), latents(read_cache(out))))
    assert all(np.abs(mode[k] - runs["a"][k]).max() > 1e-2 for k in mode)


def test_per_key_noise_is_bitwise_stable_whatever_the_batch():
    from latentcache.encode import per_key_noise

    together = per_key_noise(["a", "b", "c"], (4, 2, 2), seed=3)
    alone = per_key_noise(["b"], (4, 2, 2), seed=3)
    assert torch.equal(together[1], alone[0])
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(per_key_noise(["b"], (4, 2, 2), seed=4)[0], alone[0])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resolution", "abc"], "invalid int value"),
        (["--posterior", "median"], "invalid choice"),
    ],
)
def test_bad_flag_value_is_one_line_usage_error(argv, message, capsys, tmp_path):
    from latentcache.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["encode", "--input", "x.tar", "--output", str(tmp_path), "--model", "m", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_unreadable_model_and_input_are_one_line_errors(capsys, tmp_path, shards, kl_model):
    assert encode(input=shards[0], output=tmp_path / "o", model=tmp_path / "no-such-model", resolution=64) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentcache: error:") and "\n" not in err and "Traceback" not in err
    assert encode(input=tmp_path / "missing-{0..3}.tar", output=tmp_path / "o", model=kl_model) == 2
    err = capsys.readouterr().err.strip()
    assert "input not found" in err and "\n" not in err
    assert encode(input=shards[0], output=tmp_path / "o", model=kl_model, resolution=60) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_yaml_config_with_flag_override(ray_session, kl_model, shards, tmp_path):
    from latentcache.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(
        f"input: {shards[0]}\noutput: {tmp_path / 'y'}\nmodel: {kl_model}\nresolution: 32\nstore-dtype: fp32\n"
    )
    assert main(["encode", "--quiet", "--config", str(config), "--resolution", "64"]) == 0
    m = manifest(tmp_path / "y")
    assert m["preprocess"]["resolution"] == 64 and m["store_dtype"] == "fp32"
    config.write_text("resolution: [1, 2]\n")
    assert main(["encode", "--config", str(config)]) == 2
