"""`--model` as an fsspec URL (s3://bucket/vaes/flux2/): fetched once per node into a local cache.

The cache (LATENTCACHE_MODEL_CACHE, default ~/.cache/latentcache/models) holds one directory per
model, named by the sha256 of its files' sha256s, so the name says what is inside and a changed
object in the bucket can never be mistaken for the cached one:

    <root>/<key>/...            the model's files, as under the URL
    <root>/<key>.json           {"url": ..., "files": {relative path: sha256}}
    <root>/sources/<id>.json    the key for a URL and the listing it had (size, ETag/mtime)
    <root>/fetches.log          one line per download (what was fetched, by which process)

A process that knows the hashes (an encoder actor, told by the driver) finds its directory by key
without touching the bucket; the driver looks the URL's current listing up in `sources/`. An
exclusive lock on <root>/.lock makes the processes of one node fetch once between them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ModelError

LOCAL_PROTOCOLS = ("file", "local")


class RemoteModelError(ModelError):
    """The model URL cannot be listed, fetched or verified."""


def is_remote(model: str) -> bool:
    return "://" in model and model.split("://", 1)[0] not in LOCAL_PROTOCOLS


def cache_root() -> Path:
    default = Path.home() / ".cache" / "latentcache" / "models"
    return Path(os.environ.get("LATENTCACHE_MODEL_CACHE") or default)


def files_key(files: dict[str, str]) -> str:
    """The cache key: sha256 over the sorted (path, sha256) pairs of every file."""
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def node_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def _listing(url: str, storage_options: dict[str, Any]) -> tuple[Any, str, dict[str, dict[str, Any]]]:
    """(filesystem, root path, relative path -> info) for the files under the URL (or the one file)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        if fs.isfile(path):
            return fs, path, {Path(path).name: fs.info(path)}
        found = fs.find(path, detail=True)
    except Exception as exc:  # noqa: BLE001 - fsspec backends raise many types; the user needs one line
        raise RemoteModelError(f"--model {url}: cannot list it: {type(exc).__name__}: {exc}") from None
    if not found:
        raise RemoteModelError(
            f"--model {url}: no files there (expected a diffusers VAE directory or one weights file)"
        )
    root = path.rstrip("/")
    return fs, root, {p[len(root) :].lstrip("/"): info for p, info in found.items()}


def _source_id(url: str, listing: dict[str, dict[str, Any]]) -> str:
    """The URL plus each file's size and version marker: a rewritten object gets a new id."""

    def marker(info: dict[str, Any]) -> str:
        return str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")

    entries = sorted((name, info.get("size"), marker(info)) for name, info in listing.items())
    return hashlib.sha256(json.dumps([url.rstrip("/"), entries], default=str).encode()).hexdigest()


def _cached(root: Path, key: str) -> dict[str, Any] | None:
    """The record of a complete copy ({"url", "files", "single"}), or None."""
    record = root / f"{key}.json"
    if (root / key).is_dir() and record.is_file():
        return json.loads(record.read_text())
    return None


def _local_path(root: Path, key: str, record: dict[str, Any]) -> Path:
    """A directory model is loaded from its directory, a single weights file from the file."""
    return root / key / next(iter(record["files"])) if record.get("single") else root / key


def _download(
    fs: Any, base: str, listing: dict[str, Any], url: str, root: Path, single: bool
) -> tuple[str, dict[str, Any]]:
    """Every file into a temporary directory, hashed, then renamed to its key (atomic on one filesystem)."""
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
    try:
        for name in listing:
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(base if single else f"{base}/{name}", str(target))
        files = {name: sha256_file(tmp / name) for name in sorted(listing)}
        key = files_key(files)
        if (root / key).is_dir():
            shutil.rmtree(root / key)  # a partial leftover without its record
        os.rename(tmp, root / key)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, RemoteModelError):
            raise
        raise RemoteModelError(f"--model {url}: fetching it failed: {type(exc).__name__}: {exc}") from None
    record = {"url": url, "files": files, "single": single}
    (root / f"{key}.json").write_text(json.dumps(record, indent=1))
    with open(root / "fetches.log", "a") as log:
        log.write(json.dumps({"url": url, "key": key, "host": socket.gethostname(), "pid": os.getpid()}) + "\n")
    return key, record


def fetch_model(
    url: str, storage_options: dict[str, Any] | None = None, expected: dict[str, str] | None = None
) -> tuple[Path, dict[str, str]]:
    """The local copy of the model at `url` and its files' sha256s, downloading it at most once per node.

    `expected` (the hashes the driver saw) finds the copy without listing the bucket and makes a
    download that hashes differently an error instead of a silently different model."""
    root = cache_root()
    with node_lock(root):
        key = files_key(expected) if expected is not None else None
        record = _cached(root, key) if key else None
        if record is None:
            key, record = _lookup_or_download(url, storage_options or {}, root)
    if expected is not None and record["files"] != expected:
        raise RemoteModelError(
            f"--model {url}: its files changed since this run started (sha256 differs from what "
            "the driver recorded); rerun to encode with the new model"
        )
    return _local_path(root, key, record), record["files"]


def _lookup_or_download(url: str, storage_options: dict[str, Any], root: Path) -> tuple[str, dict[str, Any]]:
    """The URL's current listing -> the copy made from it before, or a fresh download (under the node lock)."""
    fs, base, listing = _listing(url, storage_options)
    single = len(listing) == 1 and fs.isfile(base)
    source = root / "sources" / f"{_source_id(url, listing)}.json"
    key = json.loads(source.read_text())["key"] if source.is_file() else None
    record = _cached(root, key) if key else None
    if record is None:
        key, record = _download(fs, base, listing, url, root, single)
        source.parent.mkdir(exist_ok=True)
        source.write_text(json.dumps({"url": url, "key": key}))
    return key, record
