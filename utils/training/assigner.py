"""Task-aligned label assignment (TAL, as in TOOD / PP-YOLOE / YOLOv6 v3).

For every ground-truth box, the anchors whose centres lie inside it are ranked by the alignment metric
``score^alpha * IoU^beta`` (score = predicted probability of the box's class, IoU of the predicted box); the
top-k become positives. An anchor claimed by several boxes goes to the one its prediction overlaps most. Soft
targets: each positive's class target is its alignment metric, rescaled so the box's best anchor gets the box's
best IoU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def pairwise_iou(gt: torch.Tensor, pred: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU of [B,M,4] and [B,A,4] xyxy boxes -> [B,M,A] (degenerate boxes count as empty)."""
    gt, pred = gt.unsqueeze(2), pred.unsqueeze(1)
    lt = torch.maximum(gt[..., :2], pred[..., :2])
    rb = torch.minimum(gt[..., 2:], pred[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_gt = (gt[..., 2:] - gt[..., :2]).clamp(min=0).prod(-1)
    area_pred = (pred[..., 2:] - pred[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_gt + area_pred - inter + eps)


def anchors_inside(anchor_points: torch.Tensor, gt_bboxes: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """[B,M,A] mask: anchor centre strictly inside the ground-truth box."""
    points = anchor_points.view(1, 1, -1, 2)
    lt = points - gt_bboxes[..., None, :2]
    rb = gt_bboxes[..., None, 2:] - points
    return torch.cat([lt, rb], -1).amin(-1) > eps


@dataclass
class Assignment:
    labels: torch.Tensor  # [B,A] class index (meaningful where fg)
    bboxes: torch.Tensor  # [B,A,4] xyxy, same units as the inputs
    scores: torch.Tensor  # [B,A,C] soft class targets (zero on background)
    fg_mask: torch.Tensor  # [B,A] bool
    gt_index: torch.Tensor  # [B,A] index of the assigned ground truth


class TaskAlignedAssigner:
    """Assign ground truths to anchors. Inputs are in pixels (any consistent unit)."""

    def __init__(self, num_classes: int, topk: int = 13, alpha: float = 1.0, beta: float = 6.0, eps: float = 1e-9):
        self.num_classes, self.topk, self.alpha, self.beta, self.eps = num_classes, topk, alpha, beta, eps

    @torch.no_grad()
    def __call__(self, pred_scores: torch.Tensor, pred_bboxes: torch.Tensor, anchor_points: torch.Tensor,
                 gt_labels: torch.Tensor, gt_bboxes: torch.Tensor, gt_mask: torch.Tensor) -> Assignment:
        """pred_scores [B,A,C] in [0,1]; pred_bboxes [B,A,4]; anchor_points [A,2]; gt_labels [B,M];
        gt_bboxes [B,M,4]; gt_mask [B,M] bool (padding rows False)."""
        b, a, c = pred_scores.shape
        m = gt_bboxes.shape[1]
        device = pred_scores.device
        if m == 0:
            return Assignment(torch.zeros(b, a, dtype=torch.long, device=device), torch.zeros(b, a, 4, device=device),
                              torch.zeros_like(pred_scores), torch.zeros(b, a, dtype=torch.bool, device=device),
                              torch.zeros(b, a, dtype=torch.long, device=device))
        labels = gt_labels.long().clamp(0, c - 1)
        ious = pairwise_iou(gt_bboxes, pred_bboxes)  # [B,M,A]
        cls_scores = pred_scores.permute(0, 2, 1).gather(1, labels.unsqueeze(-1).expand(-1, -1, a))  # [B,M,A]
        align = cls_scores.pow(self.alpha) * ious.pow(self.beta)
        candidates = anchors_inside(anchor_points, gt_bboxes) & gt_mask.unsqueeze(-1)
        positives = self._topk_mask(align * candidates, min(self.topk, a)) & candidates
        positives = self._one_gt_per_anchor(positives, ious)
        fg_mask = positives.any(1)
        gt_index = positives.float().argmax(1)  # [B,A]
        target_labels = labels.gather(1, gt_index)
        target_bboxes = gt_bboxes.gather(1, gt_index.unsqueeze(-1).expand(-1, -1, 4))
        align = align * positives
        best_align = align.amax(-1, keepdim=True)
        best_iou = (ious * positives).amax(-1, keepdim=True)
        norm = (align * best_iou / (best_align + self.eps)).amax(1)  # [B,A]
        scores = torch.nn.functional.one_hot(target_labels, c).float() * (norm * fg_mask).unsqueeze(-1)
        return Assignment(target_labels, target_bboxes, scores, fg_mask, gt_index)

    @staticmethod
    def _topk_mask(metric: torch.Tensor, k: int) -> torch.Tensor:
        idx = metric.topk(k, dim=-1).indices
        return torch.zeros_like(metric, dtype=torch.bool).scatter_(-1, idx, True)

    @staticmethod
    def _one_gt_per_anchor(positives: torch.Tensor, ious: torch.Tensor) -> torch.Tensor:
        """An anchor chosen by several boxes keeps only the box with the highest IoU among them."""
        shared = positives.sum(1, keepdim=True) > 1  # [B,1,A]
        if not shared.any():
            return positives
        best = (ious * positives).argmax(1, keepdim=True)  # [B,1,A]
        best_mask = torch.zeros_like(positives).scatter_(1, best, True)
        return torch.where(shared, best_mask & positives, positives)
