"""Every diffusers VAE family through `latentcache encode`: loading, conventions, posterior, precision, memory, formats.

Models are small, randomly initialised, saved with save_pretrained and loaded back as a user would;
every expected value is computed here directly with diffusers, never with latentcache's own helpers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from latentcache.encode import EncodeSpec, LatentEncoder, per_key_noise
from latentcache.models import FAMILIES as FAMILIES_REGISTRY
from latentcache.models import ModelError, ModelSpec, load_vae
from latentcache.reader import Cache
from latentcache.samples import make_vae, natural_image, write_tar

from .helpers import encode, errors, manifest, png_bytes

FAMILIES = {  # name -> (make_vae kind, overrides)
    "kl-4ch": ("kl", {}),
    "kl-16ch-no-quant-conv": ("kl", {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}),
    "kl-no-mid-attention": ("kl", {"mid_block_add_attention": False}),
    "tiny": ("tiny", {}),
    "vq": ("vq", {}),
}
CONVENTIONS = ("scale", "shift_scale", "per_channel")
SIZE = 64


# ---- models and inputs -----------------------------------------------------------------------


def latent_channels(config: dict) -> int:
    return config.get("vq_embed_dim") or config["latent_channels"]


def set_convention(folder: Path, convention: str) -> dict:
    """Writes the convention's keys into config.json (where a user's model config carries them)."""
    config = json.loads((folder / "config.json").read_text())
    c = latent_channels(config)
    for key in ("shift_factor", "latents_mean", "latents_std"):
        config.pop(key, None)
    config["scaling_factor"] = 0.5
    if convention == "shift_scale":
        config.update(scaling_factor=0.37, shift_factor=0.11)
    if convention == "per_channel":
        config.update(latents_mean=[0.05 * (i - 1) for i in range(c)], latents_std=[0.5 + 0.25 * i for i in range(c)])
    if config["_class_name"] == "AutoencoderTiny" and convention == "scale":
        config["shift_factor"] = 0.0  # as AutoencoderTiny saves it: still plain scaling
    (folder / "config.json").write_text(json.dumps(config))
    return config


@pytest.fixture(scope="module")
def base_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-models")
    return {name: make_vae(root / name, kind=kind, **overrides) for name, (kind, overrides) in FAMILIES.items()}


@pytest.fixture(scope="module")
def model_dir(base_models, tmp_path_factory):
    """(family, convention) -> a copy of the family's model whose config carries that convention."""
    root = tmp_path_factory.mktemp("convention-models")
    made: dict[tuple[str, str], Path] = {}

    def get(family: str, convention: str) -> Path:
        if (family, convention) not in made:
            folder = root / f"{family}-{convention}"
            shutil.copytree(base_models[family], folder)
            set_convention(folder, convention)
            made[family, convention] = folder
        return made[family, convention]

    return get


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    return {f"img{i}": np.asarray(natural_image(rng, SIZE, SIZE)) for i in range(4)}


@pytest.fixture(scope="module")
def png_shard(images, tmp_path_factory) -> Path:
    """Lossless PNGs at the target size, so preprocessing is the identity and diffusers sees the same pixels."""
    path = tmp_path_factory.mktemp("png") / "shard-00000.tar"
    members = []
    for key, image in images.items():
        members += [(f"{key}.png", png_bytes(image)), (f"{key}.txt", f"caption of {key}".encode())]
    write_tar(path, members)
    return path


# ---- what diffusers itself computes -----------------------------------------------------------


