"""Input shards -> blocks of raw rows {key, shard, index, image bytes, caption}.

One reader per input format behind a registry. Each shard's rows end with one *marker* row
(key null, `shard_rows` = how many samples were read, `error` = why reading stopped early),
so the driver knows when every row of a shard has been accounted for and can commit it.

A shard that cannot be read wholly (a tar cut short, a truncated Parquet file, an unreadable
image file of a folder chunk) gets `shard_status: "failed"`: it is never committed, so a rerun
retries it. The rows read before the failure still flow, so the failed shard's known keys reach
the errors table.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .errors import LatentcacheError, UserError
from .preprocess import IMAGE_EXTENSIONS
from .rows import RAW_SCHEMA

CAPTION_EXTENSIONS = ("txt", "caption")
FOLDER_SHARD_SIZE = 1000


class InputError(UserError, ValueError):  # ValueError: what callers caught before it existed
    """The input cannot be used as given (format, columns): one line for the user, before the run."""


class ShardDataError(LatentcacheError):
    """The shard cannot be read wholly (e.g. a tar cut mid-member): the shard fails, its keys so far are kept."""


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes | None
    caption: str | None = None
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class SourceOptions:
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials
    image_column: str = "image"
    key_column: str = "key"
    caption_column: str = "caption"

    @classmethod
    def from_config(cls, cfg: Any) -> SourceOptions:
        return cls(
            storage_options=cfg.storage_options,
            image_column=cfg.image_column,
            key_column=cfg.key_column,
            caption_column=cfg.caption_column,
        )


@dataclass(frozen=True)
class ShardRef:
    """One unit of input, resume and output: a tar, a Parquet file, or a chunk of a folder's images."""

    url: str
    name: str  # output name without extension, relative to the output prefix
    format: str
    members: tuple[str, ...] = ()  # folder input: the image URLs of this chunk

    @property
    def id(self) -> str:
        """The value of the `shard` column: the input URL (a folder chunk adds its part name)."""
        return f"{self.url}#{self.name}" if self.members else self.url


# ---- WebDataset tars -------------------------------------------------------------------------

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's convention: key up to the basename's first dot


def split_member_name(name: str) -> tuple[str, str] | None:
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def _sample_from_members(key: str, members: dict[str, bytes]) -> Sample:
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    caption_ext = next((ext for ext in CAPTION_EXTENSIONS if ext in members), None)
    caption = members[caption_ext].decode("utf-8", errors="replace") if caption_ext else None
    if image_ext is None:
        return Sample(key, None, caption, f"no image member (found: {', '.join(sorted(members)) or 'nothing'})")
    return Sample(key, members[image_ext], caption)


