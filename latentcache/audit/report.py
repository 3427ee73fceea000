"""The audit's report.html: one self-contained page (inline CSS, inline SVG, base64 PNG images).

It opens offline in any browser and can be attached to a ticket or a training run as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from typing import Any

import numpy as np

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1 .ok{color:#1a7f37}h1 .fail{color:#cf222e}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}img{width:192px;image-rendering:pixelated;display:block}
code{background:#f4f4f4;padding:0 .2em}.muted{color:#666}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def png_data_uri(image: np.ndarray) -> str:
    """uint8 [H, W, 3] -> a data: URI holding a PNG, so the page needs no other file."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def table(rows: list[tuple[Any, Any]], header: tuple[str, str] | None = None) -> str:
    head = f"<tr><th>{esc(header[0])}</th><th>{esc(header[1])}</th></tr>" if header else ""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{head}{body}</table>"


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return esc(value)


def histogram_svg(values: list[float], *, bins: int = 20, width: int = 600, height: int = 200) -> str:
    """An inline SVG bar chart of the finite values (identical pairs, +inf dB, are counted apart)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "<p class='muted'>no finite PSNR values to plot</p>"
    counts, edges = np.histogram(finite, bins=bins)
    bar_w, top = width / bins, max(counts.max(), 1)
    bars = "".join(
        f"<rect x='{i * bar_w:.1f}' y='{height - 20 - c / top * (height - 40):.1f}' width='{bar_w - 1:.1f}' "
        f"height='{c / top * (height - 40):.1f}' fill='#4a7bd0'>"
        f"<title>{edges[i]:.2f}-{edges[i + 1]:.2f} dB: {c}</title></rect>"
        for i, c in enumerate(counts)
    )
    axis = (
        f"<text x='0' y='{height - 4}' font-size='12'>{edges[0]:.2f} dB</text>"
        f"<text x='{width}' y='{height - 4}' font-size='12' text-anchor='end'>{edges[-1]:.2f} dB</text>"
        f"<text x='0' y='12' font-size='12'>max {top} keys per bin</text>"
    )
    svg = (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"role='img' aria-label='PSNR histogram'>{bars}{axis}</svg>"
    )
    extra = len(values) - len(finite)
    return svg + (f"<p>{extra} key(s) reconstructed exactly (PSNR = inf) are not plotted.</p>" if extra else "")


def metrics_section(summary: dict[str, Any]) -> str:
    rows = []
    for name, dist in summary["metrics"].items():
        cells = (
            ", ".join(f"{k} {fmt(dist[k])}" for k in ("mean", "median", "p5", "min", "max"))
            if dist
            else "no scored keys"
        )
        rows.append((name.upper(), cells))
    rows.append(("LPIPS", esc(summary["lpips"]["reason"])))
    return "<h2>Reconstruction</h2>" + table(rows)


def summary_section(summary: dict[str, Any]) -> str:
    c, d = summary["counts"], summary.get("decode") or {}
    rows = [
        ("cache", f"<code>{esc(summary['cache'])}</code>"),
        ("files / rows read / recorded", f"{c['files']} / {c['rows_read']} / {c['rows_recorded']}"),
        ("unique keys / error rows", f"{c['keys']} / {c['error_rows']}"),
        (
            "sampled / scored",
            f"{c['sampled']} / {c['scored']} (seed {summary['sample']['seed']}; "
            f"statuses {esc(json.dumps(summary['sample']['status']))}; "
            f"crop mismatches {summary['sample']['crop_mismatches']})",
        ),
        ("checks run", esc(", ".join(summary["checks"]))),
        ("model", f"<code>{esc(summary['model'])}</code>"),
        ("latent space", esc((summary.get("latent_space") or {}).get("formula", ""))),
        ("preprocess", esc(json.dumps(summary.get("preprocess"), sort_keys=True))),
        ("decode", esc(", ".join(f"{k} {v}" for k, v in d.items())) or "not run"),
        ("runtime", f"{summary['seconds']} s"),
    ]
    return "<h2>Summary</h2>" + table(rows)


def failures_section(summary: dict[str, Any]) -> str:
    if not summary["failures"]:
        return "<h2>Integrity</h2><p>All integrity checks passed.</p>"
    kinds = table([(k, n) for k, n in sorted(summary["failures_by_kind"].items())], ("failure", "count"))
    items = "".join(f"<li><b>{esc(f['kind'])}</b>: {esc(f['detail'])}</li>" for f in summary["failures"])
    return f"<h2>Integrity: FAILED</h2>{kinds}<ul>{items}</ul>"


def notes_section(summary: dict[str, Any]) -> str:
    if not summary["notes"]:
        return ""
    return "<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in summary["notes"]) + "</ul>"


def pairs_section(title: str, rows: list[dict[str, Any]], images: dict[str, Any]) -> str:
    if not rows:
        return ""
    head = "<tr><th>key</th><th>PSNR (dB)</th><th>SSIM</th><th>original (preprocessed)</th><th>reconstruction</th></tr>"
    body = "".join(
        f"<tr><td><code>{esc(r['key'])}</code></td><td>{fmt(r['psnr'])}</td><td>{fmt(r['ssim'])}</td>"
        f"<td><img alt='original {esc(r['key'])}' src='{png_data_uri(images[r['key']].original)}'></td>"
        f"<td><img alt='reconstruction {esc(r['key'])}' "
        f"src='{png_data_uri(images[r['key']].reconstruction)}'></td></tr>"
        for r in rows
    )
    return f"<h2>{esc(title)}</h2><table>{head}{body}</table>"


def compare_section(summary: dict[str, Any]) -> str:
    """`--compare`: the distributions, bytes per latent, and every compared key."""
    c = summary.get("compare")
    if not c:
        return ""
    rows = [
        (
            "compared",
            f"{esc(c['store_dtype'])} (this) against {esc(c['other_store_dtype'])} "
            f"<code>{esc(c['other'])}</code>: {c['compared']} of {c['keys']} sampled keys, "
            f"{c['missing_in_other']} missing there",
        ),
        ("bytes per latent", f"{fmt(c['bytes_per_latent'])} vs {fmt(c['other_bytes_per_latent'])}"),
        ("decode formula", esc((c.get("codec") or {}).get("decode", ""))),
    ]
    rows += [
        (name, ", ".join(f"{k} {fmt(dist[k])}" for k in ("mean", "median", "max", "min")) if dist else "none")
        for name, dist in c["metrics"].items()
    ]
    names = ("key", "status", "latent_rel_l2", "psnr_between", "ssim_between", "psnr_delta", "ssim_delta")
    head = "".join(f"<th>{n}</th>" for n in names)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r[n])}</td>" for n in names) + "</tr>" for r in c["per_key"])
    return (
        f"<h2>Comparison with another cache</h2><p class='muted'>{esc(c['space'])}</p>"
        + table(rows)
        + f"<table><tr>{head}</tr>{body}</table>"
    )


def render_report(summary: dict[str, Any], rows: list[dict[str, Any]], pairs: list[Any], top_k: int) -> str:
    """The whole page as a string; `pairs` carry the images (objects with .key/.original/.reconstruction)."""
    images = {p.key: p for p in pairs}
    scored = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["psnr"])
    k = min(top_k, len(scored))
    worst, best = scored[:k], scored[::-1][:k]
    verdict = "<span class='ok'>PASSED</span>" if summary["ok"] else "<span class='fail'>FAILED</span>"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>latentcache audit</title>"
        f"<style>{CSS}</style></head><body><h1>latentcache audit: {verdict}</h1>"
        + summary_section(summary)
        + failures_section(summary)
        + notes_section(summary)
        + metrics_section(summary)
        + "<h2>PSNR histogram</h2>"
        + histogram_svg([r["psnr"] for r in scored])
        + pairs_section(f"Worst {k} keys by PSNR", worst, images)
        + pairs_section(f"Best {k} keys by PSNR", best, images)
        + compare_section(summary)
        + "</body></html>"
    )
