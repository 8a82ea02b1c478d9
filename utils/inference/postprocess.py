"""YOLOv6-style detection post-processing in pure torch: box conversion, IoU, NMS and per-image filtering.

torchvision is not usable in this project, so `nms` re-implements `torchvision.ops.nms` semantics: greedy suppression
in decreasing score order (stable, lower index first on ties) of every box whose IoU with an already kept box is
strictly greater than the threshold.
"""

from __future__ import annotations

import logging

import torch

from utils.errors import InputError

_logger = logging.getLogger(__name__)

# Class offset of the batched NMS, as in YOLOv6 (`max_wh`): boxes of different classes never overlap after the shift.
CLASS_OFFSET = 4096

# Above this many candidate pairs (see _x_sweep) the sparse pass would take too long, so dense blocks of the
# highest-scoring boxes are resolved first: in crowded images they suppress most of the rest.
_MAX_SPARSE_PAIRS = 8_000_000
# Pairs materialised at once by the sparse pass (bounds peak memory to a few hundred MB).
_PAIR_CHUNK = 1_000_000
# Boxes resolved per dense step, and elements of one dense IoU block.
_DENSE_BLOCK = 256
_DENSE_CHUNK_ELEMS = 4_000_000


def xywh2xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Convert (cx, cy, w, h) boxes to (x1, y1, x2, y2); returns a new tensor, any leading dims."""
    out = torch.empty_like(boxes)
    half_w = boxes[..., 2] / 2
    half_h = boxes[..., 3] / 2
    out[..., 0] = boxes[..., 0] - half_w
    out[..., 1] = boxes[..., 1] - half_h
    out[..., 2] = boxes[..., 0] + half_w
    out[..., 3] = boxes[..., 1] + half_h
    return out


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes.

    Args:
        a: [N, 4] boxes (x1, y1, x2, y2).
        b: [M, 4] boxes (x1, y1, x2, y2).

    Returns:
        [N, M] IoU matrix (NaN where both boxes have zero area, like torchvision).
    """
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (_area(a)[:, None] + _area(b)[None, :] - inter)


