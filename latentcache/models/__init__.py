"""diffusers VAEs: the family registry (families.py), finding and loading a model (loading.py,
remote.py for fsspec URLs) and what a run asks of it (options.py)."""

from .families import FAMILIES, FAMILY_BY_CLASS, Encoded, Family, family_of
from .loading import (
    PICKLE_SUFFIXES,
    WEIGHT_SUFFIXES,
    ModelError,
    ModelSpec,
    load_vae,
    locate,
    looks_local,
    model_device,
    resolve_family,
    weight_files,
    weights_sha256,
)
from .options import HUB_ENV_VARS, TORCH_DTYPES, check_options, compute_dtype, enable_tiling, hub_env, latent_space_for
from .remote import fetch_model, is_remote, sha256_file

__all__ = [
    "FAMILIES",
    "FAMILY_BY_CLASS",
    "HUB_ENV_VARS",
    "PICKLE_SUFFIXES",
    "TORCH_DTYPES",
    "WEIGHT_SUFFIXES",
    "Encoded",
    "Family",
    "ModelError",
    "ModelSpec",
    "check_options",
    "compute_dtype",
    "enable_tiling",
    "family_of",
    "fetch_model",
    "hub_env",
    "is_remote",
    "latent_space_for",
    "load_vae",
    "locate",
    "looks_local",
    "model_device",
    "resolve_family",
    "sha256_file",
    "weight_files",
    "weights_sha256",
]
