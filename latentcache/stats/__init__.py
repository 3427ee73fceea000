"""Exact latent statistics: the mergeable moments every cache records, and `latentcache stats`.

- `moments`: per-channel (count, mean, M2) merged with Chan's formula in float64 (what the
  encoder's writers, the finaliser and the stats command share; imported here).
- `config`: the command's flags. `run`: `run_stats`, which picks a mode and writes stats.json.
- `cache_mode`, `corpus_mode` (the encode pipeline up to the encoder, on Ray), `sampling` (the
  corpus row sample), `partials` (per-block contributions and the driver's accumulator),
  `bootstrap` (the interval over shards), `document` (stats.json and the printed lines), `plot`.

Only `moments` is imported with the package, so the writers that need `Moments` load nothing else.
"""

from .moments import Moments, merge_all, summary

__all__ = ["Moments", "merge_all", "summary"]
