"""Detection losses as YOLOv6 v3 trains: VarifocalLoss (classes), GIoU (boxes), DFL (box distributions)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.effidehead import dist2bbox, make_anchor_points
from utils.training.assigner import TaskAlignedAssigner


def varifocal_loss(pred: torch.Tensor, target: torch.Tensor, label: torch.Tensor, alpha: float = 0.75,
                   gamma: float = 2.0) -> torch.Tensor:
    """Sum of BCE(pred, target) weighted by target on positives and alpha * pred^gamma on negatives."""
    weight = alpha * pred.pow(gamma) * (1 - label) + target * label
    bce = F.binary_cross_entropy(pred.float().clamp(1e-7, 1 - 1e-7), target.float(), reduction="none")
    return (bce * weight).sum()


def giou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Generalized IoU of matching rows of [N,4] xyxy boxes."""
    inter = (torch.minimum(pred[:, 2:], target[:, 2:]) - torch.maximum(pred[:, :2], target[:, :2])).clamp(min=0)
    inter = inter.prod(-1)
    area_p = (pred[:, 2:] - pred[:, :2]).prod(-1)
    area_t = (target[:, 2:] - target[:, :2]).prod(-1)
    union = area_p + area_t - inter + eps
    hull = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).prod(-1) + eps
    iou = inter / union
    return iou - (hull - union) / hull


def dfl_loss(pred_dist: torch.Tensor, target: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Distribution focal loss: cross-entropy to the two bins around each continuous ltrb target, per box."""
    target = target.clamp(0, reg_max - 0.01)
    left = target.long()
    w_left = (left + 1).float() - target
    logits = pred_dist.reshape(-1, reg_max + 1)
    ce_left = F.cross_entropy(logits, left.reshape(-1), reduction="none").view(left.shape)
    ce_right = F.cross_entropy(logits, (left + 1).reshape(-1), reduction="none").view(left.shape)
    return (ce_left * w_left + ce_right * (1 - w_left)).mean(-1)


@dataclass
class LossWeights:
    cls: float = 1.0
    iou: float = 2.5
    dfl: float = 0.5


def targets_to_padded(targets: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[M,6] (batch_idx, class, x1, y1, x2, y2) -> labels [B,K], boxes [B,K,4], mask [B,K] padded per image."""
    device = targets.device
    counts = torch.bincount(targets[:, 0].long(), minlength=batch_size) if len(targets) else \
        torch.zeros(batch_size, dtype=torch.long, device=device)
    k = int(counts.max()) if len(targets) else 0
    labels = torch.zeros(batch_size, k, dtype=torch.long, device=device)
    boxes = torch.zeros(batch_size, k, 4, device=device)
    mask = torch.zeros(batch_size, k, dtype=torch.bool, device=device)
    for b in range(batch_size):
        rows = targets[targets[:, 0] == b]
        labels[b, :len(rows)] = rows[:, 1].long()
        boxes[b, :len(rows)] = rows[:, 2:6]
        mask[b, :len(rows)] = True
    return labels, boxes, mask


class DetectionLoss:
    """Loss of a YOLOv6 head's training output against [M,6] targets in input pixels."""

    def __init__(self, num_classes: int, strides: torch.Tensor, reg_max: int = 0, use_dfl: bool = False,
                 weights: LossWeights | None = None, topk: int = 13):
        self.num_classes, self.strides, self.reg_max, self.use_dfl = num_classes, strides, reg_max, use_dfl
        self.weights = weights or LossWeights()
        self.assigner = TaskAlignedAssigner(num_classes, topk=topk)
        self.proj = torch.linspace(0, reg_max, reg_max + 1)

    def decode(self, pred_dist: torch.Tensor, anchor_points: torch.Tensor) -> torch.Tensor:
        """Box regression -> xyxy boxes in stride units."""
        if self.use_dfl:
            b, a, _ = pred_dist.shape
            pred_dist = F.softmax(pred_dist.view(b, a, 4, self.reg_max + 1), -1) @ self.proj.to(pred_dist.device)
        return dist2bbox(pred_dist, anchor_points)

    def __call__(self, outputs, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss (mean over the batch's soft targets, as YOLOv6) and its weighted parts for logging."""
        feats, pred_scores, pred_dist = outputs[:3]
        batch = pred_scores.shape[0]
        anchor_points, stride_tensor = make_anchor_points(feats, self.strides)
        anchor_points_px = anchor_points * stride_tensor
        pred_boxes = self.decode(pred_dist, anchor_points)  # stride units
        gt_labels, gt_boxes, gt_mask = targets_to_padded(targets.to(pred_scores.device), batch)
        assign = self.assigner(pred_scores.detach(), pred_boxes.detach() * stride_tensor, anchor_points_px,
                               gt_labels, gt_boxes, gt_mask)
        fg = assign.fg_mask
        one_hot = F.one_hot(assign.labels, self.num_classes).float() * fg.unsqueeze(-1)
        score_sum = assign.scores.sum().clamp(min=1.0)
        loss_cls = varifocal_loss(pred_scores, assign.scores, one_hot) / score_sum
        loss_iou = loss_dfl = pred_dist.sum() * 0.0
        if fg.any():
            box_weight = assign.scores.sum(-1)[fg]
            target_boxes = assign.bboxes / stride_tensor  # stride units, like the predictions
            loss_iou = ((1.0 - giou(pred_boxes[fg], target_boxes[fg])) * box_weight).sum() / score_sum
            if self.use_dfl:
                anchors_fg = anchor_points.unsqueeze(0).expand(batch, -1, -1)[fg]
                ltrb = torch.cat([anchors_fg - target_boxes[fg][:, :2], target_boxes[fg][:, 2:] - anchors_fg], -1)
                dist = pred_dist[fg].view(-1, 4, self.reg_max + 1)
                loss_dfl = (dfl_loss(dist, ltrb, self.reg_max) * box_weight).sum() / score_sum
        w = self.weights
        total = w.cls * loss_cls + w.iou * loss_iou + w.dfl * loss_dfl
        parts = {"cls": float(w.cls * loss_cls.detach()), "iou": float(w.iou * loss_iou.detach()),
                 "dfl": float(w.dfl * loss_dfl.detach())}
        return total, parts
