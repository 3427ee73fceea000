"""The encode command's start-up, made cheap: the model's config without its weights, Ray's workers ready.

The driver only reads the model's config (latent space, compute dtype, family checks); the encoder
actors load the weights. Building the diffusers class from its config.json on the meta device gives
exactly the config a full load gives (diffusers fills in the class defaults itself), reads no weights
and allocates no memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import allocator
from .models import Family, ModelSpec, hub_env, load_vae, locate, resolve_family, weight_files


def config_only_possible(spec: ModelSpec) -> bool:
    """A diffusers directory (or cached hub snapshot) with safetensors weights: nothing a load would refuse.

    Single-file checkpoints, pickle-only folders and models missing from this disk go through
    load_vae, whose errors are the clear one-line ones the user must see before any Ray work starts."""
    if Path(spec.model).is_file():
        return False
    return any(f.suffix == ".safetensors" for f in weight_files(spec.model, spec.subfolder))


def model_view(spec: ModelSpec) -> tuple[Any, Family]:
    """The VAE with its config but no weights (meta device) where possible, else the loaded VAE."""
    import diffusers

    local = locate(spec)  # as load_vae does: a path, a cached hub snapshot or a fetched URL
    if not config_only_possible(local):
        return load_vae(spec)
    family = resolve_family(local)
    cls = getattr(diffusers, family.class_name)
    try:
        config = cls.load_config(local.model, subfolder=local.subfolder)
    except Exception:  # noqa: BLE001 - unreadable config: load_vae reports it in its words
        return load_vae(spec)
    with torch.device("meta"):
        vae = cls.from_config(config)
    if any(True for _ in vae.buffers()):  # buffers hold values the convention reads (Flux.2's BatchNorm stats)
        return load_vae(spec)
    return vae.eval().requires_grad_(False), family


# ---- Ray's workers: the allocator, and no per-actor environment when nothing needs one -------

_local_cluster: list[bool] = []  # set once this process has started its own local Ray
# OpenMP threads waiting at a barrier sleep instead of spinning. On CPU the encoder's torch threads
# share the cores with the decode tasks, and a spinning thread burns the core its descheduled peer
# needs: the stand-in encoder spent 9.7 CPU s on 4,096 images spinning, 4.1 s sleeping, while the
# tiny workload's encoder alone runs at the same speed either way (docs/benchmarks.md).
THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def worker_env() -> dict[str, str]:
    """What the processes Ray starts need in their environment: the allocator and the thread policy."""
    return {**{name: os.environ.get(name, value) for name, value in THREAD_ENV.items()}, **allocator.worker_env()}


def init_local_ray(**init_args: Any) -> None:
    """ray.init() of a local cluster whose raylet, and so every worker it starts, preloads the allocator.

    The workers inherit this process's environment, so the encoder needs no runtime_env of its own
    and can take a worker Ray has already started instead of waiting for a fresh one."""
    import ray

    env = worker_env()
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        ray.init(**init_args)
        _local_cluster.append(True)
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def encoder_runtime_env() -> dict[str, Any] | None:
    """None on the local cluster started here (the workers already have it all), else worker_env() and
    the hub settings (a cluster's workers do not see the submitting shell's environment)."""
    if _local_cluster:
        return None
    return {"env_vars": {**worker_env(), **hub_env()}}
