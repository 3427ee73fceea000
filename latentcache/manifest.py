"""Library versions for the manifest; the cache's records live in `latentcache.cache` (re-exported here)."""

from __future__ import annotations

import platform

from .cache.records import StaleOutputError, identity_diff

__all__ = ["StaleOutputError", "identity_diff", "library_versions"]


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("latentcache", "torch", "diffusers", "ray", "pyarrow", "safetensors", "fsspec", "pillow", "numpy")
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions
