"""Reparameterization to the deployed form: multi-branch blocks -> one conv, Conv+BN -> Conv with bias.

The deployed model computes the same function as the training form (eval mode) with fewer, plain layers: this
is the graph that is calibrated, quantized and exported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.common import ConvModule, QARepVGGBlock, RealVGGBlock, RepVGGBlock
from models.lite import DPBlock


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with bn(x) == x * scale + shift in eval mode, in float64."""
    std = (bn.running_var.double() + bn.eps).sqrt()
    scale = bn.weight.double() / std
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv followed by bn, in float64."""
    scale, shift = _bn_scale_shift(bn)
    b = torch.zeros_like(scale) if bias is None else bias.double()
    return weight.double() * scale.view(-1, 1, 1, 1), b * scale + shift


def _new_conv(like: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A biased Conv2d with every geometry attribute of ``like`` (groups, dilation, padding mode included)."""
    conv = nn.Conv2d(like.in_channels, like.out_channels, like.kernel_size, like.stride, like.padding,
                     dilation=like.dilation, groups=like.groups, bias=True, padding_mode=like.padding_mode)
    dtype, device = like.weight.dtype, like.weight.device
    conv.weight.data = weight.to(dtype=dtype, device=device)
    conv.bias.data = bias.to(dtype=dtype, device=device)
    return conv


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One Conv2d equal to ``bn(conv(x))`` in eval mode."""
    return _new_conv(conv, *_fold(conv.weight, conv.bias, bn))


def _identity_kernel(channels: int, groups: int, device: torch.device) -> torch.Tensor:
    """3x3 kernel that maps each channel to itself."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, 3, 3, dtype=torch.float64, device=device)
    kernel[torch.arange(channels), torch.arange(channels) % per_group, 1, 1] = 1.0
    return kernel


def _avg_kernel(channels: int, groups: int, device: torch.device) -> torch.Tensor:
    """3x3 kernel equal to a per-channel 3x3 average pool (zero padding counted, as AvgPool2d does)."""
    return _identity_kernel(channels, groups, device).amax(dim=(2, 3), keepdim=True).expand(-1, -1, 3, 3) / 9.0


def _pad_1x1(kernel: torch.Tensor) -> torch.Tensor:
    return F.pad(kernel, [1, 1, 1, 1])


def _repvgg_kernel_bias(block: RepVGGBlock) -> tuple[torch.Tensor, torch.Tensor]:
    k3, b3 = _fold(block.rbr_dense.conv.weight, block.rbr_dense.conv.bias, block.rbr_dense.bn)
    k1, b1 = _fold(block.rbr_1x1.conv.weight, block.rbr_1x1.conv.bias, block.rbr_1x1.bn)
    kernel, bias = k3 + _pad_1x1(k1), b3 + b1
    if block.rbr_identity is not None:
        ki = _identity_kernel(block.in_channels, block.groups, kernel.device)
        ki, bi = _fold(ki, None, block.rbr_identity)
        kernel, bias = kernel + ki, bias + bi
    return kernel, bias


def _qarepvgg_kernel_bias(block: QARepVGGBlock) -> tuple[torch.Tensor, torch.Tensor]:
    kernel, bias = _fold(block.rbr_dense.conv.weight, block.rbr_dense.conv.bias, block.rbr_dense.bn)
    kernel = kernel + _pad_1x1(block.rbr_1x1.weight.double())
    if block.rbr_identity is not None:
        kernel = kernel + _identity_kernel(block.in_channels, block.groups, kernel.device)
    if getattr(block, "rbr_avg", None) is not None:
        kernel = kernel + _avg_kernel(block.in_channels, block.groups, kernel.device)
    return _fold(kernel, bias, block.bn)  # the post-BN folds in too: deployment needs no BN


def _deploy_rep_block(block: RepVGGBlock) -> None:
    if block.deployed:
        return
    is_qa = isinstance(block, QARepVGGBlock)
    kernel, bias = _qarepvgg_kernel_bias(block) if is_qa else _repvgg_kernel_bias(block)
    block.rbr_reparam = _new_conv(block.rbr_dense.conv, kernel, bias)
    for name in ("rbr_dense", "rbr_1x1", "rbr_identity", "rbr_avg", "bn"):
        if is_qa or name != "bn":
            block.__dict__.pop(name, None)
            block._modules.pop(name, None)


def _fold_bn_in_place(module: ConvModule | RealVGGBlock) -> None:
    if module.bn is not None:
        module.conv = fuse_conv_bn(module.conv, module.bn)
        module.bn = None


def _fold_dp_block(block: DPBlock) -> None:
    """Both of a DPBlock's BNs into its convs (YOLOv6's own fuse_model leaves them: the deployed graph needs none)."""
    if block.bn_1 is not None:
        block.conv_dw_1, block.bn_1 = fuse_conv_bn(block.conv_dw_1, block.bn_1), None
    if block.bn_2 is not None:
        block.conv_pw_1, block.bn_2 = fuse_conv_bn(block.conv_pw_1, block.bn_2), None


def reparameterize(model: nn.Module) -> nn.Module:
    """Turn ``model`` into its deployed form in place (idempotent) and return it in eval mode."""
    model.eval()
    with torch.no_grad():
        for m in list(model.modules()):
            if isinstance(m, RepVGGBlock):  # QARepVGGBlock included
                _deploy_rep_block(m)
        for m in list(model.modules()):
            if isinstance(m, (ConvModule, RealVGGBlock)):
                _fold_bn_in_place(m)
            elif isinstance(m, DPBlock):
                _fold_dp_block(m)
    return model


def is_deployed(model: nn.Module) -> bool:
    """True when no BatchNorm or multi-branch block is left."""
    return not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
