"""`latentcache audit`: is the cache complete, uncorrupted, not stale, and how well does it reconstruct?

- `integrity`: one pass over every file (files exist and parse; rows, shapes, dtypes as the
  manifest records; no NaN/Inf; no duplicate keys) and, with --input, every input key is in the
  cache or in `_errors` (nothing lost, nothing extra). Failures collect in `findings`.
- `identity`: the stale-cache check; rebuilds the run identity the encoder would record for the
  manifest's own config and the given model, and diffs it with the manifest.
- `inputs`, `decode`, `reconstruction`, `metrics`: decode a seeded sample of keys with the same VAE
  (on this process or Ray GPU actors), rebuild the preprocessed sources, score PSNR/SSIM (LPIPS
  when available offline).
- `summary`, `report`, `run`: everything lands in CACHE/_audit/ (metrics.parquet, summary.json,
  report.html); `run_audit` is the command.
"""

from .config import AuditConfig
from .reconstruction import sample_keys
from .run import run_audit
from .summary import format_summary

__all__ = ["AuditConfig", "format_summary", "run_audit", "sample_keys"]
