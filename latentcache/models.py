"""diffusers VAE loading and the per-family encode step, behind a registry of model families.

A family knows how to load its diffusers class and how to turn pixels into a posterior
(mean and, for KL models, std) and, for VQ models, codebook indices. Nothing here re-implements a VAE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError
from .latent_space import LatentSpace

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Where the hub cache lives and whether to go online: the encoder actors must see what the driver saw.
# Tokens are deliberately not forwarded (runtime_env values are visible in Ray's dashboard).
HUB_ENV_VARS = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")


class ModelError(UserError):
    """The model cannot be found, loaded or used; the message says why."""


@dataclass(frozen=True)
class Encoded:
    """One batch through the encoder, in raw (unscaled) latent space, float32."""

    mean: torch.Tensor
    std: torch.Tensor | None = None
    codes: torch.Tensor | None = None


@dataclass(frozen=True)
class Family:
    name: str
    class_name: str
    encode: Callable[[Any, torch.Tensor], Encoded]
    stochastic: bool
    downsample: Callable[[Any], int]  # pixels per latent, per side
    tiles: bool  # has diffusers' enable_tiling() for encoding


def _encode_kl(vae: Any, x: torch.Tensor) -> Encoded:
    dist = vae.encode(x).latent_dist
    return Encoded(mean=dist.mean, std=dist.std)


def _encode_tiny(vae: Any, x: torch.Tensor) -> Encoded:
    return Encoded(mean=vae.encode(x).latents)


def _encode_vq(vae: Any, x: torch.Tensor) -> Encoded:
    h = vae.encode(x).latents
    _, _, (_, _, indices) = vae.quantize(h)
    return Encoded(mean=h, codes=indices.reshape(h.shape[0], h.shape[2], h.shape[3]))


def _blocks_downsample(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _tiny_downsample(vae: Any) -> int:
    return int(vae.spatial_scale_factor)


FAMILIES: dict[str, Family] = {
    "kl": Family("kl", "AutoencoderKL", _encode_kl, stochastic=True, downsample=_blocks_downsample, tiles=True),
    "tiny": Family("tiny", "AutoencoderTiny", _encode_tiny, stochastic=False, downsample=_tiny_downsample, tiles=True),
    "vq": Family("vq", "VQModel", _encode_vq, stochastic=False, downsample=_blocks_downsample, tiles=False),
}
FAMILY_BY_CLASS = {f.class_name: f for f in FAMILIES.values()}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    model: str
    model_class: str = "auto"
    model_config: str | None = None
    allow_pickle: bool = False
    subfolder: str | None = None  # e.g. "vae" inside a full pipeline repo or directory

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelSpec":
        return cls(model=cfg.model, model_class=cfg.model_class, model_config=cfg.model_config,
                   allow_pickle=cfg.allow_pickle, subfolder=getattr(cfg, "model_subfolder", None))

    @property
    def folder(self) -> Path:
        """The local directory holding the VAE's files (when --model is a directory)."""
        return Path(self.model, self.subfolder or "")


def _diffusers_class(class_name: str) -> Any:
    import diffusers

    return getattr(diffusers, class_name)


def _read_config(spec: ModelSpec) -> dict[str, Any] | None:
    for folder in (spec.model_config, spec.folder):
        if folder and Path(folder, "config.json").is_file():
            return json.loads(Path(folder, "config.json").read_text())
    if spec.model_config or Path(spec.model).exists():
        return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(spec.model, "config.json", subfolder=spec.subfolder)).read_text())
    except Exception:  # noqa: BLE001 - offline or unknown id: the loader below says so clearly
        return None


def resolve_family(spec: ModelSpec) -> Family:
    if spec.model_class != "auto":
        return FAMILIES[spec.model_class]
    config = _read_config(spec)
    class_name = (config or {}).get("_class_name", "AutoencoderKL")
    if class_name not in FAMILY_BY_CLASS:
        raise ModelError(f"{spec.model}: model class {class_name} is not a supported VAE "
                         f"({', '.join(FAMILY_BY_CLASS)}); pass --model-class to force one")
    return FAMILY_BY_CLASS[class_name]


def check_pickle(path: str, allow_pickle: bool) -> None:
    if path.endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise ModelError(f"{path} is a pickle-based checkpoint, which can run arbitrary code when loaded; "
                         "convert it to .safetensors or pass --allow-pickle if you trust it")


