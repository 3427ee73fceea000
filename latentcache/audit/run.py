"""`run_audit`: integrity, the stale-cache check, reconstruction; writes CACHE/__latentcache__/audit/ and
returns the summary."""

from __future__ import annotations

import time
from typing import Any

from ..reader import Cache
from .compare import compare_caches
from .config import AuditConfig
from .findings import Findings
from .identity import check_model, model_spec
from .inputs import gather_inputs
from .integrity import check_complete, check_counts, error_keys, scan_cache
from .reconstruction import metrics_table, reconstruct, sample_keys
from .report import render_report
from .summary import build_summary, write_outputs


def run_audit(cfg: AuditConfig) -> dict[str, Any]:
    """Audits cfg.cache; writes CACHE/__latentcache__/audit/{metrics.parquet,summary.json,report.html};
    returns the summary."""
    started = time.time()
    cache = Cache(cfg.cache, storage_options=cfg.storage_options)
    findings = Findings()
    scan = scan_cache(cache, findings)
    check_complete(cache, findings)
    check_counts(cache, findings)
    errors = error_keys(cache, findings)
    spec = check_model(cfg, cache.manifest, model_spec(cfg, cache.manifest, findings), findings)
    keys = sample_keys(list(scan.where), cfg.sample, cfg.seed) if spec is not None else []
    images = gather_inputs(cfg, cache, scan, errors, keys, findings)
    recon = reconstruct(cfg, cache, scan, spec, keys, images, findings)
    table = metrics_table(recon.rows, cache, scan)
    comparison = compare_caches(cfg, cache, sample_keys(list(scan.where), cfg.sample, cfg.seed), spec, recon, findings)
    summary = build_summary(cfg, cache, scan, errors, findings, recon, time.time() - started)
    if comparison is not None:
        summary["compare"] = comparison
    write_outputs(cache, summary, table, render_report(summary, recon.rows, recon.pairs, cfg.top_k))
    summary["seconds"] = round(time.time() - started, 2)
    return summary
