"""Every byte in or out goes through fsspec: local paths, s3://, gs://, memory:// alike.

Secrets live only in the storage options handed to fsspec; nothing here logs or returns them.
"""

from __future__ import annotations

import functools
import io
import logging
import posixpath
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem

from .errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")

SECRET_OPTION_WORDS = ("secret", "token", "password", "key", "credential", "session")
TMP_PREFIX = ".tmp-"  # a local file being written; renamed into place when complete


class StorageError(UserError):
    """A storage operation failed after its retries."""


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    # No listings cache: fsspec reuses one instance per options, so a listing cached by an earlier
    # call would hide objects that workers or uploads added since (a resumed run, new shards).
    return fsspec.core.url_to_fs(url, **{"use_listings_cache": False, **(storage_options or {})})


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL a user would type for `path` on `fs` (plain paths stay plain)."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts)


def is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def expand_inputs(pattern: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Brace ranges, then globs, then directories (listed recursively) become a sorted URL list.

    The items of a brace range are matched against a listing of their folder (one LIST per 1000
    objects on a store), not looked at one by one (a HEAD each: hours at 200k shards)."""
    urls: list[str] = []
    listings: dict[str, dict[str, dict[str, Any]] | None] = {}
    for item in braceexpand(pattern):
        fs, path = url_to_fs(item, storage_options)
        if is_glob(path):
            urls += [full_url(fs, p) for p in sorted(retrying(fs.glob)(path)) if fs.isfile(p)]
        else:
            urls += _expand_listed(fs, path, item, listings)
    if not urls:
        raise FileNotFoundError(f"no input files match {pattern}")
    return sorted(dict.fromkeys(urls))


def _folder_listing(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, dict[str, Any]] | None:
    """name -> info of a folder's entries; {} when absent, None when it cannot be listed now."""
    try:
        return {entry["name"].rstrip("/"): entry for entry in retrying(fs.ls)(folder, detail=True)}
    except FileNotFoundError:
        return {}
    except StorageError as exc:
        log.warning("cannot list %s (%s); looking at its inputs one by one", folder, describe(exc))
        return None


def _expand_listed(
    fs: fsspec.AbstractFileSystem, path: str, item: str, listings: dict[str, dict[str, dict[str, Any]] | None]
) -> list[str]:
    folder = posixpath.dirname(path.rstrip("/"))
    if folder not in listings:
        listings[folder] = _folder_listing(fs, folder)
    entry = (listings[folder] or {}).get(path.rstrip("/"))
    if entry is None:
        return _expand_path(fs, path, item)  # not listed (or no listing): ask about it, to say why
    if entry["type"] == "directory":
        return [full_url(fs, p) for p in sorted(retrying(fs.find)(path))]
    return [full_url(fs, path)]


def _expand_path(fs: fsspec.AbstractFileSystem, path: str, item: str) -> list[str]:
    """A directory's files, or the file itself. A file that cannot even be looked at now is kept:
    its read then fails and reports the shard as failed, rather than failing the whole run."""
    try:
        info = retrying(fs.info)(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"input not found: {item}") from None
    except StorageError as exc:
        log.warning("cannot look at %s (%s); keeping it as a shard", item, describe(exc))
        return [full_url(fs, path)]
    if info["type"] == "directory":
        return [full_url(fs, p) for p in sorted(retrying(fs.find)(path))]
    return [full_url(fs, path)]


def retrying(fn: Callable[..., T], *, attempts: int = 5, base_delay: float = 0.2) -> Callable[..., T]:
    """Retries transient storage errors (throttling, 5xx, dropped connections) with jittered backoff.

    FileNotFoundError and PermissionError are not transient and go straight through.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except (FileNotFoundError, PermissionError, IsADirectoryError):
                raise
            except Exception as exc:
                if attempt == attempts - 1:
                    raise StorageError(f"{fn.__name__} failed after {attempts} attempts: {describe(exc)}") from exc
                delay = base_delay * (2**attempt) * (0.5 + random.random())
                log.warning("%s failed (%s); retry %d in %.2fs", fn.__name__, describe(exc), attempt + 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    return wrapper


def describe(exc: BaseException, storage_options: dict[str, Any] | None = None) -> str:
    """A one-line error description. botocore never echoes secrets; fsspec options might, so the
    secret-looking values of `storage_options` (when given) are masked wherever they appear."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    for secret in _secret_values(storage_options or {}):
        text = text.replace(secret, "***")
    return text[:500]


def _secret_values(options: dict[str, Any]) -> list[str]:
    found = []
    for key, value in options.items():
        if isinstance(value, dict):
            found += _secret_values(value)
        elif isinstance(value, str) and value and any(word in key.lower() for word in SECRET_OPTION_WORDS):
            found.append(value)
    return found


def redact(options: dict[str, Any] | None) -> dict[str, Any]:
    """Storage options as they may be recorded: every value that could be a secret is masked."""

    def masked(key: str, value: Any) -> Any:
        if isinstance(value, dict):
            return redact(value)
        if any(word in key.lower() for word in SECRET_OPTION_WORDS):
            return "***"
        return value

    return {k: masked(k, v) for k, v in (options or {}).items()}


def _put_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if isinstance(fs, LocalFileSystem):
        # Same directory, so the rename is atomic: no reader ever sees a half-written file.
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = posixpath.join(posixpath.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(path)}")
        with open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        # Object stores publish an object only when its single PUT completes.
        fs.pipe_file(path, data)


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Atomically publishes `data` at `url`, retrying transient failures."""
    fs, path = url_to_fs(url, storage_options)
    retrying(_put_bytes)(fs, path, data)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = url_to_fs(url, storage_options)
    return retrying(fs.cat_file)(path)


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Only "not found" means absent: fsspec's own `exists` reads a throttled or failed request as
    False, which would skip the stale-output check or redo committed shards."""
    fs, path = url_to_fs(url, storage_options)
    try:
        retrying(fs.info)(path)
    except FileNotFoundError:
        return False
    return True


def list_files(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Files directly or recursively under `url`; empty when it does not exist."""
    fs, path = url_to_fs(url, storage_options)
    fs.invalidate_cache()
    if not exists(url, storage_options):
        return []
    return [full_url(fs, p) for p in sorted(retrying(fs.find)(path))]


def remove_partial_files(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Deletes the temporary files a killed writer left under `url`; returns them.

    Only local filesystems have any: an object store never publishes a partial object."""
    fs, path = url_to_fs(url, storage_options)
    if not isinstance(fs, LocalFileSystem) or not fs.isdir(path):
        return []
    partial = [p for p in fs.find(path) if posixpath.basename(p).startswith(TMP_PREFIX)]
    remove(partial, storage_options)
    return partial


class RetryingReader(io.RawIOBase):
    """A read-only stream that survives transient faults mid-read (a dropped connection, a 503 on
    one range request): the failed read reopens the object at the same offset, with backoff,
    instead of failing the whole shard."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, **open_kwargs: Any) -> None:
        super().__init__()
        self.fs, self.path, self.open_kwargs = fs, path, open_kwargs
        self.pos, self.file = 0, None
        self.info = retrying(fs.info)(path)
        self.size = self.info["size"]

    def _reopen(self) -> Any:
        if self.file is None:
            self.file = self.fs.open(self.path, "rb", **self.open_kwargs, **self._known_size())
            if getattr(self.file, "_details", False) is None:
                self.file._details = self.info  # what fsspec would HEAD again (s3fs checks the ETag per range)
            self.file.seek(self.pos)
        return self.file

    def _known_size(self) -> dict[str, int]:
        """The size already looked up, for filesystems whose open() would otherwise look again (s3fs)."""
        import inspect

        return {"size": self.size} if "size" in inspect.signature(self.fs._open).parameters else {}

    def _read(self, size: int) -> bytes:
        try:
            file = self._reopen()
            file.seek(self.pos)
            return file.read(size)
        except Exception:
            self._drop()  # its read-ahead cache may be half-filled: start clean
            raise

    def _drop(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass

    def readinto(self, buffer: Any) -> int:
        data = retrying(self._read)(len(buffer))
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self._drop()
        super().close()


def open_retrying(url: str, storage_options: dict[str, Any] | None = None, **open_kwargs: Any) -> RetryingReader:
    fs, path = url_to_fs(url, storage_options)
    return RetryingReader(fs, path, **open_kwargs)


def remove(urls: list[str], storage_options: dict[str, Any] | None = None) -> None:
    for url in urls:
        fs, path = url_to_fs(url, storage_options)
        try:
            retrying(fs.rm_file)(path)
        except FileNotFoundError:
            pass


def remove_tree(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Deletes everything under `url` (a staging prefix); nothing when it does not exist."""
    fs, path = url_to_fs(url, storage_options)
    if exists(url, storage_options):
        retrying(fs.rm)(path, recursive=True)
