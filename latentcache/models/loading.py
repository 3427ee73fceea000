"""Finding and loading a VAE: a local directory or file, a Hugging Face hub id, or an fsspec URL.

Every model ends up loaded from local files. A hub id is served from the local hub cache when it is
there; otherwise the hub is probed once with a short timeout, so a typo or a machine without
network fails in seconds with one line (and how to fetch the model), not after a minute of
retries. A URL is fetched once per node (models/remote.py).
"""

from __future__ import annotations

import difflib
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError
from .families import FAMILIES, FAMILY_BY_CLASS, Family
from .remote import fetch_model, is_remote, sha256_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
HUB_PROBE_TIMEOUT_S = 5.0  # one try; huggingface_hub's own retries took ~50 s to give up offline


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    model: str
    model_class: str = "auto"
    model_config: str | None = None
    allow_pickle: bool = False
    subfolder: str | None = None  # e.g. "vae" inside a full pipeline repo or directory
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # for a URL --model; may hold secrets
    sha256: dict[str, str] | None = None  # a URL model's file hashes as the driver saw them (set by pinned())

    @classmethod
    def from_config(cls, cfg: Any) -> ModelSpec:
        spec = cls(
            model=cfg.model,
            model_class=cfg.model_class,
            model_config=cfg.model_config,
            allow_pickle=cfg.allow_pickle,
            subfolder=getattr(cfg, "model_subfolder", None),
            storage_options=dict(getattr(cfg, "storage_options", None) or {}),
        )
        return spec.pinned()

    def pinned(self) -> ModelSpec:
        """A URL model with the hashes of the copy this process has (fetching it if needed): the spec
        handed to other nodes, which then find or verify their copy by them."""
        if not is_remote(self.model) or self.sha256 is not None:
            return self
        return replace(self, sha256=fetch_model(self.model, self.storage_options)[1])

    def local(self) -> ModelSpec:
        """The same spec with `model` a local path (a URL fetched into this node's cache)."""
        if not is_remote(self.model):
            return self
        path, _ = fetch_model(self.model, self.storage_options, self.sha256)
        return replace(self, model=str(path))

    @property
    def folder(self) -> Path:
        """The local directory holding the VAE's files (when --model is a directory)."""
        return Path(self.model, self.subfolder or "")


def looks_local(model: str) -> bool:
    """A path, not a hub id ("org/name"): absolute, relative with ./ ../ ~, a weights file name,
    deeper than org/name, or org/name whose org is a directory here (a typo in a local path)."""
    if model.startswith(("/", "./", "../", "~", ".\\")) or model.endswith(WEIGHT_SUFFIXES + (".json",)):
        return True
    parts = model.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def missing_path_error(model: str) -> ModelError:
    path = Path(model).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    hint = ""
    if parent.is_dir():
        close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1)
        hint = f"; did you mean {parent / close[0]}?" if close else ""
    return ModelError(f"--model {model}: no such file or directory{hint}")


def hub_snapshot(spec: ModelSpec) -> Path | None:
    """The hub id's snapshot directory in the local hub cache, or None (no network is used)."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(spec.model, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a valid id): the caller decides what to say
        return None
    return path if (path / (spec.subfolder or "") / "config.json").is_file() else None


def hub_reachable(model: str) -> str | None:
    """None when the hub answers within the timeout, else why not (one short try, no retries)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S)
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as exc:
        return f"{constants.ENDPOINT} cannot be reached ({getattr(exc, 'reason', exc)})"
    return None


def hub_error(spec: ModelSpec, why: str) -> ModelError:
    include = f" --include '{spec.subfolder}/*'" if spec.subfolder else ""
    return ModelError(
        f"--model {spec.model}: not in the local Hugging Face cache and {why}; fetch it once where "
        f"there is network (hf download {spec.model}{include} --local-dir DIR) and pass --model DIR"
    )


