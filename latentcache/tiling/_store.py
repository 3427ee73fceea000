"""Where whole feature maps live between banded ops: device memory, pinned host memory or a temp file.

Device maps are plain [B, C, H, W] tensors. Host and file maps keep rows outermost ([H, B, C, W])
so that a band of rows is one contiguous slab: one host-to-device copy, or one file read.
"""

from __future__ import annotations

import os
import tempfile
from typing import NamedTuple

import torch

from ._stats import RunningStats

STORE_MODES = ("auto", "device", "host", "file")
# A map may take at most this share of the memory free when it is allocated: the rest is
# headroom for the bands, the attention K/V and the one or two other maps still alive.
_FIT_FRACTION = 0.5


class MapShape(NamedTuple):
    batch: int
    channels: int
    height: int
    width: int

    def row_bytes(self, dtype: torch.dtype) -> int:
        return self.batch * self.channels * self.width * _itemsize(dtype)

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.height * self.row_bytes(dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class RowStore:
    """Storage of one map; `read` returns [B, C, r1 - r0, W] on the compute device."""

    def read(self, r0: int, r1: int) -> torch.Tensor:
        raise NotImplementedError

    def write(self, r0: int, band: torch.Tensor) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free the storage now rather than when the garbage collector gets to it."""


class DenseStore(RowStore):
    """A [B, C, H, W] tensor on the compute device (or in CPU memory when computing on the CPU)."""

    def __init__(self, dense: torch.Tensor, device: torch.device) -> None:
        self._dense: torch.Tensor | None = dense
        self._device = device

    def read(self, r0: int, r1: int) -> torch.Tensor:
        assert self._dense is not None, "store already closed"
        return self._dense[:, :, r0:r1].to(self._device)

    def write(self, r0: int, band: torch.Tensor) -> None:
        assert self._dense is not None, "store already closed"
        self._dense[:, :, r0 : r0 + band.shape[2]].copy_(band)

    def close(self) -> None:
        self._dense = None


class HostRowStore(RowStore):
    """A pinned [H, B, C, W] host tensor feeding a CUDA device."""

    def __init__(self, rows: torch.Tensor, device: torch.device) -> None:
        self._rows: torch.Tensor | None = rows
        self._device = device

    def read(self, r0: int, r1: int) -> torch.Tensor:
        assert self._rows is not None, "store already closed"
        # Stream-ordered: the kernels that consume the band run after the copy lands.
        return self._rows[r0:r1].to(self._device, non_blocking=True).permute(1, 2, 0, 3)

    def write(self, r0: int, band: torch.Tensor) -> None:
        assert self._rows is not None, "store already closed"
        self._rows[r0 : r0 + band.shape[2]].copy_(band.permute(2, 0, 1, 3))

    def close(self) -> None:
        self._rows = None


class FileRowStore(RowStore):
    """An unlinked temp file accessed with pread/pwrite.

    Not mmap: mapped pages count as resident memory of the process until the kernel evicts
    them, page cache does not, so explicit I/O keeps the footprint bounded.
    """

    def __init__(self, shape: MapShape, dtype: torch.dtype, device: torch.device) -> None:
        self._shape, self._dtype, self._device = shape, dtype, device
        self._row_bytes = shape.row_bytes(dtype)
        self._file = tempfile.TemporaryFile(prefix="latentcache-tile-")
        self._file.truncate(shape.nbytes(dtype))

    def read(self, r0: int, r1: int) -> torch.Tensor:
        b, c, _, w = self._shape
        buf = torch.empty((r1 - r0, b, c, w), dtype=self._dtype)
        _pread_into(self._file.fileno(), _bytes(buf), r0 * self._row_bytes)
        return buf.to(self._device).permute(1, 2, 0, 3)

    def write(self, r0: int, band: torch.Tensor) -> None:
        rows = band.permute(2, 0, 1, 3).contiguous().cpu()
        _pwrite_all(self._file.fileno(), _bytes(rows), r0 * self._row_bytes)

    def close(self) -> None:
        self._file.close()


def _bytes(t: torch.Tensor) -> memoryview:
    # A byte view works for every dtype, bfloat16 included (numpy has no bfloat16).
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read from tile store at offset {offset + done}")
        done += n


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)


def allocate_store(shape: MapShape, dtype: torch.dtype, device: torch.device, mode: str) -> RowStore:
    if mode not in STORE_MODES:
        raise ValueError(f"store must be one of {STORE_MODES}, got {mode!r}")
    chosen = _auto_mode(shape.nbytes(dtype), device) if mode == "auto" else mode
    if chosen == "file":
        return FileRowStore(shape, dtype, device)
    try:
        return _memory_store(shape, dtype, device, chosen)
    except (RuntimeError, MemoryError):
        if mode != "auto":
            raise
        return FileRowStore(shape, dtype, device)  # the estimate was optimistic: disk always works


def _memory_store(shape: MapShape, dtype: torch.dtype, device: torch.device, mode: str) -> RowStore:
    if mode == "host" and device.type == "cuda":
        rows = torch.empty((shape.height, shape.batch, shape.channels, shape.width), dtype=dtype, pin_memory=True)
        return HostRowStore(rows, device)
    # On a CPU (or MPS) device "host" is plain CPU memory.
    where = device if mode == "device" else torch.device("cpu")
    return DenseStore(torch.empty(shape, dtype=dtype, device=where), device)


def _auto_mode(nbytes: int, device: torch.device) -> str:
    if nbytes <= _FIT_FRACTION * free_device_bytes(device):
        return "device"
    if device.type == "cuda" and nbytes <= _FIT_FRACTION * host_available_bytes():
        return "host"
    return "file"


def free_device_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return host_available_bytes()
    free, _ = torch.cuda.mem_get_info(device)
    # Blocks cached by PyTorch's allocator are free for us too.
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def host_available_bytes() -> int:
    return min(_meminfo_available(), _cgroup_available())


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_available() -> int:
    # Containers (Ray workers, k8s) are limited by their cgroup, which MemAvailable ignores.
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
    except (OSError, ValueError):
        return 1 << 62
    return 1 << 62 if limit == "max" else max(0, int(limit) - used)


class FeatureMap:
    """A stored map plus the GroupNorm statistics gathered while it was written."""

    def __init__(self, store: RowStore, shape: MapShape, track_stats: bool, dense: torch.Tensor | None = None):
        self.store, self.shape = store, shape
        self._stats = RunningStats() if track_stats else None
        self.dense = dense  # the [B, C, H, W] tensor behind the store, for final outputs

    @property
    def stats(self) -> RunningStats:
        if self._stats is None:
            raise RuntimeError("this feature map was written without statistics")
        return self._stats

    def read(self, r0: int, r1: int) -> torch.Tensor:
        return self.store.read(r0, r1)

    def write(self, r0: int, band: torch.Tensor) -> None:
        self.store.write(r0, band)
        if self._stats is not None:
            self._stats.update(band)

    def release(self) -> None:
        self.store.close()
