"""diffusers VAE loading and the per-family encode step, behind a registry of model families.

A family knows how to load its diffusers class and how to turn pixels into a posterior
(mean and, for KL models, std) and, for VQ models, codebook indices. Nothing here re-implements a VAE.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .latent_space import LatentSpace

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelError(RuntimeError):
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


def _encode_kl(vae: Any, x: torch.Tensor) -> Encoded:
    dist = vae.encode(x).latent_dist
    return Encoded(mean=dist.mean, std=dist.std)


def _encode_tiny(vae: Any, x: torch.Tensor) -> Encoded:
    return Encoded(mean=vae.encode(x).latents)


def _encode_vq(vae: Any, x: torch.Tensor) -> Encoded:
    h = vae.encode(x).latents
    _, _, (_, _, indices) = vae.quantize(h)
    return Encoded(mean=h, codes=indices.reshape(h.shape[0], h.shape[2], h.shape[3]))


FAMILIES: dict[str, Family] = {
    "kl": Family("kl", "AutoencoderKL", _encode_kl, stochastic=True),
    "tiny": Family("tiny", "AutoencoderTiny", _encode_tiny, stochastic=False),
    "vq": Family("vq", "VQModel", _encode_vq, stochastic=False),
}
FAMILY_BY_CLASS = {f.class_name: f for f in FAMILIES.values()}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    model: str
    model_class: str = "auto"
    model_config: str | None = None
    allow_pickle: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelSpec":
        return cls(model=cfg.model, model_class=cfg.model_class, model_config=cfg.model_config,
                   allow_pickle=cfg.allow_pickle)


def _diffusers_class(class_name: str) -> Any:
    import diffusers

    return getattr(diffusers, class_name)


def _read_config(spec: ModelSpec) -> dict[str, Any] | None:
    for folder in (spec.model_config, spec.model):
        if folder and Path(folder, "config.json").is_file():
            return json.loads(Path(folder, "config.json").read_text())
    if spec.model_config or Path(spec.model).exists():
        return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(spec.model, "config.json")).read_text())
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


def load_vae(spec: ModelSpec) -> tuple[Any, Family]:
    """Loads the VAE the way a user would with diffusers, in float32 on CPU, in eval mode."""
    family = resolve_family(spec)
    cls = _diffusers_class(family.class_name)
    path = Path(spec.model)
    try:
        if path.is_file():
            check_pickle(spec.model, spec.allow_pickle)
            if not hasattr(cls, "from_single_file"):
                raise ModelError(f"{family.class_name} cannot load single-file checkpoints; use a diffusers directory")
            vae = cls.from_single_file(spec.model, config=spec.model_config, local_files_only=True)
        else:
            if path.is_dir():
                for weight in path.glob("*"):
                    check_pickle(str(weight), spec.allow_pickle or any(path.glob("*.safetensors")))
            vae = cls.from_pretrained(spec.model, use_safetensors=None if spec.allow_pickle else True)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types; the user needs one line
        raise ModelError(f"cannot load VAE from {spec.model}: {str(exc).splitlines()[0]}") from exc
    return vae.eval().requires_grad_(False), family


def latent_space_for(vae: Any, cfg: Any) -> LatentSpace:
    return LatentSpace.from_model_config(
        vae.config, scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor,
        latents_mean=cfg.latents_mean, latents_std=cfg.latents_std)


def weight_files(model: str) -> list[Path]:
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
    return sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(model: str) -> dict[str, str]:
    base = Path(model) if Path(model).exists() else None
    return {(str(p.relative_to(base)) if base and base.is_dir() else p.name): sha256_file(p) for p in weight_files(model)}


def model_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