def _resolve_block(boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS inside one small score-ordered block; returns a bool keep mask.

    Iterates keep[j] = not any(keep[i] and iou[i, j] > thr for i < j) from all-True: element j is final once all
    i < j are, so the unique fixed point is the greedy answer and it is usually reached in a few iterations.
    """
    over = torch.triu(box_iou(boxes, boxes) > iou_threshold, diagonal=1)
    keep = torch.ones(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    while True:
        new_keep = ~(over & keep[:, None]).any(0)
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep


def _any_iou_above(kept: torch.Tensor, others: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Bool mask over `others`: IoU with any of `kept` above the threshold (computed in memory-bounded chunks)."""
    hit = torch.zeros(others.shape[0], dtype=torch.bool, device=others.device)
    step = max(1, _DENSE_CHUNK_ELEMS // max(1, kept.shape[0]))
    for start in range(0, others.shape[0], step):
        hit[start : start + step] = (box_iou(kept, others[start : start + step]) > iou_threshold).any(0)
    return hit


def _x_sweep(boxes: torch.Tensor, iou_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort boxes by x1 and count, for each, the later boxes (in that order) that may overlap it above the threshold.

    Since union >= area_i >= w_i * h_inter, IoU <= w_inter / w_i; so IoU > t needs x1_j < x2_i - t * w_i for a box j
    starting at or after box i. The bound is loosened by a relative and an absolute (rounding) margin so that every
    pair whose computed IoU exceeds the threshold is a candidate.

    Returns:
        (x_order, counts): x_order[p] is the box at sweep position p; counts[p] its candidate partners p+1..p+counts.
    """
    x_order = torch.sort(boxes[:, 0], stable=True).indices
    x_sorted = boxes[x_order]
    x1, x2 = x_sorted[:, 0].contiguous(), x_sorted[:, 2].contiguous()
    width = x2 - x1
    eps = torch.finfo(boxes.dtype).eps
    slack = 8 * eps * (x2.abs() + width.abs())
    limit = x2 - iou_threshold * (1 - 1e-4) * width + slack
    end = torch.searchsorted(x1, limit, side="left")
    pos = torch.arange(boxes.shape[0], device=boxes.device)
    return x_order, (end - pos - 1).clamp(min=0)


def _overlap_edges(
    boxes: torch.Tensor, x_order: torch.Tensor, counts: torch.Tensor, iou_threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs (u, v), u < v in score order, with IoU > threshold; pairs are materialised in bounded chunks."""
    device = boxes.device
    by_x = boxes[x_order]
    x1, y1, x2, y2 = (by_x[:, k].contiguous() for k in range(4))
    area = (x2 - x1) * (y2 - y1)
    csum = counts.cumsum(0)
    n = boxes.shape[0]
    us, vs = [], []
    p0 = 0
    while p0 < n:
        base = int(csum[p0 - 1]) if p0 else 0
        p1 = int(torch.searchsorted(csum, torch.tensor(base + _PAIR_CHUNK, device=device), right=True))
        p1 = min(max(p1, p0 + 1), n)
        chunk_counts = counts[p0:p1]
        total = int(chunk_counts.sum())
        if total:
            a = torch.arange(p0, p1, device=device).repeat_interleave(chunk_counts)
            first = (chunk_counts.cumsum(0) - chunk_counts).repeat_interleave(chunk_counts)
            b = a + 1 + torch.arange(total, device=device) - first
            # Pairs without vertical overlap have IoU 0: drop them before the costlier gathers.
            h = (torch.minimum(y2[a], y2[b]) - torch.maximum(y1[a], y1[b])).clamp_(min=0)
            overlap = h > 0
            a, b, h = a[overlap], b[overlap], h[overlap]
            # Same arithmetic as box_iou (max(x1[a], x1[b]) is x1[b] in sweep order), hence identical decisions.
            w = (torch.minimum(x2[a], x2[b]) - x1[b]).clamp_(min=0)
            inter = w * h
            over = inter / (area[a] + area[b] - inter) > iou_threshold
            i, j = x_order[a[over]], x_order[b[over]]
            us.append(torch.minimum(i, j))
            vs.append(torch.maximum(i, j))
        p0 = p1
    if not us:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    return torch.cat(us), torch.cat(vs)


def _resolve_graph(n: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Greedy NMS on the suppression graph (edge u -> v, u < v in score order); returns a bool keep mask.

    Each round keeps every undecided node with no undecided predecessor (all its predecessors were suppressed),
    suppresses the successors of those, and drops edges touching decided nodes. The lowest undecided node is
    always decided, so this terminates; in practice suppression chains are short and few rounds are needed.
    """
    device = u.device
    kept = torch.zeros(n, dtype=torch.bool, device=device)
    undecided = torch.ones(n, dtype=torch.bool, device=device)
    while u.numel():
        has_pred = torch.zeros(n, dtype=torch.bool, device=device)
        has_pred[v] = True
        newly_kept = undecided & ~has_pred
        kept |= newly_kept
        undecided &= ~newly_kept
        undecided[v[newly_kept[u]]] = False
        live = undecided[u] & undecided[v]
        u, v = u[live], v[live]
    return kept | undecided


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Non-maximum suppression with `torchvision.ops.nms` semantics, in pure torch.

    Args:
        boxes: [N, 4] xyxy boxes (x2 >= x1, y2 >= y1), any float dtype / device (computed in fp32 or fp64).
        scores: [N] scores.
        iou_threshold: boxes with IoU strictly greater than this against a kept higher-scoring box are dropped.

    Returns:
        int64 indices of the kept boxes, by decreasing score (ties: lower index first).

    Sparse pass: an x-sorted sweep lists the pairs that can exceed the threshold, their IoU gives the suppression
    graph, which is resolved in a few vectorised rounds. When that is too many pairs (crowded boxes), blocks of the
    highest-scoring boxes are first resolved densely against all remaining boxes.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.ndim != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"nms expects boxes [N, 4] and scores [N], got {tuple(boxes.shape)} and {tuple(scores.shape)}")
    order = torch.sort(scores, descending=True, stable=True).indices
    if order.numel() == 0:
        return order
    dtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    sorted_boxes = boxes[order].to(dtype)
    keep = torch.zeros(order.shape[0], dtype=torch.bool, device=boxes.device)
    alive = torch.ones_like(keep)  # neither kept nor suppressed yet
    while True:
        rest = torch.nonzero(alive).squeeze(1)  # ascending, i.e. still in score order
        if rest.numel() == 0:
            break
        rest_boxes = sorted_boxes[rest]
        # A negative threshold makes even disjoint boxes suppress each other: only the dense path handles that.
        if iou_threshold >= 0:
            x_order, counts = _x_sweep(rest_boxes, iou_threshold)
            if int(counts.sum()) <= _MAX_SPARSE_PAIRS:
                u, v = _overlap_edges(rest_boxes, x_order, counts, iou_threshold)
                keep[rest[_resolve_graph(rest.shape[0], u, v)]] = True
                break
        block, others = rest[:_DENSE_BLOCK], rest[_DENSE_BLOCK:]
        block_keep = _resolve_block(rest_boxes[:_DENSE_BLOCK], iou_threshold)
        keep[block[block_keep]] = True
        alive[block] = False
        if others.numel():
            hit = _any_iou_above(rest_boxes[:_DENSE_BLOCK][block_keep], rest_boxes[_DENSE_BLOCK:], iou_threshold)
            alive[others[hit]] = False
    return order[keep]


def _check_unit_interval(value: float, flag: str) -> None:
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise InputError(f"{flag} must be in [0, 1], got {value}")


def _validate_nms_args(
    prediction: torch.Tensor, conf_thres: float, iou_thres: float, max_det: int, max_nms: int
) -> None:
    _check_unit_interval(conf_thres, "--conf")
    _check_unit_interval(iou_thres, "--iou")
    if max_det < 1:
        raise InputError(f"--max-det must be >= 1, got {max_det}")
    if max_nms < 1:
        raise InputError(f"--max-nms must be >= 1, got {max_nms}")
    if prediction.ndim != 3 or prediction.shape[-1] < 6:
        raise InputError(
            f"model output has shape {tuple(prediction.shape)}, expected [batch, anchors, 5 + num_classes] "
            "(cx, cy, w, h, objectness, class scores); export the YOLOv6 model with its objectness output"
        )


def _image_detections(x: torch.Tensor, conf_thres: float, multi_label: bool) -> torch.Tensor:
    """Candidate detections [n, 6] (x1, y1, x2, y2, score, class) of one image's [N, 5+nc] prediction."""
    objectness = x[:, 4]
    class_scores = x[:, 5:]
    candidates = (objectness > conf_thres) & (class_scores.max(1).values > conf_thres)
    x = x[candidates]
    scores = x[:, 5:] * x[:, 4:5]
    boxes = xywh2xyxy(x[:, :4])
    if multi_label:
        box_idx, class_idx = (scores > conf_thres).nonzero(as_tuple=True)
        conf = scores[box_idx, class_idx]
    else:
        conf, class_idx = scores.max(1)
        box_idx = torch.nonzero(conf > conf_thres).squeeze(1)
        conf, class_idx = conf[box_idx], class_idx[box_idx]
    return torch.cat((boxes[box_idx], conf[:, None], class_idx[:, None].to(x.dtype)), 1)


def non_max_suppression(
    prediction: torch.Tensor,
    conf_thres: float = 0.03,
    iou_thres: float = 0.65,
    multi_label: bool = True,
    agnostic: bool = False,
    max_det: int = 300,
    max_nms: int = 30000,
) -> list[torch.Tensor]:
    """YOLOv6-evaluation-style filtering and batched NMS of raw detector output.

    Args:
        prediction: [B, N, 5 + nc] (cx, cy, w, h in pixels, objectness, class scores); not modified.
        conf_thres: keep anchors with objectness and best class score above this, then (box, class) pairs whose
            objectness * class score is above it.
        iou_thres: NMS IoU threshold (per class unless `agnostic`).
        multi_label: one detection per (box, class) pair above `conf_thres`; otherwise best class only.
        agnostic: suppress across classes.
        max_det: detections kept per image after NMS.
        max_nms: detections kept (top scores) per image before NMS.

    Returns:
        Per image a [n, 6] tensor (x1, y1, x2, y2, score, class_index), decreasing score; float32 (float64 when the
        input is float64), on the input's device.
    """
    _validate_nms_args(prediction, conf_thres, iou_thres, max_det, max_nms)
    dtype = torch.float64 if prediction.dtype == torch.float64 else torch.float32
    output = []
    for image_pred in prediction:
        det = _image_detections(image_pred.to(dtype), conf_thres, multi_label)
        if det.shape[0] > max_nms:
            det = det[torch.sort(det[:, 4], descending=True, stable=True).indices[:max_nms]]
        offsets = det[:, 5:6] * (0 if agnostic else CLASS_OFFSET)
        keep = nms(det[:, :4] + offsets, det[:, 4], iou_thres)[:max_det]
        output.append(det[keep])
    return output
