"""YOLOv6Lite (release 0.4.x): Lite_EffiBackbone + Lite_EffiNeck + the 4-level lite head, YOLOv6's module names.

Built from depthwise-separable blocks with hardswish: ``ConvBNHS`` (Conv+BN+hardswish in ``.block``, as v3's
wrappers), ``DPBlock`` (depthwise kxk + pointwise 1x1, each Conv+BN+hardswish, the BNs named ``bn_1``/``bn_2``),
ShuffleNet-style ``Lite_EffiBlockS1`` / ``S2`` with a squeeze-excitation ``SEBlock``, and ``CSPBlock`` /
``DarknetBlock`` in the neck. The head has four levels (strides 8/16/32/64), DPBlock stems and branches, plain
ltrb regression (no DFL). Input sides must be multiples of 64.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from models.common import ConvModule
from models.effidehead import decode_outputs

LITE_STRIDES = (8, 16, 32, 64)


def make_divisible_lite(value: float, divisor: int = 16) -> int:
    """YOLOv6Lite's channel rounding (yolo_lite.make_divisible): nearest multiple, never more than 10% below."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def lite_channels(config: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """(backbone out channels, backbone mid channels, neck in channels) as YOLOv6Lite's build_network scales them."""
    width = config.get("width_multiple", 1.0)
    out = [make_divisible_lite(c * width) for c in config["backbone"]["out_channels"]]
    mid = [make_divisible_lite(int(c * config["backbone"].get("scale_size", 0.5)), divisor=8) for c in out]
    neck_in = [make_divisible_lite(c * width) for c in config["neck"]["in_channels"]]
    out[0] = 24  # Lite_EffiBackbone fixes its stem width
    return out, mid, neck_in


class ConvBNHS(nn.Module):
    """Conv + BN + hardswish, the ConvModule in ``.block``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1):
        super().__init__()
        self.block = ConvModule(in_channels, out_channels, kernel_size, stride, "hardswish", padding, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ConvBN(ConvBNHS):
    """Conv + BN without activation (the depthwise convs of the lite blocks)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1):
        nn.Module.__init__(self)
        self.block = ConvModule(in_channels, out_channels, kernel_size, stride, None, padding, groups)


class SEBlock(nn.Module):
    """Squeeze-excitation: global average -> 1x1 (/4) -> ReLU -> 1x1 -> hardsigmoid -> channel gate."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = nn.Conv2d(channels, channels // reduction, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels // reduction, channels, 1)
        self.hardsigmoid = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.hardsigmoid(self.conv2(self.relu(self.conv1(self.avg_pool(x)))))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups (ShuffleNet)."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class Lite_EffiBlockS1(nn.Module):  # noqa: N801 - YOLOv6's class name
    """Stride-1 block: half the channels pass, the other half goes pw -> dw -> SE -> pw; concat, shuffle."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv_pw_1 = ConvBNHS(in_channels // 2, mid_channels, 1, 1, 0)
        self.conv_dw_1 = ConvBN(mid_channels, mid_channels, 3, stride, 1, groups=mid_channels)
        self.se = SEBlock(mid_channels)
        self.conv_1 = ConvBNHS(mid_channels, out_channels // 2, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.split(x.shape[1] // 2, dim=1)
        x2 = self.conv_1(self.se(self.conv_dw_1(self.conv_pw_1(x2))))
        return channel_shuffle(torch.cat([x1, x2], 1), 2)


class Lite_EffiBlockS2(nn.Module):  # noqa: N801 - YOLOv6's class name
    """Stride-2 block: two downsampling branches (dw -> pw; pw -> dw -> SE -> pw), concat, then dw + pw."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.conv_dw_1 = ConvBN(in_channels, in_channels, 3, stride, 1, groups=in_channels)
        self.conv_1 = ConvBNHS(in_channels, out_channels // 2, 1, 1, 0)
        self.conv_pw_2 = ConvBNHS(in_channels, mid_channels // 2, 1, 1, 0)
        self.conv_dw_2 = ConvBN(mid_channels // 2, mid_channels // 2, 3, stride, 1, groups=mid_channels // 2)
        self.se = SEBlock(mid_channels // 2)
        self.conv_2 = ConvBNHS(mid_channels // 2, out_channels // 2, 1, 1, 0)
        self.conv_dw_3 = ConvBNHS(out_channels, out_channels, 3, 1, 1, groups=out_channels)
        self.conv_pw_3 = ConvBNHS(out_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv_1(self.conv_dw_1(x))
        x2 = self.conv_2(self.se(self.conv_dw_2(self.conv_pw_2(x))))
        return self.conv_pw_3(self.conv_dw_3(torch.cat([x1, x2], 1)))


class DPBlock(nn.Module):
    """Depthwise kxk (biased conv, BN ``bn_1``, hardswish) then pointwise 1x1 (biased conv, ``bn_2``, hardswish).

    ``bn_1`` / ``bn_2`` are None once folded into the convs (``models.reparam``).
    """

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.conv_dw_1 = nn.Conv2d(in_channel, out_channel, kernel_size, stride, (kernel_size - 1) // 2,
                                   groups=out_channel)
        self.bn_1 = nn.BatchNorm2d(out_channel)
        self.act_1 = nn.Hardswish()
        self.conv_pw_1 = nn.Conv2d(out_channel, out_channel, 1)
        self.bn_2 = nn.BatchNorm2d(out_channel)
        self.act_2 = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_dw_1(x)
        x = self.act_1(x if self.bn_1 is None else self.bn_1(x))
        x = self.conv_pw_1(x)
        return self.act_2(x if self.bn_2 is None else self.bn_2(x))


class DarknetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, expansion: float = 0.5):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv_1 = ConvBNHS(in_channels, hidden, 1, 1, 0)
        self.conv_2 = DPBlock(hidden, out_channels, kernel_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_2(self.conv_1(x))


class CSPBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, expand_ratio: float = 0.5):
        super().__init__()
        mid = int(out_channels * expand_ratio)
        self.conv_1 = ConvBNHS(in_channels, mid, 1, 1, 0)
        self.conv_2 = ConvBNHS(in_channels, mid, 1, 1, 0)
        self.conv_3 = ConvBNHS(2 * mid, out_channels, 1, 1, 0)
        self.blocks = DarknetBlock(mid, mid, kernel_size, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_3(torch.cat([self.blocks(self.conv_1(x)), self.conv_2(x)], 1))


class Lite_EffiBackbone(nn.Module):  # noqa: N801 - YOLOv6's class name
    """Stem (3x3/2) and four stages of one S2 block plus S1 blocks; returns the stride 8, 16 and 32 outputs."""

    def __init__(self, in_channels: int, mid_channels: list[int], out_channels: list[int],
                 num_repeat: list[int]):
        super().__init__()
        self.conv_0 = ConvBNHS(in_channels, out_channels[0], 3, 2, 1)
        for i in range(4):
            self.add_module(f"lite_effiblock_{i + 1}", self._stage(num_repeat[i], out_channels[i],
                                                                   mid_channels[i + 1], out_channels[i + 1]))

    @staticmethod
    def _stage(repeats: int, in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
        blocks = [Lite_EffiBlockS2(in_channels, mid_channels, out_channels, 2)]
        blocks += [Lite_EffiBlockS1(out_channels, mid_channels, out_channels, 1) for _ in range(repeats - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.lite_effiblock_2(self.lite_effiblock_1(self.conv_0(x)))
        c3 = x
        c4 = self.lite_effiblock_3(c3)
        return c3, c4, self.lite_effiblock_4(c4)


class Lite_EffiNeck(nn.Module):  # noqa: N801 - YOLOv6's class name
    """PAN over three reduced inputs plus a fourth, stride-64 level: outputs P3, P4, P5, P6 (unified width)."""

    def __init__(self, in_channels: list[int], unified_channels: int):
        super().__init__()
        u = unified_channels
        self.reduce_layer0 = ConvBNHS(in_channels[0], u, 1, 1, 0)
        self.reduce_layer1 = ConvBNHS(in_channels[1], u, 1, 1, 0)
        self.reduce_layer2 = ConvBNHS(in_channels[2], u, 1, 1, 0)
        self.upsample0 = nn.Upsample(scale_factor=2, mode="nearest")
        self.upsample1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.Csp_p4 = CSPBlock(2 * u, u, 5)
        self.Csp_p3 = CSPBlock(2 * u, u, 5)
        self.Csp_n3 = CSPBlock(2 * u, u, 5)
        self.Csp_n4 = CSPBlock(2 * u, u, 5)
        self.downsample2 = DPBlock(u, u, 5, 2)
        self.downsample1 = DPBlock(u, u, 5, 2)
        self.p6_conv_1 = DPBlock(u, u, 5, 2)
        self.p6_conv_2 = DPBlock(u, u, 5, 2)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        c3, c4, c5 = inputs
        top = self.reduce_layer0(c5)
        f_out1 = self.Csp_p4(torch.cat([self.upsample0(top), self.reduce_layer1(c4)], 1))
        p3 = self.Csp_p3(torch.cat([self.upsample1(f_out1), self.reduce_layer2(c3)], 1))
        p4 = self.Csp_n3(torch.cat([self.downsample2(p3), f_out1], 1))
        p5 = self.Csp_n4(torch.cat([self.downsample1(p4), top], 1))
        p6 = self.p6_conv_1(top) + self.p6_conv_2(p5)
        return [p3, p4, p5, p6]


class LiteDetect(nn.Module):
    """The lite head: per level DPBlock stem, DPBlock class / box branches, 1x1 predictions (ltrb, no DFL).

    Eval output: [B, N, 5 + nc] = cx, cy, w, h (input pixels), objectness 1, class scores after sigmoid.
    Training output: (stem features, class scores [B,N,nc], ltrb distances [B,N,4]).
    """

    use_dfl, reg_max, distill_ns = False, 0, False

    def __init__(self, num_classes: int, channels: list[int], strides: tuple[int, ...] = LITE_STRIDES):
        super().__init__()
        self.nc, self.nl = num_classes, len(channels)
        self.register_buffer("stride", torch.tensor(strides, dtype=torch.float32), persistent=False)
        self.stems, self.cls_convs, self.reg_convs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.cls_preds, self.reg_preds = nn.ModuleList(), nn.ModuleList()
        for c in channels:
            self.stems.append(DPBlock(c, c, 5, 1))
            self.cls_convs.append(DPBlock(c, c, 5, 1))
            self.reg_convs.append(DPBlock(c, c, 5, 1))
            self.cls_preds.append(nn.Conv2d(c, num_classes, 1))
            self.reg_preds.append(nn.Conv2d(c, 4, 1))

    def initialize_biases(self, prior_prob: float = 1e-2) -> None:
        """Zero prediction weights, class bias at the prior, box bias at 1 (as YOLOv6 initialises)."""
        for conv in self.cls_preds:
            nn.init.zeros_(conv.weight)
            nn.init.constant_(conv.bias, -math.log((1 - prior_prob) / prior_prob))
        for conv in self.reg_preds:
            nn.init.zeros_(conv.weight)
            nn.init.constant_(conv.bias, 1.0)

    def _branches(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stems[i](x)
        return x, self.cls_preds[i](self.cls_convs[i](x)), self.reg_preds[i](self.reg_convs[i](x))

    def forward(self, feats: list[torch.Tensor]):
        if self.training:
            outs = [self._branches(feat, i) for i, feat in enumerate(feats)]
            return ([o[0] for o in outs], torch.cat([torch.sigmoid(o[1]).flatten(2).permute(0, 2, 1) for o in outs], 1),
                    torch.cat([o[2].flatten(2).permute(0, 2, 1) for o in outs], 1))
        cls_list, reg_list = [], []
        for i, feat in enumerate(feats):
            h, w = int(feat.shape[-2]), int(feat.shape[-1])  # constants, batch -1: see effidehead.Detect
            _, cls_out, reg_out = self._branches(feat, i)
            cls_list.append(torch.sigmoid(cls_out).reshape(-1, self.nc, h * w))
            reg_list.append(reg_out.reshape(-1, 4, h * w))
        return decode_outputs(feats, self.stride, cls_list, reg_list)


def build_lite_network(config: dict[str, Any]) -> tuple[nn.Module, nn.Module, LiteDetect]:
    """Backbone, neck and head of a ``layout: lite`` config."""
    out, mid, neck_in = lite_channels(config)
    unified = int(config["neck"]["unified_channels"])
    backbone = Lite_EffiBackbone(3, mid, out, list(config["backbone"]["num_repeats"]))
    neck = Lite_EffiNeck(neck_in, unified)
    detect = LiteDetect(config["num_classes"], [unified] * len(LITE_STRIDES))
    return backbone, neck, detect