class _EndRecordingTarInfo(tarfile.TarInfo):
    """Remembers why tarfile stopped: it ends silently at a missing, cut or invalid header after the
    first member, while only a zero block (the end-of-archive marker) means the writer finished."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.end_error = exc  # type: ignore[attr-defined]
            raise


TAR_END_PROBLEMS = {
    tarfile.EmptyHeaderError: "tar shard ends without its end-of-archive marker (cut at a member boundary?)",
    tarfile.TruncatedHeaderError: "tar shard is cut inside a member header",
    tarfile.InvalidHeaderError: "tar shard has an invalid member header",
}


def check_tar_end(tar: tarfile.TarFile) -> None:
    end = getattr(tar, "end_error", None)
    problem = next((text for kind, text in TAR_END_PROBLEMS.items() if isinstance(end, kind)), None)
    if problem is not None:
        raise ShardDataError(f"{problem}: {end}")


def iter_tar_samples(stream: Any) -> Iterator[Sample]:
    """Groups consecutive tar members by key, as webdataset does, streaming (never the whole tar).

    A member whose key and extension repeat the previous one starts a new sample with the same
    key (which the commit then records as a duplicate) instead of silently replacing it. A tar
    that ends anywhere but at its end-of-archive marker raises ShardDataError after yielding
    every sample read so far (the one being read when it broke as an error row)."""
    key, members = None, {}
    current = None  # the key of the member being read, while it is read
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndRecordingTarInfo) as tar:
            for info in tar:
                parts = split_member_name(info.name) if info.isfile() else None
                if parts is None:
                    continue
                if key is not None and (parts[0] != key or parts[1] in members):
                    yield _sample_from_members(key, members)
                    key, members = None, {}
                current = parts[0]
                data = tar.extractfile(info).read()
                key, current = parts[0], None
                members[parts[1]] = data
            check_tar_end(tar)
    except Exception as exc:
        if current is not None:
            yield Sample(current, None, None, f"tar shard cut inside this sample: {type(exc).__name__}: {exc}")
        elif key is not None:
            yield _sample_from_members(key, members)
        if isinstance(exc, (tarfile.TarError, EOFError)):
            raise ShardDataError(f"tar shard is damaged: {type(exc).__name__}: {exc}") from None
        raise
    if key is not None:
        yield _sample_from_members(key, members)


def read_tar(shard: ShardRef, options: SourceOptions) -> Iterator[Sample]:
    with storage.open_retrying(shard.url, options.storage_options, block_size=8 << 20) as stream:
        yield from iter_tar_samples(stream)


# ---- Parquet files with image bytes ----------------------------------------------------------


def parquet_columns(schema: pa.Schema, options: SourceOptions, url: str) -> tuple[str | None, str | None]:
    """Checks the image column and picks the key and caption columns; raises a clear error."""
    names = set(schema.names)
    if options.image_column not in names:
        raise InputError(
            f"{url}: image column {options.image_column!r} not found; columns are "
            f"{', '.join(schema.names)} (use --image-column)"
        )
    image_type = schema.field(options.image_column).type
    if not _holds_bytes(image_type):
        raise InputError(
            f"{url}: image column {options.image_column!r} holds {image_type}, not image bytes "
            "(binary, or a struct with a 'bytes' field)"
        )
    key_col = options.key_column if options.key_column in names else None
    if key_col is None and options.key_column != SourceOptions.key_column:
        raise InputError(f"{url}: key column {options.key_column!r} not found (use --key-column)")
    caption_col = options.caption_column if options.caption_column in names else None
    if caption_col is None and options.caption_column != SourceOptions.caption_column:
        raise InputError(f"{url}: caption column {options.caption_column!r} not found (use --caption-column)")
    return key_col, caption_col


def _holds_bytes(kind: pa.DataType) -> bool:
    if pa.types.is_struct(kind):
        return kind.get_field_index("bytes") >= 0 and _holds_bytes(kind.field("bytes").type)
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def check_parquet_shard(shard: ShardRef, options: SourceOptions) -> None:
    """A first file that is not readable Parquet is left to its read, which reports the shard failed."""
    with storage.open_retrying(shard.url, options.storage_options) as f:
        try:
            schema = pq.ParquetFile(f).schema_arrow
        except (pa.ArrowException, OSError):
            return
    parquet_columns(schema, options, shard.url)


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        return value.get("bytes")
    return value


def read_parquet(shard: ShardRef, options: SourceOptions) -> Iterator[Sample]:
    with storage.open_retrying(shard.url, options.storage_options) as f:
        try:
            yield from _parquet_samples(pq.ParquetFile(f), shard.url, options)
        except (pa.ArrowException, OSError) as exc:  # no footer (truncated), a corrupt page header...
            raise ShardDataError(
                f"Parquet shard cannot be read: {type(exc).__name__}: {' '.join(str(exc).split())}"
            ) from None


def _parquet_samples(reader: pq.ParquetFile, url: str, options: SourceOptions) -> Iterator[Sample]:
    key_col, caption_col = parquet_columns(reader.schema_arrow, options, url)
    columns = [c for c in (options.image_column, key_col, caption_col) if c]
    index = 0
    for batch in _row_group_batches(reader, columns):
        data = batch.to_pydict()
        for i, image in enumerate(data[options.image_column]):
            key = str(data[key_col][i]) if key_col else f"{index:09d}"
            yield Sample(key, _image_bytes(image), data[caption_col][i] if caption_col else None)
            index += 1


def _row_group_batches(reader: pq.ParquetFile, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Row group by row group (a batch never spans two), so a corrupt row group keeps the keys before it."""
    for group in range(reader.num_row_groups):
        yield from reader.iter_batches(batch_size=256, columns=columns, row_groups=[group])


# ---- a folder (or prefix) of image files -----------------------------------------------------


def read_folder_chunk(shard: ShardRef, options: SourceOptions) -> Iterator[Sample]:
    """Key = path relative to the folder without extension; caption from a sibling .txt.

    An image file that cannot be read (vanished, a dangling link, no permission) is an error row
    and makes the chunk fail once every other file was read, so all its keys are known."""
    fs, root = storage.url_to_fs(shard.url, options.storage_options)
    unreadable: list[str] = []
    for url in shard.members:
        _, path = storage.url_to_fs(url, options.storage_options)
        key = posixpath.splitext(posixpath.relpath(path, root))[0]
        try:
            image = storage.retrying(fs.cat_file)(path)
        except (OSError, storage.StorageError) as exc:  # transient faults were retried: this file is unreadable
            unreadable.append(f"{url}: {storage.describe(exc, options.storage_options)}")
            yield Sample(key, None, None, f"cannot read image file: {unreadable[-1]}")
            continue
        yield Sample(key, image, _folder_caption(fs, posixpath.splitext(path)[0] + ".txt"))
    if unreadable:
        raise ShardDataError(
            f"{len(unreadable)} of {len(shard.members)} image files cannot be read, first {unreadable[0]}"
        )


def _folder_caption(fs: Any, path: str) -> str | None:
    return storage.retrying(fs.cat_file)(path).decode("utf-8", "replace") if fs.exists(path) else None


