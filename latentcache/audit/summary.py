"""summary.json, the outputs under CACHE/__latentcache__/audit/, and the lines the CLI prints."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa

from .. import storage
from ..cache.layout import META
from ..reader import Cache
from ..sinks import parquet_bytes
from .compare import compare_lines
from .config import AuditConfig
from .findings import Findings
from .integrity import CacheScan
from .metrics import distribution, json_number, lpips_status
from .reconstruction import Reconstruction

# Under the cache's metadata folder: Hugging Face `datasets` would read a `_audit/*.parquet` as data.
AUDIT_DIR = f"{META}/audit"


def build_summary(
    cfg: AuditConfig,
    cache: Cache,
    scan: CacheScan,
    errors: list[str],
    findings: Findings,
    recon: Reconstruction,
    seconds: float,
) -> dict[str, Any]:
    scored = [r for r in recon.rows if r["status"] == "ok"]
    lp = lpips_status()
    return {
        "cache": cfg.cache,
        "ok": not findings.failures,
        "counts": {
            "files": len(cache.files),
            "rows_recorded": sum(f.rows for f in cache.files),
            "rows_read": scan.rows,
            "keys": len(scan.where),
            "error_rows": len(errors),
            "sampled": len(recon.rows),
            "scored": len(scored),
        },
        "checks": findings.checks,
        "failures_by_kind": findings.by_kind(),
        "failures": findings.listed(),
        "notes": findings.notes,
        "metrics": {
            name: distribution([r[name] for r in scored])
            for name in ("psnr", "ssim", "lpips")
            if name != "lpips" or lp.available
        },
        "lpips": {"available": lp.available, "reason": lp.reason},
        "sample": {
            "requested": cfg.sample,
            "seed": cfg.seed,
            "status": dict(Counter(r["status"].split(":")[0] for r in recon.rows)),
            "crop_mismatches": sum(1 for r in recon.rows if r["crop_matches"] is False),
        },
        "decode": recon.decode,
        "model": cfg.model or cache.manifest.get("model"),
        "manifest_model_sha256": cache.manifest.get("model_sha256"),
        "latent_space": cache.manifest.get("latent_space"),
        "preprocess": cache.manifest.get("preprocess"),
        "seconds": round(seconds, 2),
    }


def write_outputs(cache: Cache, summary: dict[str, Any], table: pa.Table, html: str) -> None:
    opts = cache.storage_options
    storage.write_bytes(cache.url(f"{AUDIT_DIR}/metrics.parquet"), parquet_bytes(table), opts)
    storage.write_bytes(
        cache.url(f"{AUDIT_DIR}/summary.json"),
        json.dumps(summary, indent=2, default=json_number, allow_nan=False).encode(),
        opts,
    )
    storage.write_bytes(cache.url(f"{AUDIT_DIR}/report.html"), html.encode(), opts)
    summary["outputs"] = {
        name: cache.url(f"{AUDIT_DIR}/{name}") for name in ("metrics.parquet", "summary.json", "report.html")
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The lines the CLI prints: verdict, failures by kind, metric distributions, where the outputs are."""
    c = summary["counts"]
    lines = [
        f"audit: {'PASSED' if summary['ok'] else 'FAILED'}  ({c['files']} files, {c['keys']} keys, "
        f"{c['error_rows']} error rows, {summary['seconds']}s)"
    ]
    lines += [f"  FAILED {kind}: {n}" for kind, n in sorted(summary["failures_by_kind"].items())]
    lines += [f"    {f['kind']}: {f['detail']}" for f in summary["failures"][:20]]
    for name, dist in summary["metrics"].items():
        if dist:
            lines.append(
                f"{name}: mean {fmt_metric(dist['mean'])}  median {fmt_metric(dist['median'])}  "
                f"p5 {fmt_metric(dist['p5'])}  over {dist['count']} keys"
            )
    lines.append(summary["lpips"]["reason"])
    lines += compare_lines(summary.get("compare"))
    lines += [f"note: {n}" for n in summary["notes"]]
    lines += [f"{name}: {url}" for name, url in summary.get("outputs", {}).items()]
    return "\n".join(lines)


def fmt_metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
