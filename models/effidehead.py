"""Efficient decoupled head (anchor-free), with the optional distill-ns branch of the released n/s files."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DFL_BINS = 16  # YOLOv6's Detect always builds proj/proj_conv with 16 + 1 bins, even without DFL


def make_anchor_points(feats: list[torch.Tensor], strides: torch.Tensor, offset: float = 0.5
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid-cell centres (in feature-map units) and their strides for every level, concatenated: [N,2], [N,1]."""
    points, stride_list = [], []
    for feat, stride in zip(feats, strides):
        h, w = int(feat.shape[-2]), int(feat.shape[-1])  # constants in an exported graph: input H, W are fixed
        ys = torch.arange(h, device=feat.device, dtype=torch.float32) + offset
        xs = torch.arange(w, device=feat.device, dtype=torch.float32) + offset
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x, grid_y], -1).reshape(-1, 2))
        stride_list.append(torch.full((h * w, 1), float(stride), device=feat.device))
    return torch.cat(points), torch.cat(stride_list)


def dist2bbox(distance: torch.Tensor, anchor_points: torch.Tensor, box_format: str = "xyxy") -> torch.Tensor:
    """Left/top/right/bottom distances from anchor points -> boxes (xyxy or xywh)."""
    lt, rb = distance.split(2, -1)
    x1y1, x2y2 = anchor_points - lt, anchor_points + rb
    if box_format == "xyxy":
        return torch.cat([x1y1, x2y2], -1)
    return torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], -1)


def decode_outputs(feats: list[torch.Tensor], strides: torch.Tensor, cls_list: list[torch.Tensor],
                   reg_list: list[torch.Tensor]) -> torch.Tensor:
    """Per-level class scores [B,nc,HW] and ltrb distances [B,4,HW] -> [B, N, 5 + nc] = cx, cy, w, h (input
    pixels), objectness 1, class scores: the eval output of every YOLOv6 head."""
    anchor_points, stride_tensor = make_anchor_points(feats, strides)
    scores = torch.cat(cls_list, -1).permute(0, 2, 1)
    dists = torch.cat(reg_list, -1).permute(0, 2, 1)
    boxes = dist2bbox(dists, anchor_points.to(dists.dtype), "xywh") * stride_tensor.to(dists.dtype)
    return torch.cat([boxes, torch.ones_like(boxes[..., :1]), scores], -1)


class Detect(nn.Module):
    """Decoupled head: per level a 1x1 stem, then class and box branches (3x3 conv + 1x1 prediction).

    Eval output: [B, N, 5 + nc] = cx, cy, w, h (input pixels), objectness 1, class scores after sigmoid.
    Training output: (features, class scores [B,N,nc], box distributions [B,N,4*(reg_max+1)]) and, for
    ``distill_ns``, also the plain ltrb predictions [B,N,4].
    """

    def __init__(self, num_classes: int, channels: list[int], conv: type[nn.Module], reg_max: int = 0,
                 use_dfl: bool = False, distill_ns: bool = False, strides: tuple[int, ...] = (8, 16, 32)):
        super().__init__()
        if use_dfl and not distill_ns and reg_max != DFL_BINS:
            raise ValueError(f"DFL heads need reg_max {DFL_BINS}, got {reg_max}")
        self.nc = num_classes
        self.nl = len(channels)
        self.use_dfl = use_dfl and not distill_ns  # distill-ns evaluates with its plain ltrb branch
        self.distill_ns = distill_ns
        self.reg_max = reg_max
        self.register_buffer("stride", torch.tensor(strides, dtype=torch.float32), persistent=False)
        self.proj_conv = nn.Conv2d(DFL_BINS + 1, 1, 1, bias=False)
        self.stems, self.cls_convs, self.reg_convs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.cls_preds = nn.ModuleList()
        if distill_ns:  # registered before reg_preds, as in YOLOv6's effidehead_distill_ns (state_dict key order)
            self.reg_preds_dist = nn.ModuleList()
        self.reg_preds = nn.ModuleList()
        for c in channels:
            self.stems.append(conv(c, c, 1, 1))
            self.cls_convs.append(conv(c, c, 3, 1))
            self.reg_convs.append(conv(c, c, 3, 1))
            self.cls_preds.append(nn.Conv2d(c, num_classes, 1))
            if distill_ns:
                self.reg_preds_dist.append(nn.Conv2d(c, 4 * (reg_max + 1), 1))
                self.reg_preds.append(nn.Conv2d(c, 4, 1))
            else:
                self.reg_preds.append(nn.Conv2d(c, 4 * (reg_max + 1), 1))
        self.proj = nn.Parameter(torch.linspace(0, DFL_BINS, DFL_BINS + 1), requires_grad=False)
        self.proj_conv.weight = nn.Parameter(self.proj.view(1, DFL_BINS + 1, 1, 1).clone(), requires_grad=False)

    def initialize_biases(self, prior_prob: float = 1e-2) -> None:
        """Zero prediction weights, class bias at the prior, box bias at 1 (as YOLOv6 initialises)."""
        box_preds = list(self.reg_preds) + list(getattr(self, "reg_preds_dist", []))
        for conv, bias in [(c, -math.log((1 - prior_prob) / prior_prob)) for c in self.cls_preds] + \
                [(c, 1.0) for c in box_preds]:
            nn.init.zeros_(conv.weight)
            nn.init.constant_(conv.bias, bias)

    def _branches(self, x: torch.Tensor, i: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stem output, class logits, box regression and (distill-ns training only) the DFL distribution."""
        x = self.stems[i](x)
        cls_feat, reg_feat = self.cls_convs[i](x), self.reg_convs[i](x)
        dist = self.reg_preds_dist[i](reg_feat) if self.distill_ns and self.training else None
        return x, self.cls_preds[i](cls_feat), self.reg_preds[i](reg_feat), dist

    def forward(self, feats: list[torch.Tensor]):
        if self.training:
            return self._forward_train(feats)
        cls_list, reg_list = [], []
        for i, feat in enumerate(feats):
            # H, W as constants and batch as -1: an ONNX export with a dynamic batch then needs no Shape ops
            h, w = int(feat.shape[-2]), int(feat.shape[-1])
            _, cls_out, reg_out, _ = self._branches(feat, i)
            if self.use_dfl:
                reg_out = reg_out.reshape(-1, 4, DFL_BINS + 1, h * w).permute(0, 2, 1, 3)
                reg_out = self.proj_conv(F.softmax(reg_out, dim=1))
            cls_list.append(torch.sigmoid(cls_out).reshape(-1, self.nc, h * w))
            reg_list.append(reg_out.reshape(-1, 4, h * w))
        return decode_outputs(feats, self.stride, cls_list, reg_list)

    def _forward_train(self, feats: list[torch.Tensor]):
        out_feats, cls_list, reg_list, lrtb_list = [], [], [], []
        for i, feat in enumerate(feats):
            stem_out, cls_out, reg_out, dist = self._branches(feat, i)
            out_feats.append(stem_out)
            cls_list.append(torch.sigmoid(cls_out).flatten(2).permute(0, 2, 1))
            if self.distill_ns:
                reg_list.append(dist.flatten(2).permute(0, 2, 1))
                lrtb_list.append(reg_out.flatten(2).permute(0, 2, 1))
            else:
                reg_list.append(reg_out.flatten(2).permute(0, 2, 1))
        result = (out_feats, torch.cat(cls_list, 1), torch.cat(reg_list, 1))
        return result + (torch.cat(lrtb_list, 1),) if self.distill_ns else result
