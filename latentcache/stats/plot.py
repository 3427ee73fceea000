"""Per-channel histograms of the raw latents (matplotlib's Agg canvas: no display, no global backend)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def plot_png(sample: np.ndarray, doc: dict[str, Any]) -> bytes:
    """Per-channel histograms of the sampled raw values (Agg canvas: no display, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(4, len(sample))
    rows = -(-len(sample) // cols)
    fig = Figure(figsize=(3.6 * cols, 2.8 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    for c, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        if c < len(sample):
            draw_channel(ax, c, sample[c], doc)
        else:
            ax.set_visible(False)
    fig.suptitle(
        f"raw latents ({doc['posterior']}), {doc['images']} images: "
        f"suggested scaling_factor {doc['suggested']['scaling_factor'] or float('nan'):.4g}",
        fontsize=10,
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def draw_channel(ax: Any, c: int, values: np.ndarray, doc: dict[str, Any], bins: int = 80) -> None:
    """Marks the channel mean, the global mean (shift_factor) and mean +- 1/scaling_factor, where the
    suggested scaling puts +-1."""
    mean, sf = doc["mean"], doc["suggested"]["scaling_factor"]
    ax.hist(values, bins=bins, density=True, color="0.6")
    ax.axvline(doc["channel_mean"][c], color="C0", label=f"channel mean {doc['channel_mean'][c]:.3g}")
    ax.axvline(mean, color="C1", linestyle=":", label=f"shift_factor {mean:.3g}")
    for sign in (-1, 1) if sf else ():  # constant latents (std 0) have no suggested scaling
        ax.axvline(mean + sign / sf, color="C3", linestyle="--", label="mean ± 1/scaling_factor" if sign > 0 else None)
    ax.set_title(f"channel {c}: std {doc['channel_std'][c]:.3g}", fontsize=9)
    ax.legend(fontsize=6)
