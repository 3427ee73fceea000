"""`latentcache stats`: run a mode, write stats.json (and the plot), return the document."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from .. import storage
from .cache_mode import cache_mode
from .config import StatsConfig
from .document import build_document
from .partials import Accumulator
from .plot import plot_png


def corpus_mode(cfg: StatsConfig, progress: bool) -> tuple[Accumulator, dict[str, Any]]:
    from .corpus_mode import corpus_mode as run  # loads Ray (through pipeline) only when a corpus is described

    return run(cfg, progress)


MODES: dict[str, Callable[[StatsConfig, bool], tuple[Accumulator, dict[str, Any]]]] = {
    "cache": cache_mode,
    "corpus": corpus_mode,
}


def run_stats(cfg: StatsConfig, *, progress: bool = True) -> dict[str, Any]:
    """Computes the statistics, writes stats.json (and the plot); returns the document."""
    started = time.time()
    acc, context = MODES[cfg.mode](cfg, progress)
    doc = build_document(acc, cfg, {**context, "output": cfg.output, "plot": cfg.plot}, time.time() - started)
    storage.write_bytes(cfg.output, json.dumps(doc, indent=2).encode(), cfg.storage_options)
    if cfg.plot:
        storage.write_bytes(cfg.plot, plot_png(acc.sample, doc), cfg.storage_options)
    return doc
