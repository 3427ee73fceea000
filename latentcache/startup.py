"""What the driver needs from the model before the encoders start, without paying for the weights.

The driver only reads the model's config (latent space, compute dtype, family checks); the encoder
actors load the weights. Building the diffusers class from its config.json on the meta device gives
exactly the config a full load gives (diffusers fills in the class defaults itself), reads no weights
and allocates no memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .models import Family, ModelSpec, _diffusers_class, load_vae, resolve_family, weight_files


def config_only_possible(spec: ModelSpec) -> bool:
    """A diffusers directory (or cached hub snapshot) with safetensors weights: nothing a load would refuse.

    Single-file checkpoints, pickle-only folders and models missing from this disk go through
    load_vae, whose errors are the clear one-line ones the user must see before any Ray work starts."""
    if Path(spec.model).is_file():
        return False
    return any(f.suffix == ".safetensors" for f in weight_files(spec.model, spec.subfolder))


def model_view(spec: ModelSpec) -> tuple[Any, Family]:
    """The VAE with its config but no weights (meta device) where possible, else the loaded VAE."""
    if not config_only_possible(spec):
        return load_vae(spec)
    family = resolve_family(spec)
    cls = _diffusers_class(family.class_name)
    try:
        config = cls.load_config(spec.model, subfolder=spec.subfolder)
    except Exception:  # noqa: BLE001 - unreadable config: load_vae reports it in its words
        return load_vae(spec)
    with torch.device("meta"):
        vae = cls.from_config(config)
    return vae.eval().requires_grad_(False), family
