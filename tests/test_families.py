"""The 2026 VAE families end to end: a tiny random model of each, saved with save_pretrained, encoded
through the CLI; the stored latent compared with what the family's diffusers pipeline computes as
its image latent (the pipeline's own code, called directly), and decoded back through `latentcache audit`.

Run with -s to see, per family, the largest relative difference between stored and pipeline latent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline, retrieve_latents
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import QwenImageEditPipeline
from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline
from skimage.metrics import peak_signal_noise_ratio

from latentcache.cli import main
from latentcache.reader import Cache
from latentcache.samples import natural_image, write_tar

from .helpers import encode, manifest, png_bytes

SIZE = 64
MEAN4, STD4 = [0.1, -0.2, 0.3, 0.0], [1.5, 0.7, 2.0, 1.1]
VIDEO = dict(
    base_dim=16,
    z_dim=4,
    dim_mult=[1, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True],
    latents_mean=MEAN4,
    latents_std=STD4,
)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {  # family -> (diffusers class, tiny config)
    "flux2": (
        "AutoencoderKLFlux2",
        dict(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            latent_channels=8,
            sample_size=SIZE,
        ),
    ),
    "dc": (
        "AutoencoderDC",
        dict(
            latent_channels=8,
            attention_head_dim=8,
            scaling_factor=0.41407,
            encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(16, 32, 32),
            decoder_block_out_channels=(16, 32, 32),
            encoder_layers_per_block=(1, 1, 1),
            decoder_layers_per_block=(1, 1, 1),
            encoder_qkv_multiscales=((), (), (5,)),
            decoder_qkv_multiscales=((), (), (5,)),
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
        ),
    ),
    "qwenimage": ("AutoencoderKLQwenImage", VIDEO),
    "wan2.1": ("AutoencoderKLWan", VIDEO),
    "wan2.2": (
        "AutoencoderKLWan",
        dict(
            VIDEO,
            z_dim=8,
            latents_mean=MEAN4 * 2,
            latents_std=STD4 * 2,
            is_residual=True,
            patch_size=2,
            in_channels=12,
            out_channels=12,
        ),
    ),
    "hunyuanimage": (
        "AutoencoderKLHunyuanImage",
        dict(
            in_channels=3,
            out_channels=3,
            latent_channels=8,
            block_out_channels=(32, 32, 32),
            layers_per_block=1,
            spatial_compression_ratio=4,
            sample_size=SIZE,
            scaling_factor=0.75289,
        ),
    ),
}
RELATIVE_DIFFERENCE: dict[str, float] = {}


def make_model(root: Path, family: str) -> Path:
    class_name, config = MODELS[family]
    torch.manual_seed(0)
    vae = getattr(diffusers, class_name)(**config)
    if family == "flux2":  # non-trivial BatchNorm statistics, or the normalisation would be invisible
        vae.bn.running_mean.copy_(torch.randn(vae.bn.num_features) * 0.3)
        vae.bn.running_var.copy_(torch.rand(vae.bn.num_features) * 2 + 0.25)
    vae.save_pretrained(root / family)
    return root / family


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: make_model(root, family) for family in MODELS}


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {f"img{i}": np.asarray(natural_image(rng, SIZE, SIZE)) for i in range(3)}


@pytest.fixture(scope="module")
def shard(images, tmp_path_factory) -> Path:
    """Lossless PNGs at the target size: preprocessing is the identity, the pipeline sees the same pixels."""
    path = tmp_path_factory.mktemp("png") / "shard-00000.tar"
    write_tar(path, [(f"{key}.png", png_bytes(image)) for key, image in images.items()])
    return path


@pytest.fixture(scope="module")
def caches(models, shard, ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    done: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in done:
            out = root / family
            assert (
                encode(input=shard, output=out, model=models[family], resolution=SIZE, store_dtype="fp32", batch_size=2)
                == 0
            )
            done[family] = out
        return done[family]

    return get


def stored_latents(out: Path) -> dict[str, np.ndarray]:
    cache = Cache(str(out))
    return {key: row for block in cache.blocks() for key, row in zip(block.keys, block.tensors["latent"])}


def pixels(images: dict[str, np.ndarray], keys: list[str]) -> torch.Tensor:
    return torch.from_numpy(np.stack([images[k] for k in keys])).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load(folder: Path) -> Any:
    class_name = json.loads((folder / "config.json").read_text())["_class_name"]
    return getattr(diffusers, class_name).from_pretrained(folder).eval()


# ---- the image latent each pipeline hands its transformer (its own code, with only the VAE) ----------


def flux2_latent(vae: Any, x: torch.Tensor, keys: list[str]) -> torch.Tensor:
    pipe = Flux2Pipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, transformer=None)
    return pipe._encode_vae_image(x, generator=None)  # mode -> _patchify_latents -> BatchNorm statistics


def dc_latent(vae: Any, x: torch.Tensor, keys: list[str]) -> torch.Tensor:
    # SanaControlNetPipeline.__call__ does this inline (pipeline_sana_controlnet.py: `vae.encode(control_image)
    # .latent` then `* vae.config.scaling_factor`); no pipeline method encodes an image on its own.
    return vae.encode(x).latent * vae.config.scaling_factor


def qwen_latent(vae: Any, x: torch.Tensor, keys: list[str]) -> torch.Tensor:
    pipe = QwenImageEditPipeline(
        scheduler=None, vae=vae, text_encoder=None, tokenizer=None, processor=None, transformer=None
    )
    return pipe._encode_vae_image(x.unsqueeze(2), generator=None)[:, :, 0]  # [B, C, 1, h, w]: one frame


def wan_latent(vae: Any, x: torch.Tensor, keys: list[str]) -> torch.Tensor:
    # Wan 2.2 TI2V's image path (expand_timesteps): the image alone is the condition, one latent frame.
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=None, expand_timesteps=True)
    _, condition, _ = pipe.prepare_latents(
        x, 1, vae.config.z_dim, SIZE, SIZE, num_frames=1, dtype=torch.float32, device=torch.device("cpu")
    )
    return condition[:, :, 0]


def hunyuan_latent(vae: Any, x: torch.Tensor, keys: list[str]) -> torch.Tensor:
    # HunyuanImagePipeline only decodes (`vae.decode(latents / vae.config.scaling_factor)`); its refiner's
    # _encode_vae_image is for the 5-D refiner VAE. So: diffusers' retrieve_latents (the mode) times the
    # scaling factor that decode divides by.
    return retrieve_latents(vae.encode(x), sample_mode="argmax") * vae.config.scaling_factor


PIPELINE_LATENT: dict[str, Callable[[Any, torch.Tensor, list[str]], torch.Tensor]] = {
    "flux2": flux2_latent,
    "dc": dc_latent,
    "qwenimage": qwen_latent,
    "wan2.1": wan_latent,
    "wan2.2": wan_latent,
    "hunyuanimage": hunyuan_latent,
}
CONVENTION = {
    "flux2": "patch_bn",
    "dc": "scale",
    "qwenimage": "per_channel",
    "wan2.1": "per_channel",
    "wan2.2": "per_channel",
    "hunyuanimage": "scale",
}


@pytest.mark.parametrize("family", list(MODELS))
def test_stored_latent_is_the_pipelines_image_latent(family, models, images, caches):
    out = caches(family)
    stored = stored_latents(out)
    keys = sorted(stored)
    with torch.no_grad():
        expected = PIPELINE_LATENT[family](load(models[family]), pixels(images, keys), keys).double().numpy()
    got = np.stack([stored[k] for k in keys]).astype(np.float64)
    assert got.shape == expected.shape
    RELATIVE_DIFFERENCE[family] = float(np.abs(got - expected).max() / np.abs(expected).max())
    print(f"\n{family}: largest relative difference stored vs pipeline latent {RELATIVE_DIFFERENCE[family]:.2e}")
    assert RELATIVE_DIFFERENCE[family] < 1e-5
    m = manifest(out)
    assert m["latent_space"]["convention"] == CONVENTION[family]
    assert m["model_class"] == {"wan2.1": "wan", "wan2.2": "wan"}.get(family, family)


def pipeline_images(vae: Any, x: torch.Tensor, family: str) -> np.ndarray:
    """What the pipeline's decode gives for this image's latent (the VAE's own decode of its raw latent,
    post-processed by diffusers' VaeImageProcessor), uint8 [B, H, W, 3]."""
    video = family in ("qwenimage", "wan2.1", "wan2.2")
    out = vae.encode(x.unsqueeze(2) if video else x)
    z = out.latent if family == "dc" else out.latent_dist.mode()
    decoded = vae.decode(z).sample
    decoded = decoded[:, :, 0] if video else decoded
    return (VaeImageProcessor().postprocess(decoded, output_type="np") * 255).round().astype(np.uint8)


@pytest.mark.parametrize("family", list(MODELS))
def test_audit_decodes_back_to_the_pipelines_image(family, models, images, caches):
    out = caches(family)
    assert main(["audit", "--cache", str(out), "--model", str(models[family]), "--sample", "3"]) == 0
    metrics = pq.read_table(out / "__latentcache__" / "audit" / "metrics.parquet").to_pylist()
    keys = sorted(images)
    with torch.no_grad():
        reference = pipeline_images(load(models[family]), pixels(images, keys), family)
    expected = {k: peak_signal_noise_ratio(images[k], img, data_range=255) for k, img in zip(keys, reference)}
    assert sorted(r["key"] for r in metrics) == keys
    for row in metrics:
        assert row["psnr"] == pytest.approx(expected[row["key"]], abs=0.02)


def test_stats_suggests_flux2_batchnorm_statistics(caches, tmp_path):
    out = tmp_path / "stats.json"
    assert main(["stats", "--quiet", "--cache", str(caches("flux2")), "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    bn = doc["diffusers_config"]["patch_bn"]
    assert doc["current_latent_space"]["convention"] == "patch_bn"
    # one value per patch channel c*4 + dy*2 + dx (Flux2Pipeline._patchify_latents), from raw channel c
    np.testing.assert_allclose(bn["bn.running_mean"], np.repeat(doc["channel_mean"], 4))
    np.testing.assert_allclose(
        np.sqrt(np.asarray(bn["bn.running_var"]) + bn["batch_norm_eps"]), np.repeat(doc["channel_std"], 4), rtol=1e-9
    )


@pytest.mark.parametrize("flags, bad", [({"resolution": 72}, "72"), ({"resolution": 64, "buckets": [[64, 72]]}, "72")])
def test_image_sides_follow_the_familys_resolution_multiple(flags, bad):
    from latentcache.config import EncodeConfig
    from latentcache.models import FAMILIES, ModelError, check_options

    vae = diffusers.AutoencoderKLHunyuanImage(
        **{**MODELS["hunyuanimage"][1], "block_out_channels": (32,) * 5, "spatial_compression_ratio": 16}
    )
    family = FAMILIES["hunyuanimage"]
    assert family.resolution_multiple(vae) == 16
    cfg = EncodeConfig(input="in.tar", output="out", model="m", **flags)
    with pytest.raises(ModelError, match=bad):
        check_options(family, cfg, vae)
    check_options(family, EncodeConfig(input="in.tar", output="out", model="m", resolution=64, buckets=[[64, 96]]), vae)
