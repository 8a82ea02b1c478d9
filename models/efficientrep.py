"""Backbones: EfficientRep (RepBlock stages) and CSPBepBackbone (BepC3 stages)."""
from __future__ import annotations

import torch
from torch import nn

from models.common import BepC3, RepBlock


class EfficientRep(nn.Module):
    """Stem + four stride-2 stages; the last ends in an SPPF-type ``channel_merge`` module.

    Returns the stage outputs used by the neck: (C2 if ``fuse_P2``), C3, C4, C5.
    """

    def __init__(self, channels_list: list[int], num_repeats: list[int], block: type[nn.Module],
                 channel_merge: type[nn.Module], fuse_P2: bool = False, in_channels: int = 3,  # noqa: N803
                 csp_e: float | None = None):
        super().__init__()
        self.fuse_P2 = fuse_P2
        self.stem = block(in_channels, channels_list[0], kernel_size=3, stride=2)
        for i in range(1, 5):
            layers = [block(channels_list[i - 1], channels_list[i], kernel_size=3, stride=2),
                      self._stage(channels_list[i], num_repeats[i], block, csp_e)]
            if i == 4:
                layers.append(channel_merge(channels_list[4], channels_list[4], kernel_size=5))
            setattr(self, f"ERBlock_{i + 1}", nn.Sequential(*layers))

    @staticmethod
    def _stage(channels: int, n: int, block: type[nn.Module], csp_e: float | None) -> nn.Module:
        return RepBlock(channels, channels, n=n, block=block)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = []
        x = self.ERBlock_2(self.stem(x))
        if self.fuse_P2:
            outputs.append(x)
        for stage in (self.ERBlock_3, self.ERBlock_4, self.ERBlock_5):
            x = stage(x)
            outputs.append(x)
        return tuple(outputs)


class CSPBepBackbone(EfficientRep):
    """EfficientRep with BepC3 (CSP) stages: the m/l models."""

    @staticmethod
    def _stage(channels: int, n: int, block: type[nn.Module], csp_e: float | None) -> nn.Module:
        return BepC3(channels, channels, n=n, e=csp_e, block=block)
