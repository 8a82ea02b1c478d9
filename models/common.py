"""Building blocks of the YOLOv6 family.

Module and attribute names follow YOLOv6's releases exactly, so that official state_dicts load by name:
v3 (release 0.4.x) wraps Conv+BN+act as ``ConvBNReLU(...).block = ConvModule``; v2 (release 0.2.x) uses the
``ConvModule`` directly (YOLOv6's ``Conv``/``SimConv``). Deployed forms (branches fused, BN folded) are produced
by :mod:`models.reparam`; every block's forward works in both forms.
"""
from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish, None: None}


class ConvModule(nn.Module):
    """Conv2d + BatchNorm2d + optional activation. ``bn`` is None once folded into ``conv``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 activation: str | None = "relu", padding: int | None = None, groups: int = 1, bias: bool = False):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels)
        if activation is not None:
            self.act = ACTIVATIONS[activation]()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return x if self.activation is None else self.act(x)


class ConvBNAct(nn.Module):
    """v3 wrapper: the ConvModule lives in ``.block`` (YOLOv6's ConvBNReLU / ConvBNSiLU)."""

    activation: str = "relu"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1, bias: bool = False):
        super().__init__()
        self.block = ConvModule(in_channels, out_channels, kernel_size, stride, self.activation, padding, groups, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ConvBNReLU(ConvBNAct):
    activation = "relu"


class ConvBNSiLU(ConvBNAct):
    activation = "silu"


def SimConv(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> ConvModule:  # noqa: N802
    """v2's SimConv: a bare ConvModule with ReLU (keys ``conv``/``bn``)."""
    return ConvModule(in_channels, out_channels, kernel_size, stride, "relu")


def Conv(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> ConvModule:  # noqa: N802
    """v2's Conv: a bare ConvModule with SiLU (keys ``conv``/``bn``)."""
    return ConvModule(in_channels, out_channels, kernel_size, stride, "silu")


class Transpose(nn.Module):
    """2x upsampling by a learned ConvTranspose2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2):
        super().__init__()
        self.upsample_transpose = nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample_transpose(x)


class RepVGGBlock(nn.Module):
    """3x3 conv-BN + 1x1 conv-BN + identity BN, summed, then ReLU; one 3x3 conv (``rbr_reparam``) once deployed."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        if kernel_size != 3:
            raise ValueError(f"{type(self).__name__} needs kernel_size 3, got {kernel_size}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, 1
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        self.rbr_identity = self._identity_branch(in_channels) if self._has_identity(stride) else None
        self.rbr_dense = ConvModule(in_channels, out_channels, 3, stride, None, padding=1)
        self.rbr_1x1 = self._pointwise_branch(in_channels, out_channels, stride)

    def _has_identity(self, stride: int) -> bool:
        return self.in_channels == self.out_channels and stride == 1

    @staticmethod
    def _identity_branch(channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels)

    @staticmethod
    def _pointwise_branch(in_channels: int, out_channels: int, stride: int) -> nn.Module:
        return ConvModule(in_channels, out_channels, 1, stride, None, padding=0)

    @property
    def deployed(self) -> bool:
        return hasattr(self, "rbr_reparam")

    def _branch_sum(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        return out if self.rbr_identity is None else out + self.rbr_identity(x)

    def _post(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deployed:
            return self.nonlinearity(self.se(self.rbr_reparam(x)))
        return self.nonlinearity(self._post(self.se(self._branch_sum(x))))


class QARepVGGBlock(RepVGGBlock):
    """Quantization-friendly RepVGG (QARepVGG): 3x3 conv-BN + plain 1x1 conv + identity (+ 3x3 avg-pool in v2),
    summed, then a post-BN and ReLU. Deployed: one 3x3 conv with the post-BN folded in."""

    use_avg = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride)
        self.bn = nn.BatchNorm2d(out_channels)
        if self.use_avg:
            self.rbr_avg = nn.AvgPool2d(3, stride, 1) if self._has_identity(stride) else None

    @staticmethod
    def _identity_branch(channels: int) -> nn.Module:
        return nn.Identity()

    @staticmethod
    def _pointwise_branch(in_channels: int, out_channels: int, stride: int) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def _branch_sum(self, x: torch.Tensor) -> torch.Tensor:
        out = super()._branch_sum(x)
        return out + self.rbr_avg(x) if self.use_avg and self.rbr_avg is not None else out

    def _post(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


class QARepVGGBlockV2(QARepVGGBlock):
    use_avg = True


class RealVGGBlock(nn.Module):
    """RepOpt's plain 3x3 conv + BN + ReLU (the v2 ``*_reopt`` models)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.se = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.relu(self.se(x))


class BottleRep(nn.Module):
    """Two basic blocks with a learned-weight residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, basic_block: type[nn.Module] = RepVGGBlock,
                 weight: bool = False):
        super().__init__()
        self.conv1 = basic_block(in_channels, out_channels)
        self.conv2 = basic_block(out_channels, out_channels)
        self.shortcut = in_channels == out_channels
        self.alpha = nn.Parameter(torch.ones(1)) if weight else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return out + self.alpha * x if self.shortcut else out


class RepBlock(nn.Module):
    """A stage of ``n`` basic blocks (or ``n // 2`` BottleReps when ``block`` is BottleRep)."""

    def __init__(self, in_channels: int, out_channels: int, n: int = 1, block: type[nn.Module] = RepVGGBlock,
                 basic_block: type[nn.Module] = RepVGGBlock):
        super().__init__()
        if block is BottleRep:
            n = n // 2
            self.conv1 = BottleRep(in_channels, out_channels, basic_block=basic_block, weight=True)
            rest = [BottleRep(out_channels, out_channels, basic_block=basic_block, weight=True) for _ in range(n - 1)]
        else:
            self.conv1 = block(in_channels, out_channels)
            rest = [block(out_channels, out_channels) for _ in range(n - 1)]
        self.block = nn.Sequential(*rest) if rest else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return x if self.block is None else self.block(x)


class BepC3(nn.Module):
    """CSP stage (CSPStackRep): two 1x1 branches, one through a BottleRep stack, concatenated and fused by 1x1."""

    def __init__(self, in_channels: int, out_channels: int, n: int = 1, e: float = 0.5,
                 block: type[nn.Module] = RepVGGBlock):
        super().__init__()
        hidden = int(out_channels * e)
        conv = ConvBNSiLU if block is ConvBNSiLU else ConvBNReLU
        self.cv1 = conv(in_channels, hidden, 1, 1)
        self.cv2 = conv(in_channels, hidden, 1, 1)
        self.cv3 = conv(2 * hidden, out_channels, 1, 1)
        self.m = RepBlock(hidden, hidden, n=n, block=BottleRep, basic_block=block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


def _max_pool(kernel_size: int) -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=kernel_size, stride=1, padding=kernel_size // 2)


class SPPFModule(nn.Module):
    """Spatial pyramid pooling, fast: three chained max-pools concatenated with their input."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5,
                 conv: type[nn.Module] | None = None):
        super().__init__()
        conv = conv or ConvBNReLU
        hidden = in_channels // 2
        self.cv1 = conv(in_channels, hidden, 1, 1)
        self.cv2 = conv(hidden * 4, out_channels, 1, 1)
        self.m = _max_pool(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class SimSPPF(nn.Module):
    """v3: SPPF with ReLU convs, under ``.sppf``."""

    conv: type[nn.Module] = ConvBNReLU

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5):
        super().__init__()
        self.sppf = SPPFModule(in_channels, out_channels, kernel_size, self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sppf(x)


class SPPF(SimSPPF):
    """v3: SPPF with SiLU convs (the conv_silu models)."""

    conv = ConvBNSiLU


class CSPSPPFModule(nn.Module):
    """CSP variant of SPPF: a pooled branch and a 1x1 shortcut branch, concatenated."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, e: float = 0.5,
                 conv: type[nn.Module] | None = None):
        super().__init__()
        conv = conv or ConvBNReLU
        hidden = int(out_channels * e)
        self.cv1 = conv(in_channels, hidden, 1, 1)
        self.cv2 = conv(in_channels, hidden, 1, 1)
        self.cv3 = conv(hidden, hidden, 3, 1)
        self.cv4 = conv(hidden, hidden, 1, 1)
        self.m = _max_pool(kernel_size)
        self.cv5 = conv(4 * hidden, hidden, 1, 1)
        self.cv6 = conv(hidden, hidden, 3, 1)
        self.cv7 = conv(2 * hidden, out_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y0 = self.cv2(x)
        y1 = self.m(x1)
        y2 = self.m(y1)
        y3 = self.cv6(self.cv5(torch.cat([x1, y1, y2, self.m(y2)], 1)))
        return self.cv7(torch.cat((y0, y3), dim=1))


class SimCSPSPPF(nn.Module):
    """v3: CSPSPPF with ReLU convs, under ``.cspsppf``."""

    conv: type[nn.Module] = ConvBNReLU

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, e: float = 0.5):
        super().__init__()
        self.cspsppf = CSPSPPFModule(in_channels, out_channels, kernel_size, e, self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cspsppf(x)


class CSPSPPF(SimCSPSPPF):
    conv = ConvBNSiLU


class SimSPPFv2(SPPFModule):
    """v2: SimSPPF keeps ``cv1``/``cv2``/``m`` at top level with bare ReLU ConvModules."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5):
        super().__init__(in_channels, out_channels, kernel_size, SimConv)


class BiFusion(nn.Module):
    """v3 BiFPAN fusion: upsampled top feature + 1x1 of the same level + downsampled lower level."""

    def __init__(self, in_channels: tuple[int, int], out_channels: int):
        super().__init__()
        self.cv1 = ConvBNReLU(in_channels[0], out_channels, 1, 1)
        self.cv2 = ConvBNReLU(in_channels[1], out_channels, 1, 1)
        self.cv3 = ConvBNReLU(out_channels * 3, out_channels, 1, 1)
        self.upsample = Transpose(out_channels, out_channels)
        self.downsample = ConvBNReLU(out_channels, out_channels, kernel_size=3, stride=2)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        x0 = self.upsample(x[0])
        x1 = self.cv1(x[1])
        x2 = self.downsample(self.cv2(x[2]))
        return self.cv3(torch.cat((x0, x1, x2), dim=1))


BLOCKS: dict[str, type[nn.Module]] = {
    "repvgg": RepVGGBlock,
    "qarepvgg": QARepVGGBlock,
    "qarepvggv2": QARepVGGBlockV2,
    "repopt": RealVGGBlock,
    "conv_relu": ConvBNReLU,
    "conv_silu": ConvBNSiLU,
}


def get_block(name: str) -> type[nn.Module]:
    """Basic block class for a config's ``block`` (YOLOv6's ``training_mode``)."""
    if name not in BLOCKS:
        raise ValueError(f"unknown block type {name!r}; choose one of {sorted(BLOCKS)}")
    return BLOCKS[name]
