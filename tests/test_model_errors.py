"""Model errors a new user hits: one line on stderr, exit 2, no hub retries for a path or an offline hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from latentcache.latent_space import LatentSpace, patchify, unpatchify

ROOT = Path(__file__).resolve().parents[1]


def cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "latentcache", "encode", "--quiet", "--input", "x.tar", "--output", "out", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture()
def workdir(tmp_path, shards) -> Path:
    (tmp_path / "x.tar").write_bytes(Path(shards[0]).read_bytes())
    (tmp_path / "demo" / "vae").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize(
    "model, says",
    [
        ("demo/vea", "--model demo/vea: no such file or directory; did you mean demo/vae?"),
        ("/no/such/vae", "--model /no/such/vae: no such file or directory"),
        ("./vae.safetensors", "--model ./vae.safetensors: no such file or directory"),
    ],
)
def test_a_missing_local_path_fails_at_once_in_one_line(model, says, workdir):
    done = cli(["--model", model], workdir)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"latentcache: error: {says}"]


def test_a_hub_id_not_cached_with_the_hub_unreachable_says_how_to_fetch_it(workdir):
    import socket

    with socket.socket() as s:  # a port nobody listens on: the hub "cannot be reached" at once
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    done = cli(
        ["--model", "someorg/some-vae", "--model-subfolder", "vae"],
        workdir,
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT=endpoint,
        HF_HOME=str(workdir / "hf"),
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"not in the local Hugging Face cache and {endpoint} cannot be reached" in lines[0]
    assert "hf download someorg/some-vae --include 'vae/*' --local-dir DIR) and pass --model DIR" in lines[0]


def test_offline_hub_id_not_cached_is_one_line(workdir):
    done = cli(["--model", "someorg/some-vae"], workdir, HF_HUB_OFFLINE="1", HF_HOME=str(workdir / "hf"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "latentcache: error: --model someorg/some-vae: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
        "fetch it once where there is network (hf download someorg/some-vae --local-dir DIR) and pass --model DIR"
    ]


# ---- the patch_bn convention's layout is Flux2Pipeline's own --------------------------------------


def test_patchify_is_flux2_pipelines_layout_and_to_raw_undoes_patch_bn():
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    z = torch.randn(2, 8, 6, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(patchify(z, 2), Flux2Pipeline._patchify_latents(z))
    assert torch.equal(unpatchify(patchify(z, 2), 2), z)
    assert np.array_equal(patchify(z.numpy(), 2), Flux2Pipeline._patchify_latents(z).numpy())
    rng = np.random.default_rng(1)
    space = LatentSpace(
        convention="patch_bn",
        scaling_factor=1.0,
        patch_size=2,
        batch_norm_eps=1e-4,
        latents_mean=tuple(rng.normal(size=32)),
        latents_std=tuple(rng.uniform(0.5, 2, size=32)),
    )
    stored = space.to_model(z.double().numpy())
    assert stored.shape == (2, 32, 3, 5)
    np.testing.assert_allclose(space.to_raw(stored), z.double().numpy(), rtol=1e-12, atol=1e-12)
    assert LatentSpace.from_dict(space.to_dict()) == space
    assert "frame_axis" not in space.to_dict() and space.to_vae_input(stored).shape == (2, 8, 6, 10)
    video = LatentSpace(convention="scale", scaling_factor=0.5, frame_axis=True)
    assert video.to_vae_input(np.ones((2, 4, 3, 3))).shape == (2, 4, 1, 3, 3)
