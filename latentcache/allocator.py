"""Which malloc the Ray workers run with: tcmalloc (or jemalloc) when the machine has one.

glibc hands every buffer above its mmap threshold (32 MB at most) straight back to the kernel when
it is freed, so each encoder batch maps its activations afresh and the kernel zero-fills them page
by page: 0.9 million page faults for one batch of 8 images through the tiny workload's encoder at
256 px, about 45% of its CPU time (bench/actor_overhead.py and docs/benchmarks.md). tcmalloc keeps
freed pages for reuse out of the box; jemalloc does only with its page decay turned off (its default
purges big extents at once, which faults just as much). The library is preloaded into the processes
Ray starts, so the encoder's allocations go through it from the first one; when none is installed
(scripts/setup.sh installs libtcmalloc-minimal4 where apt is available) glibc stays: nothing is lost
but speed. LATENTCACHE_ALLOCATOR=system turns this off; =tcmalloc, =jemalloc or a library path picks one.
"""

from __future__ import annotations

import os
from pathlib import Path

LIBRARIES = {"tcmalloc": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"}  # in order of preference
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# jemalloc keeps freed pages (no decay): a worker's memory stays at its peak, which it reaches again every batch.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# tcmalloc reports every allocation over 1 GB on stderr by default: a big batch is not news.
TCMALLOC_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def find_library(name: str) -> str | None:
    for folder in LIBRARY_DIRS:
        path = Path(folder, name)
        if path.is_file():
            return str(path)
    return None


def preload_path(choice: str | None = None) -> str | None:
    """The allocator library to preload, or None for glibc's own malloc."""
    choice = choice or os.environ.get("LATENTCACHE_ALLOCATOR", "auto")
    if choice == "system":
        return None
    if choice in LIBRARIES:
        return find_library(LIBRARIES[choice])
    if choice != "auto":
        return choice if Path(choice).is_file() else None
    return next((path for path in map(find_library, LIBRARIES.values()) if path), None)


def worker_env(choice: str | None = None) -> dict[str, str]:
    """Environment variables that make a newly started process use the allocator (empty: keep glibc)."""
    path = preload_path(choice)
    if path is None:
        return {}
    existing = os.environ.get("LD_PRELOAD", "")
    env = {"LD_PRELOAD": existing if path in existing.split() else f"{path} {existing}".strip()}
    if "jemalloc" in Path(path).name:
        env["MALLOC_CONF"] = os.environ.get("MALLOC_CONF", JEMALLOC_CONF)
    if "tcmalloc" in Path(path).name:
        env.update({k: os.environ.get(k, v) for k, v in TCMALLOC_QUIET.items()})
    return env
