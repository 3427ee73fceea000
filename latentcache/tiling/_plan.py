"""Turns a diffusers Encoder/Decoder into a checked list of banded steps.

Building the plan *is* the support check: every module the diffusers forward pass would call
is matched by exact type (a subclass may override forward) and by the configuration we replay.
Anything else raises UnsupportedModelError naming the module, so callers can fall back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from ._ops import AttnSpec, BandContext, ConvSpec, Epilogue, norm_prologue, residual_epilogue, run_attention, run_conv
from ._store import FeatureMap

# Pointwise activations: applying them band by band is exact. (diffusers' get_activation set.)
_ACTIVATIONS = (nn.SiLU, nn.Mish, nn.GELU, nn.ReLU)


class UnsupportedModelError(ValueError):
    """The model contains something the exact banded path does not replay faithfully."""


class Step(Protocol):
    def run(self, ctx: BandContext, x: FeatureMap, final: bool = False) -> FeatureMap: ...


@dataclass(frozen=True)
class ConvStep:
    """[GroupNorm + activation] -> conv; covers conv_in/out, (post_)quant_conv, down/upsamplers."""

    spec: ConvSpec
    norm: nn.GroupNorm | None = None
    act: nn.Module | None = None

    def run(self, ctx: BandContext, x: FeatureMap, final: bool = False, epilogue: Epilogue | None = None) -> FeatureMap:
        prologue = None if self.norm is None else norm_prologue(ctx, self.norm, self.act, x)
        return run_conv(ctx, x, self.spec, prologue, epilogue, final)


@dataclass(frozen=True)
class ResnetStep:
    first: ConvStep  # norm1 + act + conv1
    second: ConvStep  # norm2 + act + (dropout, a no-op) + conv2
    shortcut: nn.Conv2d | None
    output_scale: float

    def run(self, ctx: BandContext, x: FeatureMap, final: bool = False) -> FeatureMap:
        hidden = self.first.run(ctx, x)
        tail = residual_epilogue(x, self.shortcut, self.output_scale)
        out = self.second.run(ctx, hidden, final, tail)
        hidden.release()
        return out


@dataclass(frozen=True)
class AttentionStep:
    spec: AttnSpec

    def run(self, ctx: BandContext, x: FeatureMap, final: bool = False) -> FeatureMap:
        return run_attention(ctx, x, self.spec, final)


def _unsupported(path: str, what: str, detail: str = "") -> UnsupportedModelError:
    part = path.split(".")[0]
    return UnsupportedModelError(f"{what} in {part} ({path}{detail})")


def _expect(module: object, cls: type, path: str) -> None:
    if type(module) is not cls:
        raise _unsupported(path, f"unknown module {type(module).__name__}", f"; expected {cls.__name__}")


def _conv(conv: object, path: str) -> nn.Conv2d:
    _expect(conv, nn.Conv2d, path)
    assert isinstance(conv, nn.Conv2d)
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise _unsupported(path, f"conv padding {conv.padding!r}/{conv.padding_mode!r} (need integer zero padding)")
    return conv


def _norm(norm: object, path: str) -> nn.GroupNorm:
    _expect(norm, nn.GroupNorm, path)
    assert isinstance(norm, nn.GroupNorm)
    return norm


def _act(act: object, path: str) -> nn.Module:
    if type(act) not in _ACTIVATIONS:
        raise _unsupported(path, f"unknown module {type(act).__name__} (activation)")
    assert isinstance(act, nn.Module)
    return act


def _dropout(drop: object, path: str) -> None:
    _expect(drop, nn.Dropout, path)
    assert isinstance(drop, nn.Dropout)
    if drop.training and drop.p > 0:
        raise _unsupported(path, "active dropout (call vae.eval())")


def _plain_conv_step(conv: object, path: str) -> ConvStep:
    return ConvStep(ConvSpec(_conv(conv, path)))


def _shortcut(conv: object, path: str) -> nn.Conv2d | None:
    if conv is None:
        return None
    shortcut = _conv(conv, path)
    if shortcut.kernel_size != (1, 1) or shortcut.stride != (1, 1) or shortcut.padding != (0, 0):
        raise _unsupported(path, "conv_shortcut that is not a 1x1 stride-1 conv")
    return shortcut


def _resnet(block: object, path: str) -> ResnetStep:
    _expect(block, ResnetBlock2D, path)
    assert isinstance(block, ResnetBlock2D)
    if block.upsample is not None or block.downsample is not None:
        raise _unsupported(path, "ResnetBlock2D with up/down sampling")
    # Without temb, "default" and the decoder's "group" both reduce to plain norm2.
    if block.time_emb_proj is not None or block.time_embedding_norm == "scale_shift":
        raise _unsupported(path, "ResnetBlock2D with a time embedding")
    act = _act(block.nonlinearity, f"{path}.nonlinearity")
    _dropout(block.dropout, f"{path}.dropout")
    first = ConvStep(ConvSpec(_conv(block.conv1, f"{path}.conv1")), _norm(block.norm1, f"{path}.norm1"), act)
    second = ConvStep(ConvSpec(_conv(block.conv2, f"{path}.conv2")), _norm(block.norm2, f"{path}.norm2"), act)
    shortcut = _shortcut(block.conv_shortcut, f"{path}.conv_shortcut")
    return ResnetStep(first, second, shortcut, float(block.output_scale_factor))


def _downsample(down: object, path: str) -> ConvStep:
    _expect(down, Downsample2D, path)
    assert isinstance(down, Downsample2D)
    if getattr(down, "norm", None) is not None or not down.use_conv:
        raise _unsupported(path, "Downsample2D without conv or with a norm")
    # padding=0 means F.pad(right=1, bottom=1) before the stride-2 conv.
    return ConvStep(ConvSpec(_conv(down.conv, f"{path}.conv"), pad_after=1 if down.padding == 0 else 0))


def _upsample(up: object, path: str) -> ConvStep:
    _expect(up, Upsample2D, path)
    assert isinstance(up, Upsample2D)
    # getattr: older diffusers releases predate the norm/interpolate options.
    plain = getattr(up, "norm", None) is None and getattr(up, "interpolate", True)
    if not plain or up.use_conv_transpose or not up.use_conv:
        raise _unsupported(path, "Upsample2D other than nearest x2 + conv")
    conv = up.conv if up.name == "conv" else up.Conv2d_0
    return ConvStep(ConvSpec(_conv(conv, f"{path}.conv"), upsample=True))


def _linear(module: object, path: str) -> nn.Linear:
    _expect(module, nn.Linear, path)
    assert isinstance(module, nn.Linear)
    return module


def _attention(attn: object, path: str) -> AttentionStep:
    _expect(attn, Attention, path)
    assert isinstance(attn, Attention)
    processor = type(attn.processor)
    if processor not in (AttnProcessor2_0, AttnProcessor):
        raise _unsupported(path, f"unsupported attention processor {processor.__name__}")
    if any(getattr(attn, n, None) is not None for n in ("spatial_norm", "norm_q", "norm_k")):
        raise _unsupported(path, "attention with spatial/q/k norms")
    norm = None if attn.group_norm is None else _norm(attn.group_norm, f"{path}.group_norm")
    q, k, v = (_linear(getattr(attn, n), f"{path}.{n}") for n in ("to_q", "to_k", "to_v"))
    if attn.to_out is None or len(attn.to_out) != 2:
        raise _unsupported(path, "attention without the (Linear, Dropout) output projection")
    out = _linear(attn.to_out[0], f"{path}.to_out.0")
    _dropout(attn.to_out[1], f"{path}.to_out.1")
    if not q.out_features == k.out_features == v.out_features or k.out_features % attn.heads:
        raise _unsupported(path, "attention with unequal q/k/v widths or a head count that does not divide them")
    # AttnProcessor2_0 leaves SDPA at its default 1/sqrt(head_dim); AttnProcessor uses attn.scale.
    scale = None if processor is AttnProcessor2_0 else float(attn.scale)
    residual, rescale = bool(attn.residual_connection), float(attn.rescale_output_factor)
    return AttentionStep(AttnSpec(norm, q, k, v, out, attn.heads, scale, residual, rescale))


def _mid_block(mid: object, path: str) -> list[Step]:
    _expect(mid, UNetMidBlock2D, path)
    assert isinstance(mid, UNetMidBlock2D)
    steps: list[Step] = [_resnet(mid.resnets[0], f"{path}.resnets.0")]
    for i, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        if attn is not None:
            steps.append(_attention(attn, f"{path}.attentions.{i}"))
        steps.append(_resnet(resnet, f"{path}.resnets.{i + 1}"))
    return steps


def _resnets(resnets: Sequence[nn.Module], path: str) -> list[Step]:
    return [_resnet(r, f"{path}.resnets.{i}") for i, r in enumerate(resnets)]


def _down_block(block: object, path: str) -> list[Step]:
    _expect(block, DownEncoderBlock2D, path)
    assert isinstance(block, DownEncoderBlock2D)
    down = [_downsample(d, f"{path}.downsamplers.{i}") for i, d in enumerate(block.downsamplers or [])]
    return [*_resnets(block.resnets, path), *down]


def _up_block(block: object, path: str) -> list[Step]:
    _expect(block, UpDecoderBlock2D, path)
    assert isinstance(block, UpDecoderBlock2D)
    up = [_upsample(u, f"{path}.upsamplers.{i}") for i, u in enumerate(block.upsamplers or [])]
    return [*_resnets(block.resnets, path), *up]


def _head(net: Encoder | Decoder, path: str) -> ConvStep:
    """conv_norm_out + conv_act + conv_out as one banded conv."""
    norm = _norm(net.conv_norm_out, f"{path}.conv_norm_out")  # SpatialNorm (MoVQ) is refused here
    act = _act(net.conv_act, f"{path}.conv_act")
    return ConvStep(ConvSpec(_conv(net.conv_out, f"{path}.conv_out")), norm, act)


def _check_runtime(module: nn.Module, path: str) -> None:
    """Hooks (e.g. accelerate offload) and meta weights would not be replayed by direct calls."""
    for name, sub in module.named_modules():
        where = f"{path}.{name}" if name else path
        if sub._forward_hooks or sub._forward_pre_hooks or getattr(sub, "_hf_hook", None) is not None:
            raise _unsupported(where, "forward hooks (e.g. accelerate offload)")
        if any(p.is_meta for p in sub.parameters(recurse=False)):
            raise _unsupported(where, "weights on the meta device")


def _optional_conv(vae: nn.Module, name: str) -> nn.Module | None:
    conv = getattr(vae, name, None)
    if conv is not None:
        _check_runtime(conv, name)
    return conv


def encoder_plan(vae: nn.Module) -> list[Step]:
    """vae.encoder followed by vae.quant_conv (when present), as banded steps."""
    enc = getattr(vae, "encoder", None)
    _expect(enc, Encoder, "encoder")
    assert isinstance(enc, Encoder)
    _check_runtime(enc, "encoder")
    steps: list[Step] = [_plain_conv_step(enc.conv_in, "encoder.conv_in")]
    for i, block in enumerate(enc.down_blocks):
        steps += _down_block(block, f"encoder.down_blocks.{i}")
    steps += [*_mid_block(enc.mid_block, "encoder.mid_block"), _head(enc, "encoder")]
    quant = _optional_conv(vae, "quant_conv")
    return steps if quant is None else [*steps, _plain_conv_step(quant, "quant_conv")]


def decoder_plan(vae: nn.Module) -> list[Step]:
    """vae.post_quant_conv (when present) followed by vae.decoder, as banded steps."""
    dec = getattr(vae, "decoder", None)
    _expect(dec, Decoder, "decoder")
    assert isinstance(dec, Decoder)
    _check_runtime(dec, "decoder")
    post = _optional_conv(vae, "post_quant_conv")
    steps: list[Step] = [] if post is None else [_plain_conv_step(post, "post_quant_conv")]
    steps += [_plain_conv_step(dec.conv_in, "decoder.conv_in"), *_mid_block(dec.mid_block, "decoder.mid_block")]
    for i, block in enumerate(dec.up_blocks):
        steps += _up_block(block, f"decoder.up_blocks.{i}")
    return [*steps, _head(dec, "decoder")]


def run_plan(ctx: BandContext, steps: Sequence[Step], x: FeatureMap) -> torch.Tensor:
    for i, step in enumerate(steps):
        y = step.run(ctx, x, final=i == len(steps) - 1)
        x.release()  # each map is read only by the step right after it (resnets keep their own input)
        x = y
    assert x.dense is not None
    return x.dense
