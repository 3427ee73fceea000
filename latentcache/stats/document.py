"""The statistics document (stats.json) and the lines the CLI prints from it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..latent_space import patch_bn_fragment
from .bootstrap import bootstrap_interval
from .config import StatsConfig
from .moments import merge_all, summary
from .partials import Accumulator

CONFIG_FRAGMENTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    # keys are latent_space.CONVENTIONS; each value pastes into the VAE's config.json
    "scale": lambda s: {"scaling_factor": s["scaling_factor"]},
    "shift_scale": lambda s: {"scaling_factor": s["scaling_factor"], "shift_factor": s["shift_factor"]},
    # per-channel standardisation does all the scaling, so the global factor is 1
    "per_channel": lambda s: {
        "scaling_factor": 1.0,
        "latents_mean": s["latents_mean"],
        "latents_std": s["latents_std"],
    },
}
# Flux.2's own form (its BatchNorm's running statistics), given only for a Flux.2 latent space
FAMILY_FRAGMENTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"patch_bn": patch_bn_fragment}


def first_batch(acc: Accumulator, full: dict[str, Any], interval: dict[str, Any] | None) -> dict[str, Any]:
    first = summary(merge_all(m for _, m in acc.head))
    sf, full_sf = first["suggested"]["scaling_factor"], full["suggested"]["scaling_factor"]
    inside = (
        None if interval is None or sf is None else interval["scaling_factor"][0] <= sf <= interval["scaling_factor"][1]
    )
    return {
        "images": len(acc.head),
        "mean": first["mean"],
        "std": first["std"],
        "scaling_factor": sf,
        "shift_factor": first["mean"],
        "relative_difference": None if sf is None or not full_sf else sf / full_sf - 1,
        "inside_interval": inside,
    }


def build_document(acc: Accumulator, cfg: StatsConfig, context: dict[str, Any], seconds: float) -> dict[str, Any]:
    total = acc.total()
    full = summary(total)
    interval = bootstrap_interval(
        [acc.units[u] for u in sorted(acc.units)], replicates=cfg.bootstrap, confidence=cfg.confidence, seed=cfg.seed
    )
    suggested = full["suggested"]
    convention = context["current_latent_space"]["convention"]
    fragments = {**CONFIG_FRAGMENTS, **{k: v for k, v in FAMILY_FRAGMENTS.items() if k == convention}}
    return {
        **context,
        "describes": f"raw latents: the VAE encoder's posterior {context['posterior']}, before any scaling or shift",
        "images": acc.rows,
        "errors": acc.errors,
        **full,
        "diffusers_config": {name: make(suggested) for name, make in fragments.items()}
        if suggested["scaling_factor"]
        else None,
        "confidence_interval": interval,
        "first_batch": first_batch(acc, full, interval),
        "moments": total.to_dict(),
        "seconds": round(seconds, 2),
    }


def report_lines(doc: dict[str, Any]) -> list[str]:
    s, ci, fb = doc["suggested"], doc["confidence_interval"], doc["first_batch"]
    lines = [
        f"{doc['mode']} {doc['source']}: {doc['images']} images ({doc['errors']} failed), "
        f"{len(doc['channel_mean'])} channels, {doc['count']} values, posterior {doc['posterior']}, "
        f"{doc['seconds']:.1f}s",
        f"raw latents: mean {doc['mean']:.6g}  std {doc['std']:.6g}",
        f"suggested scaling_factor {s['scaling_factor']:.6g}  shift_factor {s['shift_factor']:.6g}",
    ]
    if ci:
        lo, hi = ci["scaling_factor"]
        lines.append(
            f"{ci['level']:.0%} interval for scaling_factor: [{lo:.6g}, {hi:.6g}] (width {hi - lo:.3g}; "
            f"bootstrap over {ci['units']} shards, {ci['replicates']} replicates)"
        )
    else:
        lines.append("no confidence interval (needs at least 2 shards and --bootstrap > 0)")
    if fb["scaling_factor"] is not None and fb["relative_difference"] is not None:
        lines.append(
            f"first batch alone ({fb['images']} images): scaling_factor {fb['scaling_factor']:.6g} "
            f"({fb['relative_difference']:+.1%} vs all)"
        )
    lines.append(f"per channel: mean {_fmt(doc['channel_mean'])}  std {_fmt(doc['channel_std'])}")
    current = doc["current_latent_space"]
    lines.append(f"current {current['convention']} convention: scaling_factor {current['scaling_factor']:.6g}")
    lines.append(f"wrote {doc['output']}" + (f" and {doc['plot']}" if doc.get("plot") else ""))
    return lines


def _fmt(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
