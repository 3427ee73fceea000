"""The stale-cache check: the identity `latentcache encode` would record today for the manifest's own
config and the given model (weights sha256, family, latent space, preprocessing), diffed with the manifest."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from ..config import EncodeConfig
from ..manifest import identity_diff
from ..models import ModelError, ModelSpec, latent_space_for, load_vae, weights_sha256
from .config import AuditConfig
from .findings import Findings

IDENTITY_KINDS = {
    "model_sha256": "model_mismatch",
    "model_class": "model_mismatch",
    "latent_space": "latent_space_mismatch",
    "preprocess": "preprocess_mismatch",
}


def recorded_config(manifest: dict[str, Any], **overrides: Any) -> EncodeConfig:
    """The manifest's encode config as today's `EncodeConfig` (fields it does not know are dropped)."""
    known = {f.name for f in dataclasses.fields(EncodeConfig)}
    values = {k: v for k, v in manifest.get("config", {}).items() if k in known}
    return EncodeConfig(**{**values, **overrides})


def expected_identity(cfg: AuditConfig, manifest: dict[str, Any], vae: Any, family: str) -> dict[str, Any]:
    """The identity `latentcache encode` would record today for the manifest's config and this model."""
    # The encoder's own definition, so the two never drift apart. pipeline loads Ray, so only here;
    # the run identity belongs to the cache contract (cache/records.py) once that exists.
    from ..pipeline import identity

    overrides = {
        "model": cfg.model or manifest["model"],
        "model_class": cfg.model_class,
        "model_config": cfg.model_config,
        "allow_pickle": cfg.allow_pickle,
    }
    enc = recorded_config(
        manifest, **overrides, **({"resolution": cfg.resolution} if cfg.resolution is not None else {})
    )
    ident = identity(enc, weights_sha256(enc.model), family, latent_space_for(vae, enc).to_dict())
    return json.loads(json.dumps(ident))  # tuples -> lists, as the manifest stores them


def check_identity(cfg: AuditConfig, manifest: dict[str, Any], vae: Any, family: str, findings: Findings) -> None:
    expected = expected_identity(cfg, manifest, vae, family)
    for key in identity_diff(manifest, expected):
        findings.fail(
            IDENTITY_KINDS.get(key, "config_mismatch"),
            f"{key}: cache has {json.dumps(manifest.get(key), sort_keys=True)}, "
            f"{cfg.model or manifest['model']} gives {json.dumps(expected.get(key), sort_keys=True)}",
        )
    findings.checks.append("model_identity")


def model_spec(cfg: AuditConfig, manifest: dict[str, Any], findings: Findings) -> ModelSpec | None:
    """--model, else the recorded model while it still exists (a hub id only from the local cache)."""
    if cfg.model:
        return ModelSpec(
            model=cfg.model, model_class=cfg.model_class, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle
        )
    recorded = manifest.get("model")
    if recorded and (os.path.exists(recorded) or weights_sha256(recorded)):
        findings.notes.append(f"no --model given: using the model recorded in the manifest, {recorded}")
        return ModelSpec(
            model=recorded, model_class=cfg.model_class, model_config=cfg.model_config, allow_pickle=cfg.allow_pickle
        )
    findings.notes.append(
        f"no --model given and the recorded model {recorded} is not available: model check and reconstruction skipped"
    )
    return None


def check_model(
    cfg: AuditConfig, manifest: dict[str, Any], spec: ModelSpec | None, findings: Findings
) -> ModelSpec | None:
    """The stale-cache check; returns the spec to decode with, or None when the model is unusable."""
    if spec is None:
        return None
    try:
        vae, family = load_vae(spec)
    except ModelError as exc:
        if cfg.model:
            raise
        findings.notes.append(f"recorded model cannot be loaded ({exc}): model check and reconstruction skipped")
        return None
    check_identity(dataclasses.replace(cfg, model=spec.model), manifest, vae, family.name, findings)
    return spec