def _load_single_file(cls: Any, spec: ModelSpec) -> Any:
    """An original-format checkpoint (e.g. an LDM `vae.safetensors`), converted by diffusers on load."""
    check_pickle(spec.model, spec.allow_pickle)
    if not hasattr(cls, "from_single_file"):
        raise ModelError(f"{cls.__name__} cannot load single-file checkpoints; use a diffusers directory")
    # local_files_only: without --model-config diffusers looks the config up in the local hub cache only.
    return cls.from_single_file(spec.model, config=spec.model_config, local_files_only=True)


def _load_pretrained(cls: Any, spec: ModelSpec) -> Any:
    """A diffusers directory or hub id (the hub cache; HF_HUB_OFFLINE is honoured by huggingface_hub)."""
    folder = spec.folder
    if folder.is_dir():
        has_safetensors = any(folder.glob("*.safetensors"))
        for weight in folder.glob("*"):
            check_pickle(str(weight), spec.allow_pickle or has_safetensors)
    return cls.from_pretrained(spec.model, subfolder=spec.subfolder, use_safetensors=None if spec.allow_pickle else True)


def load_vae(spec: ModelSpec) -> tuple[Any, Family]:
    """Loads the VAE the way a user would with diffusers, in float32 on CPU, in eval mode."""
    family = resolve_family(spec)
    cls = _diffusers_class(family.class_name)
    single_file = Path(spec.model).is_file()
    try:
        vae = _load_single_file(cls, spec) if single_file else _load_pretrained(cls, spec)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types; the user needs one line
        hint = "; pass --model-config DIR (a diffusers VAE config.json) to load it offline" if (
            single_file and not spec.model_config) else ""
        raise ModelError(f"cannot load VAE from {spec.model}: {str(exc).strip().splitlines()[0]}{hint}") from exc
    return vae.eval().requires_grad_(False), family


def check_options(family: Family, cfg: Any) -> None:
    """Options this family cannot honour are errors, never silently ignored (cfg: EncodeConfig or EncodeSpec)."""
    rules = (
        (cfg.posterior == "sample" and not family.stochastic, "--posterior sample needs a model with a posterior"),
        (cfg.store_posterior and not family.stochastic, "--store-posterior needs a model with a posterior"),
        (cfg.vq_output != "latent" and family.name != "vq", f"--vq-output {cfg.vq_output} needs a VQModel"),
        (cfg.tiling == "diffusers" and not family.tiles, "--tiling diffusers needs a model diffusers can tile"),
        (cfg.tiling == "exact" and family.name != "kl", "--tiling exact needs an AutoencoderKL"),
    )
    for broken, message in rules:
        if broken:
            raise ModelError(f"{message}; this model is a {family.class_name}")


def compute_dtype(config: Any, dtype: str, no_upcast: bool) -> torch.dtype:
    """The encoder's dtype: fp16 on a force_upcast model runs in fp32, as diffusers pipelines do."""
    wanted = TORCH_DTYPES[dtype]
    if wanted == torch.float16 and getattr(config, "force_upcast", False) and not no_upcast:
        return torch.float32
    return wanted


def enable_tiling(vae: Any, family: Family, *, tile_size: int, overlap: float) -> None:
    """diffusers' own tiled encoder, with our tile size (pixels) and overlap (fraction of a tile)."""
    factor = family.downsample(vae)
    if not family.tiles or tile_size % factor:
        raise ModelError(f"--tiling diffusers: {family.class_name} needs a --tile-size that is a multiple of {factor}"
                         if family.tiles else f"--tiling diffusers: diffusers has no tiled encoder for {family.class_name}")
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_size
    vae.tile_latent_min_size = tile_size // factor
    vae.tile_overlap_factor = overlap


def hub_env() -> dict[str, str]:
    """The hub settings of this process, for the encoder actors' runtime_env."""
    return {name: os.environ[name] for name in HUB_ENV_VARS if name in os.environ}


def latent_space_for(vae: Any, cfg: Any) -> LatentSpace:
    return LatentSpace.from_model_config(
        vae.config, scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor,
        latents_mean=cfg.latents_mean, latents_std=cfg.latents_std)


def weight_files(model: str, subfolder: str | None = None) -> list[Path]:
    """The files whose bytes define the model's weights (for the manifest's sha256)."""
    path = Path(model)
    if path.is_file():
        return [path]
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the local cache: nothing to hash
            return []
    # Only the VAE's own folder: a pipeline repo also holds gigabytes of UNet/text-encoder weights.
    return sorted(p for p in (path / (subfolder or "")).glob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(model: str, subfolder: str | None = None) -> dict[str, str]:
    base = Path(model) if Path(model).exists() else None
    return {(str(p.relative_to(base)) if base and base.is_dir() else p.name): sha256_file(p)
            for p in weight_files(model, subfolder)}


def model_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