def pixels(stack: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(stack)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def direct(folder: Path, stack: np.ndarray, **load: object) -> dict[str, torch.Tensor]:
    """Raw posterior straight from diffusers: mean/std (KL), latents (Tiny), pre-quant latent + nearest code (VQ)."""
    config = json.loads((folder / "config.json").read_text())
    vae = getattr(diffusers, config["_class_name"]).from_pretrained(folder, **load).eval()
    x = pixels(stack)
    if isinstance(vae, diffusers.AutoencoderKL):
        dist = vae.encode(x).latent_dist
        return {"mean": dist.mean, "std": dist.std}
    if isinstance(vae, diffusers.AutoencoderTiny):
        return {"mean": vae.encode(x).latents}
    h = vae.encode(x).latents
    return {"mean": h, "codes": nearest_code(h, vae.quantize.embedding.weight)}


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the codebook entry nearest (L2) to each latent vector: [B, C, h, w] -> [B, h, w]."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    distance = ((flat[:, None, :] - codebook.double()[None]) ** 2).sum(-1)
    return distance.argmin(1).reshape(z.shape[0], z.shape[2], z.shape[3])


def to_stored(z: torch.Tensor, config: dict) -> np.ndarray:
    """The three conventions written out as the diffusers pipelines apply them (SD/SDXL, SD3/Flux, SDXL mean/std)."""
    z, s = z.double().numpy(), config["scaling_factor"]
    if config.get("latents_mean") is not None:
        mean = np.asarray(config["latents_mean"]).reshape(-1, 1, 1)
        std = np.asarray(config["latents_std"]).reshape(-1, 1, 1)
        return (z - mean) * s / std
    if config.get("shift_factor"):
        return (z - config["shift_factor"]) * s
    return z * s


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def stack_for(keys: list[str], images: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([images[k] for k in keys])


# ---- the latentcache runs these tests read (each a real `latentcache encode` on local Ray) -----


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """name -> output dir of one CLI run, each run once per module and shared by the tests that read it."""
    root = tmp_path_factory.mktemp("runs")
    done: dict[str, Path] = {}

    def run(name: str, **flags: object) -> Path:
        if name not in done:
            out = root / name
            assert encode(output=out, **{"resolution": SIZE, **flags}) == 0
            done[name] = out
        return done[name]

    return run


def cache_tensors(out: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Keys and tensors of a whole cache through reader.Cache (either format)."""
    cache = Cache(str(out))
    keys: list[str] = []
    parts: dict[str, list[np.ndarray]] = {}
    for block in cache.blocks():
        keys += block.keys
        for name, value in block.tensors.items():
            parts.setdefault(name, []).append(value)
    return keys, {name: np.concatenate(values) for name, values in parts.items()}


# Each family once through the CLI, all three conventions among them; the runs double as the inputs of
# the posterior, safetensors/bf16, slicing, single-file and forced-class tests below (CLI runs are slow).
POSTERIOR_FLAGS = dict(posterior="sample", seed=3, store_posterior=True, format="safetensors", store_dtype="fp32")
CLI_CASES = {  # family -> (convention from its config, flags, tolerance vs fp32 diffusers)
    "kl-4ch": ("scale", POSTERIOR_FLAGS, 2e-5),
    "kl-16ch-no-quant-conv": ("shift_scale", {"store_dtype": "fp32"}, 2e-5),
    "kl-no-mid-attention": ("per_channel", {"format": "safetensors", "store_dtype": "bf16"}, 2**-7),
    "tiny": ("scale", {"store_dtype": "fp32", "model_class": "tiny"}, 2e-5),  # config _class_name renamed
    "vq": ("per_channel", {"store_dtype": "fp32", "vq_output": "both"}, 2e-5),
}


def cli_run(family: str, model_dir, png_shard, runs) -> Path:
    convention, flags, _ = CLI_CASES[family]
    folder = model_dir(family, convention)
    if family == "tiny":
        folder = renamed_class(folder, "MyDistilledVAE")
    return runs(f"cli-{family}", input=png_shard, model=folder, batch_size=3, **flags)


def renamed_class(folder: Path, class_name: str) -> Path:
    """A copy whose config names a class latentcache does not know (a user's own distilled VAE)."""
    renamed = folder.with_name(f"{folder.name}-as-{class_name}")
    if not renamed.exists():
        shutil.copytree(folder, renamed)
        (renamed / "config.json").write_text(json.dumps({**config_of(folder), "_class_name": class_name}))
    return renamed


@pytest.mark.parametrize("family", list(CLI_CASES))
def test_cli_latents_equal_direct_diffusers(family, model_dir, png_shard, images, runs):
    convention, _, tolerance = CLI_CASES[family]
    folder = model_dir(family, convention)
    out = cli_run(family, model_dir, png_shard, runs)
    keys, tensors = cache_tensors(out)
    assert sorted(keys) == sorted(images)
    config = config_of(folder)
    expected = direct(folder, stack_for(keys, images))
    stored_mean = tensors.get("posterior_mean", tensors["latent"])  # kl-4ch stores a sample, plus the posterior
    np.testing.assert_allclose(stored_mean, to_stored(expected["mean"], config), atol=tolerance, rtol=tolerance)
    m = manifest(out)
    assert m["latent_space"]["convention"] == convention
    assert m["latent_space"]["scaling_factor"] == pytest.approx(config["scaling_factor"])
    assert m["model_class"] == family.split("-")[0]
    assert m["counts"]["written"] == len(images) and m["precision"]["compute_dtype"] == "float32"
    if family == "vq":
        assert tensors["codes"].dtype == np.int16
        raw = tensors["latent"] * np.asarray(config["latents_std"]).reshape(-1, 1, 1) / config["scaling_factor"]
        raw += np.asarray(config["latents_mean"]).reshape(-1, 1, 1)
        codebook = diffusers.VQModel.from_pretrained(folder).quantize.embedding.weight.detach()
        assert np.array_equal(tensors["codes"], nearest_code(torch.from_numpy(raw), codebook).numpy())
        assert np.array_equal(tensors["codes"], expected["codes"].numpy())


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_encoder_every_family_and_convention(family, convention, model_dir, images):
    """The full matrix at the encoder stage (the CLI cases above cover the wiring around it)."""
    folder = model_dir(family, convention)
    encoder = LatentEncoder(model=ModelSpec(model=str(folder)), spec=EncodeSpec(store_dtype="fp32", vq_output="both"))
    stack = stack_for(sorted(images), images)
    got = encoder.latents(encoder.encode_pixels(torch.from_numpy(stack).permute(0, 3, 1, 2)), sorted(images))
    expected = direct(folder, stack)
    config = config_of(folder)
    np.testing.assert_allclose(got["latent"].numpy(), to_stored(expected["mean"], config), atol=2e-5, rtol=1e-5)
    assert encoder.space.convention == convention
    if family == "vq":
        assert got["codes"].dtype == torch.int16 and torch.equal(got["codes"].long(), expected["codes"])


def test_posterior_sample_reproduced_from_stored_mean_and_std(model_dir, png_shard, images, runs):
    """--store-posterior: mean_s + std_s * eps with the run's per-key noise gives back --posterior sample."""
    folder = model_dir("kl-4ch", "scale")
    out = cli_run("kl-4ch", model_dir, png_shard, runs)
    keys, t = cache_tensors(out)
    noise = per_key_noise(keys, t["latent"].shape[1:], seed=3).numpy()
    np.testing.assert_allclose(t["latent"], t["posterior_mean"] + t["posterior_std"] * noise, atol=1e-5, rtol=0)
    expected = direct(folder, stack_for(keys, images))
    s = config_of(folder)["scaling_factor"]
    np.testing.assert_allclose(t["posterior_mean"], expected["mean"].numpy() * s, atol=2e-5)
    np.testing.assert_allclose(t["posterior_std"], expected["std"].numpy() * s, atol=2e-5, rtol=1e-5)
    assert np.abs(t["latent"] - t["posterior_mean"]).max() > 1e-3  # a real sample, not the mode


def test_safetensors_output_reads_with_cache_and_plain_safetensors(model_dir, png_shard, images, runs):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = cli_run("kl-4ch", model_dir, png_shard, runs)
    path = next(out.glob("data/shard-00000/part-*.safetensors"))
    plain = load_file(path)
    assert set(plain) == {"latent", "posterior_mean", "posterior_std"}
    assert plain["latent"].shape == (len(images), 4, SIZE // 8, SIZE // 8) and plain["latent"].dtype == torch.float32
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    keys, rows = json.loads(meta["keys"]), json.loads(meta["rows"])
    # format 2: the keys once, in "keys"; "rows" holds the other metadata of each row, in the same order
    assert sorted(keys) == sorted(images) and len(rows) == len(keys) and all("key" not in r for r in rows)
    assert rows[0]["caption"] == f"caption of {keys[0]}" and rows[0]["original_height"] == SIZE
    cache_keys, tensors = cache_tensors(out)
    assert cache_keys == keys and np.array_equal(tensors["latent"], plain["latent"].numpy())
    for name in ("manifest.json", "stats.json"):
        assert (out / "__latentcache__" / name).is_file()
    assert manifest(out)["format"] == "safetensors" and errors(out).num_rows == 0


def test_safetensors_bf16_storage(model_dir, png_shard, images, runs):
    from safetensors.torch import load_file

    folder = model_dir("kl-no-mid-attention", "per_channel")
    out = cli_run("kl-no-mid-attention", model_dir, png_shard, runs)
    plain = load_file(next(out.glob("data/shard-00000/part-*.safetensors")))
    assert plain["latent"].dtype == torch.bfloat16
    keys, tensors = cache_tensors(out)
    expected = to_stored(direct(folder, stack_for(keys, images))["mean"], config_of(folder))
    np.testing.assert_allclose(tensors["latent"], expected, rtol=2**-7, atol=1e-2)
    stats = json.loads(
        (out / "__latentcache__" / "stats.json").read_text()
    )  # computed from the bf16 values a reader gets back
    raw = tensors["latent"].astype(np.float64) * np.asarray(config_of(folder)["latents_std"]).reshape(-1, 1, 1) / 0.5
    raw += np.asarray(config_of(folder)["latents_mean"]).reshape(-1, 1, 1)
    np.testing.assert_allclose(stats["channel_mean"], raw.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-9)


def test_slicing_equals_no_slicing(model_dir, png_shard, runs):
    _, whole = cache_tensors(cli_run("kl-4ch", model_dir, png_shard, runs))  # batches of 3, stores the mode too
    _, sliced = cache_tensors(
        runs(
            "slicing",
            input=png_shard,
            model=model_dir("kl-4ch", "scale"),
            store_dtype="fp32",
            batch_size=4,
            slicing=True,
        )
    )
    # one image per forward pass instead of a batch: the same up to float rounding of batched convolutions
    np.testing.assert_allclose(sliced["latent"], whole["posterior_mean"], atol=1e-5, rtol=0)


# ---- loading: single file, hub cache, forced class, pickle refusal ---------------------------

# diffusers -> original LDM key layout: the inverse of diffusers' convert_ldm_vae_checkpoint
# (diffusers/loaders/single_file_utils.py), applied in order to each key.
LDM_RENAMES = [
    (r"^(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.down.\2.block.\3."),
    (r"^(encoder)\.down_blocks\.(\d+)\.downsamplers\.0\.", r"\1.down.\2.downsample."),
    (r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
    (r"\.attn_1\.to_(q|k|v)\.", r".attn_1.\1."),
    (r"\.attn_1\.to_out\.0\.", ".attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
]


def to_ldm_state_dict(state: dict[str, torch.Tensor], num_up_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the original (CompVis/LDM `first_stage_model`) layout."""
    ldm = {}
    for key, value in state.items():
        up = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$", key)
        if up:  # diffusers counts decoder blocks from the bottom, LDM from the top
            block = num_up_blocks - 1 - int(up.group(1))
            key = f"decoder.up.{block}.{'block' if up.group(2) == 'resnets' else 'upsample'}.{up.group(3)}"
        for pattern, replacement in LDM_RENAMES:
            key = re.sub(pattern, replacement, key)
        if ".attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM attention projections are 1x1 convolutions
        ldm[key] = value.contiguous()
    return ldm


@pytest.fixture(scope="module")
def single_file(model_dir, tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    folder = model_dir("kl-4ch", "scale")
    vae = diffusers.AutoencoderKL.from_pretrained(folder)
    path = tmp_path_factory.mktemp("single") / "vae-original.safetensors"
    save_file(to_ldm_state_dict(vae.state_dict(), len(vae.config.up_block_types)), path)
    return path


def test_single_file_checkpoint_is_in_the_original_layout_and_converts_back(single_file, model_dir):
    from safetensors.torch import load_file

    keys = set(load_file(single_file))
    assert "encoder.down.0.block.0.conv1.weight" in keys and "decoder.up.3.block.0.conv1.weight" in keys
    assert "encoder.mid.attn_1.q.weight" in keys and not any("down_blocks" in k or "to_q" in k for k in keys)
    folder = model_dir("kl-4ch", "scale")
    vae, _ = load_vae(ModelSpec(model=str(single_file), model_config=str(folder)))
    reference = diffusers.AutoencoderKL.from_pretrained(folder).state_dict()
    loaded = vae.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_single_file_cli_offline_equals_the_diffusers_directory(single_file, model_dir, png_shard, images, runs):
    folder = model_dir("kl-4ch", "scale")
    out = runs("single-file", input=png_shard, model=single_file, model_config=folder, store_dtype="fp32", batch_size=3)
    _, dir_tensors = cache_tensors(cli_run("kl-4ch", model_dir, png_shard, runs))
    keys, tensors = cache_tensors(out)
    np.testing.assert_allclose(tensors["latent"], dir_tensors["posterior_mean"], atol=1e-6, rtol=0)
    m = manifest(out)
    assert list(m["model_sha256"]) == [single_file.name] and m["latent_space"]["scaling_factor"] == 0.5


def fake_hub_cache(home: Path, repo: str, files: dict[str, Path]) -> str:
    """The standard huggingface_hub cache layout: blobs by sha256, snapshot symlinks, refs/main."""
    from latentcache.models import sha256_file

    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    for name, source in files.items():
        blob = root / "blobs" / sha256_file(source)
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, blob)
        link = root / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return revision


def test_hub_id_from_local_cache_offline_with_subfolder(model_dir, png_shard, images, ray_session, tmp_path):
    """A pipeline repo in HF_HOME, HF_HUB_OFFLINE=1, the VAE in its vae/ subfolder; a separate driver
    process joins this Ray cluster, so its HF_HOME must reach the encoder actors."""
    folder = model_dir("kl-16ch-no-quant-conv", "shift_scale")
    home = tmp_path / "hf-home"
    fake_hub_cache(
        home,
        "latentcache-test/tiny-pipeline",
        {
            "model_index.json": _write(tmp_path / "model_index.json", '{"_class_name": "StableDiffusionPipeline"}'),
            "vae/config.json": folder / "config.json",
            "vae/diffusion_pytorch_model.safetensors": folder / "diffusion_pytorch_model.safetensors",
        },
    )
    out = tmp_path / "hub-out"
    env = {
        **os.environ,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
    }
    env.pop("HF_HUB_CACHE", None)
    argv = [
        sys.executable,
        "-m",
        "latentcache",
        "encode",
        "--quiet",
        "--input",
        str(png_shard),
        "--resolution",
        str(SIZE),
    ]
    done = subprocess.run(
        [
            *argv,
            "--output",
            str(out),
            "--model",
            "latentcache-test/tiny-pipeline",
            "--model-subfolder",
            "vae",
            "--store-dtype",
            "fp32",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    keys, tensors = cache_tensors(out)
    expected = to_stored(direct(folder, stack_for(keys, images))["mean"], config_of(folder))
    np.testing.assert_allclose(tensors["latent"], expected, atol=2e-5, rtol=1e-5)
    m = manifest(out)
    assert list(m["model_sha256"]) == ["diffusion_pytorch_model.safetensors"]
    assert m["latent_space"]["convention"] == "shift_scale"
    with pytest.raises(ModelError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_vae(ModelSpec(model="latentcache-test/not-cached"))  # offline (conftest) and not in the cache


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_model_class_forced_when_the_config_names_another_class(model_dir, png_shard, tmp_path, capsys):
    """auto refuses a class it does not know; the forced run is the CLI's tiny case above."""
    folder = renamed_class(model_dir("tiny", "scale"), "MyDistilledVAE")
    assert encode(input=png_shard, output=tmp_path / "auto", model=folder, resolution=SIZE) == 2
    err = capsys.readouterr().err
    assert "MyDistilledVAE is not a supported VAE" in err and "--model-class" in err
    vae, family = load_vae(ModelSpec(model=str(folder), model_class="tiny"))
    assert family.name == "tiny" and isinstance(vae, diffusers.AutoencoderTiny)


@pytest.fixture(scope="module")
def pickle_models(model_dir, single_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pickle")
    folder = root / "bin-only"
    diffusers.AutoencoderKL.from_pretrained(model_dir("kl-4ch", "scale")).save_pretrained(
        folder, safe_serialization=False
    )
    from safetensors.torch import load_file

    torch.save(load_file(single_file), root / "vae.ckpt")
    return {"dir": folder, "ckpt": root / "vae.ckpt"}


@pytest.mark.parametrize("kind", ["dir", "ckpt"])
def test_pickle_checkpoints_are_refused(kind, pickle_models, model_dir, png_shard, tmp_path, capsys):
    flags = {"model_config": model_dir("kl-4ch", "scale")} if kind == "ckpt" else {}
    assert encode(input=png_shard, output=tmp_path / "o", model=pickle_models[kind], resolution=SIZE, **flags) == 2
    err = capsys.readouterr().err.strip()
    assert "pickle-based checkpoint" in err and "--allow-pickle" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["dir", "ckpt"])
def test_allow_pickle_loads_the_same_weights(kind, pickle_models, model_dir):
    folder = model_dir("kl-4ch", "scale")
    config = str(folder) if kind == "ckpt" else None
    vae, family = load_vae(ModelSpec(model=str(pickle_models[kind]), model_config=config, allow_pickle=True))
    reference = diffusers.AutoencoderKL.from_pretrained(folder).state_dict()
    assert family.name == "kl" and all(torch.equal(vae.state_dict()[k], v) for k, v in reference.items())


def test_options_a_family_cannot_honour_are_errors(model_dir, png_shard, tmp_path, capsys):
    cases = [
        ("tiny", {"store_posterior": True}, "--store-posterior needs a model with a posterior"),
        ("tiny", {"posterior": "sample"}, "--posterior sample needs a model with a posterior"),
        ("kl-4ch", {"vq_output": "codes"}, "--vq-output codes needs a VQModel"),
        ("vq", {"tiling": "diffusers", "tile_size": 32}, "--tiling diffusers needs a model diffusers can tile"),
        ("tiny", {"tiling": "exact"}, "--tiling exact needs a VAE built from diffusers' Encoder/Decoder"),
    ]
    for family, flags, message in cases:
        assert (
            encode(
                input=png_shard, output=tmp_path / family, model=model_dir(family, "scale"), resolution=SIZE, **flags
            )
            == 2
        )
        assert message in capsys.readouterr().err
    with pytest.raises(ModelError, match="nothing.safetensors: no such file or directory"):
        load_vae(ModelSpec(model=str(tmp_path / "nothing.safetensors")))


# ---- precision: force_upcast, NaN/Inf fallback to fp32, rows non-finite even in fp32 ---------

SATURATED = {"white": 255, "gray": 128, "black": 0, "dark": 100}


@pytest.fixture(scope="module")
def flat_shard(tmp_path_factory) -> Path:
    """Uniform images: saturated ones drive the amplified first convolution furthest."""
    path = tmp_path_factory.mktemp("flat") / "shard-00000.tar"
    write_tar(path, [(f"{k}.png", png_bytes(np.full((SIZE, SIZE, 3), v, np.uint8))) for k, v in SATURATED.items()])
    return path


def amplified(model_dir, tmp_path_factory, gain: float) -> Path:
    """kl-4ch with its first convolution scaled by `gain`; GroupNorm right after makes fp32 indifferent to it
    until float32 itself overflows. force_upcast stays True, as AutoencoderKL saves it by default."""
    folder = tmp_path_factory.mktemp("amplified") / f"gain-{gain:g}"
    vae = diffusers.AutoencoderKL.from_pretrained(model_dir("kl-4ch", "scale"))
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(gain)
    vae.save_pretrained(folder)
    assert config_of(folder)["force_upcast"] is True
    return folder


@pytest.fixture(scope="module")
def fp16_overflow_model(model_dir, tmp_path_factory) -> Path:
    return amplified(model_dir, tmp_path_factory, 1e5)  # white/black activations pass 65504, well inside fp32


@pytest.fixture(scope="module")
def fp32_overflow_model(model_dir, tmp_path_factory) -> Path:
    return amplified(model_dir, tmp_path_factory, 1e20)  # white/black overflow even fp32's GroupNorm variance


def flat_stack(keys: list[str]) -> np.ndarray:
    return np.stack([np.full((SIZE, SIZE, 3), SATURATED[k], np.uint8) for k in keys])


def test_fp16_overflow_reruns_the_batch_in_fp32(fp16_overflow_model, flat_shard, runs):
    with torch.no_grad():  # the premise: fp16 really overflows on the saturated images, fp32 does not
        vae = diffusers.AutoencoderKL.from_pretrained(fp16_overflow_model).eval()
        x = pixels(flat_stack(list(SATURATED)))
        assert torch.isfinite(vae.encode(x).latent_dist.mean).all()
        assert not torch.isfinite(vae.half().encode(x.half()).latent_dist.mean).all()
    out = runs(
        "fp16-no-upcast",
        input=flat_shard,
        model=fp16_overflow_model,
        dtype="fp16",
        no_upcast=True,
        store_dtype="fp32",
        batch_size=16,
    )
    m = manifest(out)
    assert m["precision"] == {"dtype": "fp16", "compute_dtype": "float16", "fp32_fallback": 4, "nonfinite": 0}
    assert m["counts"]["fp32_fallback"] == 4 and m["counts"]["written"] == 4
    keys, tensors = cache_tensors(out)
    expected = to_stored(direct(fp16_overflow_model, flat_stack(keys))["mean"], config_of(fp16_overflow_model))
    np.testing.assert_allclose(tensors["latent"], expected, atol=1e-4, rtol=1e-4)


def test_force_upcast_and_rows_nonfinite_even_in_fp32(fp32_overflow_model, flat_shard, runs):
    """--dtype fp16 on a force_upcast model runs in fp32 (no fallback needed); rows that overflow fp32 too
    become error rows, counted in the manifest."""
    out = runs(
        "fp16-upcast", input=flat_shard, model=fp32_overflow_model, dtype="fp16", store_dtype="fp32", batch_size=16
    )
    m = manifest(out)
    assert m["precision"] == {"dtype": "fp16", "compute_dtype": "float32", "fp32_fallback": 0, "nonfinite": 2}
    assert m["counts"]["written"] == 2 and m["counts"]["failed"] == 2
    reasons = {r["key"]: r["reason"] for r in errors(out).to_pylist()}
    assert set(reasons) == {"white", "black"} and all(r.startswith("non-finite latent") for r in reasons.values())
    keys, tensors = cache_tensors(out)
    assert sorted(keys) == ["dark", "gray"] and np.isfinite(tensors["latent"]).all()


# ---- memory: diffusers tiling on an image larger than the tile --------------------------------


def test_diffusers_tiling_runs_and_its_difference_is_reported(model_dir, tmp_path_factory, runs, record_property):
    rng = np.random.default_rng(11)
    side, tile = 128, 64
    image = np.asarray(natural_image(rng, side, side))
    path = tmp_path_factory.mktemp("large") / "shard-00000.tar"
    write_tar(path, [("large.png", png_bytes(image))])
    folder = model_dir("kl-4ch", "scale")
    out = runs(
        "tiled",
        input=path,
        model=folder,
        resolution=side,
        tiling="diffusers",
        tile_size=tile,
        tile_overlap=0.25,
        store_dtype="fp32",
    )
    _, tensors = cache_tensors(out)
    untiled = to_stored(direct(folder, image[None])["mean"], config_of(folder))
    assert tensors["latent"].shape == untiled.shape == (1, 4, side // 8, side // 8)
    relative_l2 = float(np.linalg.norm(tensors["latent"] - untiled) / np.linalg.norm(untiled))
    print(f"diffusers tiling {side}px image, tile {tile}, overlap 0.25: relative L2 vs untiled = {relative_l2:.4f}")
    record_property("diffusers_tiling_relative_l2", relative_l2)
    assert np.isfinite(tensors["latent"]).all() and 0 < relative_l2 < 1
    assert manifest(out)["config"]["tiling"] == "diffusers"


# ---- presets -----------------------------------------------------------------------------------

PRESETS = {  # name -> (hub id, family, convention, scaling_factor, shift_factor)
    "sd15": ("stabilityai/sd-vae-ft-mse", "kl", "scale", 0.18215, None),
    "sd2": ("stabilityai/stable-diffusion-2-1", "kl", "scale", 0.18215, None),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "kl", "scale", 0.13025, None),
    "sdxl-fp16-fix": ("madebyollin/sdxl-vae-fp16-fix", "kl", "scale", 0.13025, None),
    "sd3": ("stabilityai/stable-diffusion-3-medium-diffusers", "kl", "shift_scale", 1.5305, 0.0609),
    "flux": ("black-forest-labs/FLUX.1-schnell", "kl", "shift_scale", 0.3611, 0.1159),
    "taesd": ("madebyollin/taesd", "tiny", "scale", 1.0, None),
    "taesdxl": ("madebyollin/taesdxl", "tiny", "scale", 1.0, None),
    "taef1": ("madebyollin/taef1", "tiny", "scale", 1.0, None),
    "vq-f4": ("CompVis/ldm-celebahq-256", "vq", "scale", 1.0, None),
}
FAMILY_PRESETS = {  # name -> (hub id, subfolder, family, convention, scaling_factor from the preset)
    "flux2": ("black-forest-labs/FLUX.2-dev", "vae", "flux2", "patch_bn", None),
    "dc-ae-f32c32": ("mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers", None, "dc", "scale", 0.41407),
    "qwen-image": ("Qwen/Qwen-Image", "vae", "qwenimage", "per_channel", None),
    "wan2.1": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "vae", "wan", "per_channel", None),
    "wan2.2": ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "vae", "wan", "per_channel", None),
    "hunyuanimage-2.1": ("hunyuanvideo-community/HunyuanImage-2.1-Diffusers", "vae", "hunyuanimage", "scale", 0.75289),
}
PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "presets"


@pytest.mark.parametrize("name", list(FAMILY_PRESETS))
def test_family_presets_name_model_family_and_convention(name, tmp_path):
    """These conventions come from the VAE itself (config latents_mean/std, Flux.2's BatchNorm buffers);
    the preset pins the model, the family and any scaling factor the config lacks."""
    from latentcache.config import EncodeConfig, build_config

    path = PRESET_DIR / f"{name}.yaml"
    cfg = build_config(EncodeConfig, {"config": str(path), "input": "in.tar", "output": str(tmp_path)})
    hub_id, subfolder, family, convention, scaling = FAMILY_PRESETS[name]
    assert (cfg.model, cfg.model_subfolder, cfg.model_class, cfg.scaling_factor) == (hub_id, subfolder, family, scaling)
    assert f"# convention: {convention}" in path.read_text()
    assert FAMILIES_REGISTRY[family].convention.startswith(convention)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_names_model_class_and_convention(name, tmp_path):
    from latentcache.config import EncodeConfig, build_config
    from latentcache.latent_space import LatentSpace

    path = PRESET_DIR / f"{name}.yaml"
    text = path.read_text()
    cfg = build_config(EncodeConfig, {"config": str(path), "input": "in.tar", "output": str(tmp_path)})
    hub_id, family, convention, scaling, shift = PRESETS[name]
    assert (cfg.model, cfg.model_class, cfg.scaling_factor, cfg.shift_factor) == (hub_id, family, scaling, shift)
    assert f"# convention: {convention}" in text
    # the preset's values alone decide the convention, whatever the downloaded config says
    space = LatentSpace.from_model_config({}, scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor)
    assert space.convention == convention


def test_every_preset_file_is_tested():
    assert sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) == sorted([*PRESETS, *FAMILY_PRESETS])


def test_model_class_choices_are_the_registry():
    from latentcache.audit import AuditConfig
    from latentcache.config import EncodeConfig

    for cls in (EncodeConfig, AuditConfig):
        assert cls.__dataclass_fields__["model_class"].metadata["choices"] == ("auto", *FAMILIES_REGISTRY)