SampleReader = Callable[[ShardRef, SourceOptions], Iterator[Sample]]
READERS: dict[str, SampleReader] = {
    "webdataset": read_tar,
    "parquet": read_parquet,
    "folder": read_folder_chunk,
}
SUFFIX_FORMATS = {".tar": "webdataset", ".parquet": "parquet", ".pq": "parquet"}
# Checks run on the driver against the first shard, so a wrong column name is one clear error
# before the run starts instead of every shard failing on the cluster.
PREFLIGHT: dict[str, Callable[[ShardRef, SourceOptions], None]] = {
    "parquet": check_parquet_shard,
}


def preflight(shards: list[ShardRef], options: SourceOptions) -> None:
    check = PREFLIGHT.get(shards[0].format) if shards else None
    if check is not None:
        check(shards[0], options)


# ---- planning: which shards, with which output names -----------------------------------------


def detect_format(urls: list[str]) -> str:
    formats = {SUFFIX_FORMATS.get(posixpath.splitext(u)[1].lower()) for u in urls}
    if formats == {"webdataset"} or formats == {"parquet"}:
        return formats.pop()
    if all(posixpath.splitext(u)[1].lower().lstrip(".") in IMAGE_EXTENSIONS + CAPTION_EXTENSIONS for u in urls):
        return "folder"
    raise InputError(
        "cannot tell the input format from the file names (mixed or unknown suffixes); "
        "pass --input-format webdataset|parquet|folder"
    )


def safe_name(relative: str) -> str:
    """An output name that stays inside the output prefix whatever the input was called."""
    parts = [re.sub(r"[^\w.\-]+", "_", p) for p in relative.split("/") if p not in ("", ".", "..")]
    return "/".join(p.lstrip(".") or "_" for p in parts) or "shard"


def _common_dir(urls: list[str]) -> str:
    return posixpath.commonpath([posixpath.dirname(u) for u in urls]) if len(urls) > 1 else posixpath.dirname(urls[0])


def output_name(shard_id: str, base: str) -> str:
    """A shard's output name: its path below `base` without extension (a folder chunk: its part name)."""
    chunk = re.fullmatch(r".*#(part-\d+)", shard_id)  # a folder chunk's id; a '#' in a file name is no chunk
    if chunk:
        return chunk.group(1)
    return safe_name(posixpath.splitext(posixpath.relpath(shard_id, base))[0])


def plan_shards(pattern: str, fmt: str, storage_options: dict[str, Any]) -> list[ShardRef]:
    urls = storage.expand_inputs(pattern, storage_options)
    fmt = detect_format(urls) if fmt == "auto" else fmt
    if fmt == "folder":
        return _folder_chunks(pattern, urls)
    urls = [u for u in urls if SUFFIX_FORMATS.get(posixpath.splitext(u)[1].lower()) == fmt] or urls
    base = shard_base(urls)
    return [ShardRef(u, output_name(u, base), fmt) for u in urls]


def shard_base(urls: list[str]) -> str:
    """The folder output names are relative to (folder chunks name themselves)."""
    return _common_dir(urls) if urls else ""


def _folder_chunks(pattern: str, urls: list[str]) -> list[ShardRef]:
    images = [u for u in urls if posixpath.splitext(u)[1].lower().lstrip(".") in IMAGE_EXTENSIONS]
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {pattern}")
    plain_dir = not (storage.is_glob(pattern) or "{" in pattern)
    root = pattern.rstrip("/") if plain_dir else _common_dir(images)
    return [
        ShardRef(root, f"part-{i // FOLDER_SHARD_SIZE:05d}", "folder", tuple(images[i : i + FOLDER_SHARD_SIZE]))
        for i in range(0, len(images), FOLDER_SHARD_SIZE)
    ]


# ---- shard -> blocks of raw rows -------------------------------------------------------------


def _rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def read_shard_blocks(shard: ShardRef, options: SourceOptions, *, rows_per_block: int) -> Iterator[pa.Table]:
    """Streams a shard as bounded blocks, then its marker row. Never raises: errors go in the marker."""
    rows: list[dict[str, Any]] = []
    count, error, status = 0, None, "ok"
    try:
        for sample in READERS[shard.format](shard, options):
            rows.append(
                {
                    "key": sample.key,
                    "shard": shard.id,
                    "index": count,
                    "image": sample.image,
                    "caption": sample.caption,
                    "error": sample.error,
                }
            )
            count += 1
            if len(rows) >= rows_per_block:
                yield _rows_table(rows)
                rows = []
    except ShardDataError as exc:
        error, status = str(exc), "failed"
    except Exception as exc:  # noqa: BLE001 - storage faults after retries: the shard is reported failed
        error, status = f"read failed: {storage.describe(exc, options.storage_options)}", "failed"
    rows.append(
        {"key": None, "shard": shard.id, "index": count, "shard_rows": count, "error": error, "shard_status": status}
    )
    yield _rows_table(rows)
