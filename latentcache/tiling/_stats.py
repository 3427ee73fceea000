"""Global GroupNorm statistics, accumulated band by band while a feature map is written."""

from __future__ import annotations

import torch
from torch import nn


def _merge_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps the running moments exact over multi-megapixel maps; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


class RunningStats:
    """Per (batch, channel) count / mean / M2, merged with Chan et al.'s parallel update."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None  # [B, C]
        self.m2: torch.Tensor | None = None  # [B, C], sum of squared deviations

    def update(self, band: torch.Tensor) -> None:
        n = band.shape[2] * band.shape[3]
        if n == 0:
            return
        # One band's moments are accurate in float32 (var_mean is a stable reduction, and a band
        # is small); only the merge across bands, where counts grow large, needs float64.
        x = band.detach() if band.dtype == torch.float64 else band.detach().float()
        var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
        dtype = _merge_dtype(band.device)
        self._merge(n, mean.to(dtype), var.to(dtype) * n)

    def _merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total


def group_scale_shift(stats: RunningStats, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm folded into a per (batch, channel) affine map: y = x * scale + shift.

    Channels are merged into groups with equal counts, and the variance is the biased one,
    exactly what F.group_norm computes over the whole map.
    """
    if stats.mean is None or stats.m2 is None:
        raise RuntimeError("GroupNorm input has no statistics (empty map?)")
    batch, channels = stats.mean.shape
    groups = norm.num_groups
    mean = stats.mean.view(batch, groups, -1)
    group_mean = mean.mean(dim=-1, keepdim=True)
    spread = (mean - group_mean).square().sum(dim=-1, keepdim=True)
    group_m2 = stats.m2.view(batch, groups, -1).sum(dim=-1, keepdim=True) + stats.count * spread
    rstd = (group_m2 / (stats.count * (channels // groups)) + norm.eps).rsqrt()
    weight, bias = _affine(norm, channels, stats.mean)
    scale = rstd * weight.view(1, groups, -1)
    shift = bias.view(1, groups, -1) - group_mean * scale
    return scale.reshape(batch, channels), shift.reshape(batch, channels)


def _affine(norm: nn.GroupNorm, channels: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not norm.affine:
        return torch.ones(channels, dtype=like.dtype, device=like.device), like.new_zeros(channels)
    weight = norm.weight.detach().to(device=like.device, dtype=like.dtype)
    return weight, norm.bias.detach().to(device=like.device, dtype=like.dtype)
