"""Speed-ups the stages call through one-line hooks, kept apart so each one is measured on its own.

- channels_last on CPU by default: oneDNN's convolutions run NHWC natively, and the latents are the
  same within float rounding for every family (tests/test_fastpath.py checks each registered family);
"""

from __future__ import annotations

from typing import Any

import torch

# ---- memory format --------------------------------------------------------------------------


def use_channels_last(spec: Any, device: torch.device, vae: Any = None) -> bool:
    """--channels-last forces it anywhere; on CPU it is the default unless --no-channels-last, for image
    models (2D convolutions): a video VAE's 5D weights have no channels_last layout."""
    if vae is not None and any(p.dim() > 4 for p in vae.parameters()):
        return False
    return bool(spec.channels_last) or (device.type == "cpu" and not getattr(spec, "no_channels_last", False))
