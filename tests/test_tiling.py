"""Exact banded encode/decode (latentcache.tiling) against the untiled diffusers pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn

from latentcache.tiling import UnsupportedModelError, exact_decode, exact_encode_moments, exact_tiling_support

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    # These models are tiny: the many small band convs gain nothing from a second thread, and on
    # a busy CI box OpenMP threads waiting on each other made this file ~8x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_vae(
    latent_channels: int = 4,
    attention: bool = True,
    quant: bool = True,
    blocks: tuple[int, ...] = (32, 64),
    groups: int = 8,
) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=groups,
        mid_block_add_attention=attention,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
    ).eval()
    _perturb_group_norms(vae)
    return vae


def _perturb_group_norms(vae: nn.Module) -> None:
    # Default affine (1, 0) would hide a mix-up of scale and shift or of weight layout.
    gen = torch.Generator().manual_seed(1)
    for m in vae.modules():
        if isinstance(m, nn.GroupNorm):
            m.weight.data = 1 + 0.5 * torch.randn(m.weight.shape, generator=gen)
            m.bias.data = 0.3 * torch.randn(m.bias.shape, generator=gen)


def images(batch: int, height: int, width: int) -> torch.Tensor:
    """Smooth gradients plus noise: non-zero, position-dependent GroupNorm statistics."""
    gen = torch.Generator().manual_seed(2)
    ys = torch.linspace(-1, 1, height)[:, None]
    xs = torch.linspace(-1, 1, width)[None, :]
    base = torch.stack([ys * xs, ys.expand(height, width), xs.expand(height, width)])
    noise = torch.rand(batch, 3, height, width, generator=gen) * 2 - 1
    return (0.6 * base + 0.4 * noise).clamp(-1, 1)


def full_moments(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        h = vae.encoder(x)
        return h if vae.quant_conv is None else vae.quant_conv(h)


def full_decode(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z).sample


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("latent_channels", [4, 16])
@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("quant", [True, False])
def test_encode_one_row_bands_matches_full(latent_channels: int, attention: bool, quant: bool) -> None:
    vae = make_vae(latent_channels, attention, quant)
    x = images(2, 98, 70)  # odd latent grid (49 x 35); 1-row bands: every band is a border case
    got = exact_encode_moments(vae, x, band_rows=1)
    assert got.shape == (2, 2 * latent_channels, 49, 35)
    assert rel_l2(got, full_moments(vae, x)) <= TOL


@pytest.mark.parametrize("store", ["file", "host", "device", "auto"])
def test_encode_stores(store: str) -> None:
    vae = make_vae(16, attention=True, quant=True)
    x = images(2, 200, 136)
    assert rel_l2(exact_encode_moments(vae, x, band_rows=7, store=store), full_moments(vae, x)) <= TOL


def test_band_height_from_band_mb() -> None:
    vae = make_vae(4, attention=True, quant=True)
    x = images(1, 200, 136)
    ref = full_moments(vae, x)
    assert rel_l2(exact_encode_moments(vae, x, band_mb=0.05), ref) <= TOL  # a few rows per band
    assert rel_l2(exact_encode_moments(vae, x), ref) <= TOL  # default 64 MB: one band per map


@pytest.mark.parametrize("latent_channels", [4, 16])
@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("post_quant", [True, False])
def test_decode_one_row_bands_matches_full(latent_channels: int, attention: bool, post_quant: bool) -> None:
    vae = make_vae(latent_channels, attention, post_quant)
    z = torch.randn(2, latent_channels, 25, 17, generator=torch.Generator().manual_seed(3))
    got = exact_decode(vae, z, band_rows=1)
    assert got.shape == (2, 3, 50, 34)
    assert rel_l2(got, full_decode(vae, z)) <= TOL
    assert rel_l2(exact_decode(vae, z, band_rows=4, store="file"), full_decode(vae, z)) <= TOL


def test_three_levels_odd_sizes() -> None:
    # Two stride-2 Downsample2D (padding=0, extra bottom/right zero) on odd sizes, and two
    # Upsample2D in the decoder.
    vae = make_vae(4, attention=True, quant=True, blocks=(16, 32, 32), groups=8)
    x = images(1, 203, 141)
    got = exact_encode_moments(vae, x, band_rows=3, store="file")
    assert got.shape == (1, 8, 50, 35)  # 203 -> 101 -> 50, 141 -> 71 -> 35
    assert rel_l2(got, full_moments(vae, x)) <= TOL
    z = torch.randn(1, 4, 11, 7, generator=torch.Generator().manual_seed(4))
    assert rel_l2(exact_decode(vae, z, band_rows=2), full_decode(vae, z)) <= TOL


def test_from_pretrained_matches_public_api(tmp_path: Path) -> None:
    make_vae(4, attention=True, quant=True).save_pretrained(tmp_path)
    vae = AutoencoderKL.from_pretrained(tmp_path).eval()
    x = images(2, 96, 72)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
    assert rel_l2(exact_encode_moments(vae, x, band_rows=5), posterior.parameters) <= TOL
    z = posterior.mode()
    assert rel_l2(exact_decode(vae, z, band_rows=5), full_decode(vae, z)) <= TOL


def test_scale_factors_and_classic_processor_are_replayed() -> None:
    vae = make_vae(4, attention=True, quant=True)
    for m in vae.modules():  # not reachable through the config, but honoured by forward()
        if hasattr(m, "output_scale_factor"):
            m.output_scale_factor = 1.7
        if hasattr(m, "rescale_output_factor"):
            m.rescale_output_factor = 1.3
    vae.set_attn_processor(AttnProcessor())
    x = images(1, 64, 48)
    assert rel_l2(exact_encode_moments(vae, x, band_rows=2), full_moments(vae, x)) <= TOL
    z = torch.randn(1, 4, 9, 6, generator=torch.Generator().manual_seed(5))
    assert rel_l2(exact_decode(vae, z, band_rows=2), full_decode(vae, z)) <= TOL


class Custom(nn.Module):
    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return x


def test_unknown_module_falls_back() -> None:
    vae = make_vae()
    assert exact_tiling_support(vae) == (True, "")
    vae.encoder.down_blocks[0].resnets[0] = Custom()
    ok, reason = exact_tiling_support(vae)
    assert not ok
    assert "unknown module Custom in encoder" in reason and "down_blocks.0.resnets.0" in reason
    with pytest.raises(UnsupportedModelError):
        exact_encode_moments(vae, images(1, 32, 32))
    assert exact_tiling_support(vae, "decoder") == (True, "")


def test_unsupported_configurations_are_reported() -> None:
    vae = make_vae()
    vae.decoder.conv_act = Custom()
    assert exact_tiling_support(vae, "encoder") == (True, "")
    ok, reason = exact_tiling_support(vae)
    assert not ok and "decoder" in reason

    vae = make_vae()
    vae.set_attn_processor(_OtherProcessor())
    ok, reason = exact_tiling_support(vae, "encoder")
    assert not ok and "attention processor" in reason

    vae = make_vae()
    vae.encoder.conv_out.register_forward_hook(lambda *args: None)
    ok, reason = exact_tiling_support(vae, "encoder")
    assert not ok and "hooks" in reason


class _OtherProcessor(AttnProcessor2_0):
    """Same maths, but an unknown type: we cannot know what a custom processor does."""


def test_bad_arguments() -> None:
    vae = make_vae()
    with pytest.raises(ValueError):
        exact_encode_moments(vae, images(1, 32, 32), store="disk")
    with pytest.raises(ValueError):
        exact_encode_moments(vae, images(1, 32, 32), band_rows=0)


def _start_probe(size: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(REPO / "tests" / "_memprobe_tiling.py"), "--size", str(size), "--mode", "file"]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish_probe(proc: subprocess.Popen[str]) -> dict[str, float]:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss in KiB")
def test_peak_memory_does_not_grow_with_image_size() -> None:
    # Fresh interpreters, so that ru_maxrss (a high-water mark) sees one encode each.
    small, large = (_finish_probe(p) for p in [_start_probe(1024), _start_probe(2048)])
    # One full-resolution map of the probe model at 2048 px is 8 x 2048^2 float32 = 128 MiB, and
    # the untiled encode peaks ~640 MiB above its baseline; the exact one stays near band size.
    assert large["delta_mb"] < 48, large
    assert large["delta_mb"] < 2 * small["delta_mb"] + 16, (small, large)


def test_bfloat16_is_as_close_to_float32_as_the_untiled_bf16_encode() -> None:
    x = images(1, 64, 48)
    ref32 = full_moments(make_vae(), x)
    vae = make_vae().to(torch.bfloat16)
    full16 = full_moments(vae, x.bfloat16()).float()
    exact16 = exact_encode_moments(vae, x.bfloat16(), band_rows=3)
    assert exact16.dtype == torch.bfloat16
    assert rel_l2(exact16.float(), ref32) <= 1.5 * rel_l2(full16, ref32) + 1e-3


# ---- wired into `latentcache encode` ----------------------------------------------------------


def test_encode_cli_exact_tiling_equals_untiled(ray_session, kl_model, tmp_path) -> None:
    """--tiling exact, and auto above --tile-threshold, store what the untiled encoder stores."""
    import numpy as np

    from latentcache.samples import make_shards

    from .helpers import encode, latents, read_cache

    shard = make_shards(tmp_path / "in", shards=1, per_shard=3, size=(128, 160), ext="png")[0]
    stored = {}
    for mode, extra in (("none", {}), ("exact", {}), ("auto", {"tile_threshold": 64 * 64})):
        out = tmp_path / mode
        assert (
            encode(
                input=shard,
                output=out,
                model=kl_model,
                resolution=128,
                store_dtype="fp32",
                tiling=mode,
                band_mb=0.05,
                no_channels_last=True,  # one memory format for every mode: this compares tiling, not layouts
                **extra,
            )
            == 0
        )
        stored[mode] = latents(read_cache(out))
    for mode in ("exact", "auto"):
        assert rel_l2(torch.from_numpy(stored[mode]), torch.from_numpy(stored["none"])) <= 1e-5
    assert np.isfinite(stored["exact"]).all()
