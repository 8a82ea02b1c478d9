"""Necks: RepPANNeck (v2, ConvTranspose upsampling) and the v3 BiFPAN necks (RepBiFPANNeck, CSPRepBiFPANNeck)."""
from __future__ import annotations

import torch
from torch import nn

from models.common import BepC3, BiFusion, ConvBNReLU, RepBlock, SimConv, Transpose


class RepPANNeck(nn.Module):
    """v2 PAN neck: top-down with ConvTranspose upsampling, bottom-up with stride-2 convs."""

    def __init__(self, channels_list: list[int], num_repeats: list[int], block: type[nn.Module]):
        super().__init__()
        c, n = channels_list, num_repeats
        self.Rep_p4 = RepBlock(c[3] + c[5], c[5], n=n[5], block=block)
        self.Rep_p3 = RepBlock(c[2] + c[6], c[6], n=n[6], block=block)
        self.Rep_n3 = RepBlock(c[6] + c[7], c[8], n=n[7], block=block)
        self.Rep_n4 = RepBlock(c[5] + c[9], c[10], n=n[8], block=block)
        self.reduce_layer0 = SimConv(c[4], c[5], kernel_size=1, stride=1)
        self.upsample0 = Transpose(c[5], c[5])
        self.reduce_layer1 = SimConv(c[5], c[6], kernel_size=1, stride=1)
        self.upsample1 = Transpose(c[6], c[6])
        self.downsample2 = SimConv(c[6], c[7], kernel_size=3, stride=2)
        self.downsample1 = SimConv(c[8], c[9], kernel_size=3, stride=2)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        x2, x1, x0 = inputs
        fpn_out0 = self.reduce_layer0(x0)
        f_out0 = self.Rep_p4(torch.cat([self.upsample0(fpn_out0), x1], 1))
        fpn_out1 = self.reduce_layer1(f_out0)
        pan_out2 = self.Rep_p3(torch.cat([self.upsample1(fpn_out1), x2], 1))
        pan_out1 = self.Rep_n3(torch.cat([self.downsample2(pan_out2), fpn_out1], 1))
        pan_out0 = self.Rep_n4(torch.cat([self.downsample1(pan_out1), fpn_out0], 1))
        return [pan_out2, pan_out1, pan_out0]


class RepBiFPANNeck(nn.Module):
    """v3 BiFPAN neck: top-down BiFusion (three inputs per level), bottom-up with stride-2 convs."""

    def __init__(self, channels_list: list[int], num_repeats: list[int], block: type[nn.Module],
                 csp_e: float | None = None):
        super().__init__()
        c, n = channels_list, num_repeats
        self.reduce_layer0 = ConvBNReLU(c[4], c[5], kernel_size=1, stride=1)
        self.Bifusion0 = BiFusion((c[3], c[2]), c[5])
        self.Rep_p4 = self._stage(c[5], c[5], n[5], block, csp_e)
        self.reduce_layer1 = ConvBNReLU(c[5], c[6], kernel_size=1, stride=1)
        self.Bifusion1 = BiFusion((c[2], c[1]), c[6])
        self.Rep_p3 = self._stage(c[6], c[6], n[6], block, csp_e)
        self.downsample2 = ConvBNReLU(c[6], c[7], kernel_size=3, stride=2)
        self.Rep_n3 = self._stage(c[6] + c[7], c[8], n[7], block, csp_e)
        self.downsample1 = ConvBNReLU(c[8], c[9], kernel_size=3, stride=2)
        self.Rep_n4 = self._stage(c[5] + c[9], c[10], n[8], block, csp_e)

    @staticmethod
    def _stage(c_in: int, c_out: int, n: int, block: type[nn.Module], csp_e: float | None) -> nn.Module:
        return RepBlock(c_in, c_out, n=n, block=block)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        x3, x2, x1, x0 = inputs
        fpn_out0 = self.reduce_layer0(x0)
        f_out0 = self.Rep_p4(self.Bifusion0([fpn_out0, x1, x2]))
        fpn_out1 = self.reduce_layer1(f_out0)
        pan_out2 = self.Rep_p3(self.Bifusion1([fpn_out1, x2, x3]))
        pan_out1 = self.Rep_n3(torch.cat([self.downsample2(pan_out2), fpn_out1], 1))
        pan_out0 = self.Rep_n4(torch.cat([self.downsample1(pan_out1), fpn_out0], 1))
        return [pan_out2, pan_out1, pan_out0]


class CSPRepBiFPANNeck(RepBiFPANNeck):
    """RepBiFPANNeck with BepC3 (CSP) stages: the m/l models."""

    @staticmethod
    def _stage(c_in: int, c_out: int, n: int, block: type[nn.Module], csp_e: float | None) -> nn.Module:
        return BepC3(c_in, c_out, n=n, e=csp_e, block=block)
