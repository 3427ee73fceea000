"""safetensors parts: tensors and codec params as tensors, row metadata in `__metadata__`.

The container (8-byte header size, JSON header, raw little-endian data) is written and read here
with numpy because `safetensors.numpy` has no bfloat16 and this package must not import torch.
Files are plain safetensors: `safetensors.torch.load_file` reads them (bf16 as torch.bfloat16).
"""

from __future__ import annotations

import json

import numpy as np

from ..codecs import codec
from .base import FILE_META_KEY, PartData, meta_table

DTYPE_TAGS = {
    "float32": "F32",
    "float16": "F16",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "int8": "I8",
}
# bf16 and fp8 codes are held as their bit patterns (the codec views them); int8 is the int8 codec's codes
TAG_DTYPES = {tag: np.dtype(name) for name, tag in DTYPE_TAGS.items()} | {
    "BF16": np.dtype(np.uint16),
    "F8_E4M3": np.dtype(np.uint8),
}


def pack(tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    chunks, offset = [], 0
    for name, (tag, arr) in tensors.items():
        data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def unpack(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    metadata = header.pop("__metadata__", {})
    body = memoryview(data)[8 + size :]
    tensors = {
        name: np.frombuffer(body[s["data_offsets"][0] : s["data_offsets"][1]], dtype=TAG_DTYPES[s["dtype"]]).reshape(
            s["shape"]
        )
        for name, s in header.items()
    }
    return tensors, metadata


class SafetensorsFormat:
    name, ext = "safetensors", ".safetensors"

    def write(self, part: PartData) -> bytes:
        store = codec(part.codec)
        tensors = {
            n: (store.safetensors_dtype if n != "codes" else DTYPE_TAGS[arr.dtype.name], arr)
            for n, arr in part.tensors.items()
        }
        tensors.update({n: ("F32", arr.astype(np.float32)) for n, arr in part.params.items()})
        rows = part.meta.drop_columns(["key", "shard"]).to_pylist()
        metadata = {
            "keys": json.dumps(part.keys),
            "rows": json.dumps(rows),
            "shard": part.meta.column("shard")[0].as_py() if part.rows else "",
            FILE_META_KEY: json.dumps(part.file_meta()),
        }
        return pack(tensors, metadata)

    def read(self, data: bytes, tensors: tuple[str, ...] | None = None) -> PartData:
        arrays, metadata = unpack(data)
        info = json.loads(metadata[FILE_META_KEY])
        names = [n for n in info["tensors"] if tensors is None or n in tensors]
        keys, rows = json.loads(metadata["keys"]), json.loads(metadata["rows"])
        meta = meta_table([{**r, "key": k, "shard": metadata["shard"]} for k, r in zip(keys, rows)])
        params = {n: a for n, a in arrays.items() if "." in n and n.split(".", 1)[0] in names}
        return PartData({n: arrays[n] for n in names}, params, meta, info["codec"]["name"], info["layout"])

    def read_keys(self, data: bytes) -> list[str]:
        return json.loads(unpack_metadata(data)["keys"])


def unpack_metadata(data: bytes) -> dict[str, str]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__", {})
