"""Image-quality metrics for reconstruction audits: thin wrappers over well-kept implementations.

PSNR and SSIM come from scikit-image. LPIPS needs the `lpips` package *and* its backbone weights
already on disk; we never download at run time, so `lpips_status` says why it is unavailable
instead of silently fetching anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# torchvision's AlexNet checkpoint, which lpips(net="alex") loads from torch hub's cache.
LPIPS_BACKBONE = "alexnet-owt-7be5be79.pth"


def psnr(reference: np.ndarray, test: np.ndarray, *, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; identical images give +inf."""
    from skimage.metrics import peak_signal_noise_ratio

    with np.errstate(divide="ignore"):  # identical images: log10(x / 0) is the +inf we want
        return float(peak_signal_noise_ratio(reference, test, data_range=data_range))


def ssim(reference: np.ndarray, test: np.ndarray, *, data_range: float = 255.0) -> float:
    """Mean structural similarity of [H, W, 3] images (1.0 for identical images)."""
    from skimage.metrics import structural_similarity

    side = min(reference.shape[:2])
    win = min(7, side if side % 2 else side - 1)  # skimage needs an odd window no larger than the image
    return float(structural_similarity(reference, test, data_range=data_range, channel_axis=-1, win_size=win))


@dataclass(frozen=True)
class LpipsStatus:
    available: bool
    reason: str


def lpips_status() -> LpipsStatus:
    """Whether LPIPS can run offline: the package imports and its backbone weights are cached."""
    try:
        import lpips  # noqa: F401
        import torch
    except Exception as exc:  # noqa: BLE001 - a missing or broken install (e.g. torchvision) both mean "no"
        return LpipsStatus(False, f"LPIPS unavailable: the lpips package does not import ({type(exc).__name__}: {exc})")
    weights = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE
    if not weights.is_file():
        return LpipsStatus(
            False, f"LPIPS unavailable: backbone weights not found at {weights} (never downloaded at run time)"
        )
    return LpipsStatus(True, f"LPIPS (alex) with local weights {weights}")


class Lpips:
    """LPIPS distance of uint8 [H, W, 3] pairs; construct only when lpips_status().available."""

    def __init__(self) -> None:
        import lpips

        self.model = lpips.LPIPS(net="alex", verbose=False).eval()

    def __call__(self, reference: np.ndarray, test: np.ndarray) -> float:
        import torch

        def tensor(img: np.ndarray) -> Any:
            return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1.0

        with torch.no_grad():
            return float(self.model(tensor(reference), tensor(test)).item())


def pair_metrics(lpips_fn: Callable[[np.ndarray, np.ndarray], float] | None = None) -> dict[str, Callable[..., float]]:
    """The metrics computed per audited key, by column name (LPIPS only when it can run)."""
    metrics: dict[str, Callable[..., float]] = {"psnr": psnr, "ssim": ssim}
    if lpips_fn is not None:
        metrics["lpips"] = lpips_fn
    return metrics


def distribution(values: list[float]) -> dict[str, Any] | None:
    """mean / median / p5 / min / max of a metric; +inf (identical pairs) kept as the string "inf"."""
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        stats = {
            "count": len(values),
            "mean": arr.mean(),
            "median": np.median(arr),
            "p5": np.percentile(arr, 5),
            "min": arr.min(),
            "max": arr.max(),
        }
    return {k: json_number(v) for k, v in stats.items()}


def json_number(value: float) -> float | int | str:
    """A value strict JSON can hold: infinities become "inf"/"-inf", NaN "nan"."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else str(value)
