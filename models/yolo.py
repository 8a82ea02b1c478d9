"""The YOLOv6 model: backbone -> neck -> decoupled head, built from a config dict."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.common import CSPSPPF, SPPF, Conv, ConvBNSiLU, SimCSPSPPF, SimSPPF, SimSPPFv2, get_block
from models.config import resolve_config, validate_config
from models.efficientrep import CSPBepBackbone, EfficientRep
from models.effidehead import Detect
from models.lite import build_lite_network
from models.reppan import CSPRepBiFPANNeck, RepBiFPANNeck, RepPANNeck
from utils.errors import InputError

BACKBONES = {"EfficientRep": EfficientRep, "CSPBepBackbone": CSPBepBackbone}
NECKS = {"RepPANNeck": RepPANNeck, "RepBiFPANNeck": RepBiFPANNeck, "CSPRepBiFPANNeck": CSPRepBiFPANNeck}
BN_EPS, BN_MOMENTUM = 1e-3, 0.03  # YOLOv6 sets these on every BatchNorm2d at build time


class Model(nn.Module):
    """YOLOv6 detector. ``model(x)`` with x [B,3,H,W] in [0,1] returns [B,N,5+nc] in eval mode."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        config = validate_config(config)
        self.config = config
        self.backbone, self.neck, self.detect = _build_network(config)
        self.detect.initialize_biases()
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = BN_EPS, BN_MOMENTUM

    @property
    def stride(self) -> torch.Tensor:
        return self.detect.stride

    @property
    def names(self) -> list[str]:
        return self.config.get("names") or [str(i) for i in range(self.config["num_classes"])]

    @property
    def max_stride(self) -> int:
        """The largest head stride: input sides must be multiples of it (32; 64 for YOLOv6Lite)."""
        return int(self.detect.stride.max())

    def check_input_size(self, height: int, width: int) -> None:
        """InputError naming the sizes that work when ``height`` x ``width`` is not a multiple of the stride."""
        stride = self.max_stride
        if height % stride or width % stride:
            side = max(height, width)
            lower, upper = max(stride, side // stride * stride), (side // stride + 1) * stride
            raise InputError(f"{self.config.get('name', 'this model')} has stride {stride}: image sides must be "
                             f"multiples of {stride}, got {height}x{width}; use --img-size {lower} or {upper}")

    def forward(self, x: torch.Tensor):
        self.check_input_size(int(x.shape[-2]), int(x.shape[-1]))
        return self.detect(self.neck(self.backbone(x)))


def _channel_merge(config: dict[str, Any], silu: bool) -> type[nn.Module]:
    """The SPPF-type module that ends the backbone."""
    if config["layout"] == "v2":
        return SimSPPFv2
    if config["backbone"].get("cspsppf"):
        return CSPSPPF if silu else SimCSPSPPF
    return SPPF if silu else SimSPPF


def _build_network(config: dict[str, Any]) -> tuple[nn.Module, nn.Module, nn.Module]:
    if config["layout"] == "lite":
        return build_lite_network(config)
    channels, repeats = resolve_config(config)
    block = get_block(config["block"])
    bb_cfg, neck_cfg, head_cfg = config["backbone"], config["neck"], config["head"]
    if bb_cfg["type"] not in BACKBONES or neck_cfg["type"] not in NECKS:
        raise ValueError(f"unknown backbone/neck {bb_cfg['type']!r}/{neck_cfg['type']!r}; "
                         f"known: {sorted(BACKBONES)}, {sorted(NECKS)}")
    backbone = BACKBONES[bb_cfg["type"]](
        channels, repeats, block, _channel_merge(config, silu=block is ConvBNSiLU),
        fuse_P2=bool(bb_cfg.get("fuse_P2", False)), csp_e=bb_cfg.get("csp_e"))
    neck_kwargs = {} if neck_cfg["type"] == "RepPANNeck" else {"csp_e": neck_cfg.get("csp_e")}
    neck = NECKS[neck_cfg["type"]](channels, repeats, block, **neck_kwargs)
    head_conv = Conv if config["layout"] == "v2" else ConvBNSiLU
    detect = Detect(config["num_classes"], [channels[6], channels[8], channels[10]], head_conv,
                    reg_max=int(head_cfg.get("reg_max", 0)), use_dfl=bool(head_cfg.get("use_dfl", False)),
                    distill_ns=bool(head_cfg.get("distill_ns", False)))
    return backbone, neck, detect


def build_model(config: dict[str, Any]) -> Model:
    """A freshly initialised model (training form, train mode) from a config dict."""
    return Model(config)
