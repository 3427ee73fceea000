"""Output formats, one registry: write a part, read it, read its keys, drop rows (copy-on-write)."""

from __future__ import annotations

from typing import Protocol

from .base import META_SCHEMA, PartData, meta_table
from .parquet import TENSOR_LAYOUTS, ParquetFormat, column_to_numpy
from .safetensors import SafetensorsFormat


class Format(Protocol):
    name: str
    ext: str

    def write(self, part: PartData) -> bytes: ...

    def read(self, data: bytes, tensors: tuple[str, ...] | None = None) -> PartData: ...

    def read_keys(self, data: bytes) -> list[str]: ...


FORMATS: dict[str, Format] = {"parquet": ParquetFormat(), "safetensors": SafetensorsFormat()}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown cache format {name!r}; known: {', '.join(FORMATS)}") from None


def drop_rows(fmt: Format, data: bytes, keep: list[bool]) -> tuple[bytes, PartData]:
    """The part without the rows `keep` marks False, as new bytes (the old file is never rewritten)."""
    part = fmt.read(data).take(keep)
    return fmt.write(part), part


__all__ = [
    "FORMATS",
    "Format",
    "META_SCHEMA",
    "PartData",
    "TENSOR_LAYOUTS",
    "column_to_numpy",
    "drop_rows",
    "get_format",
    "meta_table",
]