def locate(spec: ModelSpec) -> ModelSpec:
    """The spec with `model` pointing at local files when it can (a path, a cached hub snapshot, a
    fetched URL); a hub id stays an id only when it must be downloaded and the hub answers."""
    if is_remote(spec.model):
        return spec.local()
    if Path(spec.model).expanduser().exists():
        return replace(spec, model=str(Path(spec.model).expanduser()))
    if looks_local(spec.model):
        raise missing_path_error(spec.model)
    snapshot = hub_snapshot(spec)
    if snapshot is not None:
        return replace(spec, model=str(snapshot))
    why = hub_reachable(spec.model)
    if why:
        raise hub_error(spec, why)
    return spec


def _read_config(spec: ModelSpec) -> dict[str, Any] | None:
    for folder in (spec.model_config, spec.folder):
        if folder and Path(folder, "config.json").is_file():
            return json.loads(Path(folder, "config.json").read_text())
    if spec.model_config or Path(spec.model).exists():
        return None
    from huggingface_hub import hf_hub_download  # a hub id the probe found reachable

    try:
        return json.loads(Path(hf_hub_download(spec.model, "config.json", subfolder=spec.subfolder)).read_text())
    except Exception as exc:  # noqa: BLE001 - an unknown id or a gated repo: one line
        raise ModelError(
            f"--model {spec.model}: cannot read its config.json from the hub: {str(exc).strip().splitlines()[0]}"
        ) from None


def resolve_family(spec: ModelSpec) -> Family:
    if spec.model_class != "auto":
        return FAMILIES[spec.model_class]
    config = _read_config(spec)
    class_name = (config or {}).get("_class_name", "AutoencoderKL")
    if class_name not in FAMILY_BY_CLASS:
        raise ModelError(
            f"{spec.model}: model class {class_name} is not a supported VAE "
            f"({', '.join(FAMILY_BY_CLASS)}); pass --model-class to force one"
        )
    return FAMILY_BY_CLASS[class_name]


def check_pickle(path: str, allow_pickle: bool) -> None:
    if path.endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise ModelError(
            f"{path} is a pickle-based checkpoint, which can run arbitrary code when loaded; "
            "convert it to .safetensors or pass --allow-pickle if you trust it"
        )


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
    safetensors_only = None if spec.allow_pickle else True
    return cls.from_pretrained(spec.model, subfolder=spec.subfolder, use_safetensors=safetensors_only)


def load_vae(spec: ModelSpec) -> tuple[Any, Family]:
    """Loads the VAE the way a user would with diffusers, in float32 on CPU, in eval mode."""
    shown = spec.model
    spec = locate(spec)
    family = resolve_family(spec)
    cls = getattr(__import__("diffusers"), family.class_name)
    single_file = Path(spec.model).is_file()
    try:
        vae = _load_single_file(cls, spec) if single_file else _load_pretrained(cls, spec)
    except ModelError:
        raise
    except Exception as exc:
        hint = (
            "; pass --model-config DIR (a diffusers VAE config.json) to load it offline"
            if (single_file and not spec.model_config)
            else ""
        )
        raise ModelError(f"cannot load VAE from {shown}: {str(exc).strip().splitlines()[0]}{hint}") from exc
    return vae.eval().requires_grad_(False), family


def weight_files(model: str, subfolder: str | None = None) -> list[Path]:
    """The files whose bytes define the model's weights (for the manifest's sha256)."""
    path = Path(model)
    if path.is_file():
        return [path]
    if not path.is_dir():
        snapshot = hub_snapshot(ModelSpec(model=model, subfolder=subfolder))
        if snapshot is None:  # not in the local cache: nothing to hash
            return []
        path = snapshot
    # Only the VAE's own folder: a pipeline repo also holds gigabytes of UNet/text-encoder weights.
    return sorted(p for p in (path / (subfolder or "")).glob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def weights_sha256(
    model: str, subfolder: str | None = None, storage_options: dict[str, Any] | None = None
) -> dict[str, str]:
    """{file: sha256} of the weights; a URL model is hashed from this node's verified copy."""
    if is_remote(model):
        model = ModelSpec(model=model, storage_options=storage_options or {}).local().model
    base = Path(model) if Path(model).exists() else None
    return {
        (str(p.relative_to(base)) if base and base.is_dir() else p.name): sha256_file(p)
        for p in weight_files(model, subfolder)
    }


def model_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
