"""Tests of utils.inference.postprocess against brute-force references written here."""

from __future__ import annotations

import math

import pytest
import torch

import utils.inference.postprocess as pp
from utils.errors import InputError
from utils.inference.postprocess import box_iou, nms, non_max_suppression, xywh2xyxy


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two xyxy boxes in plain Python (float64)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else math.nan


def _greedy_nms(boxes: list[tuple[float, ...]], scores: list[float], thr: float) -> list[int]:
    """O(N^2) greedy NMS: by decreasing score (lower index first on ties), keep unless a kept box overlaps."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # sorted() is stable
    kept: list[int] = []
    for i in order:
        if all(not _iou(boxes[k], boxes[i]) > thr for k in kept):
            kept.append(i)
    return kept


def _random_boxes(gen: torch.Generator, n: int, size: float, max_wh: float) -> torch.Tensor:
    """Integer-coordinate xyxy boxes (exact IoU arithmetic, so float32 and float64 agree on every decision)."""
    xy = torch.randint(0, int(size), (n, 2), generator=gen)
    wh = torch.randint(1, int(max_wh), (n, 2), generator=gen)
    return torch.cat([xy, xy + wh], 1).float()


# ---------------------------------------------------------------------------------------------------------- boxes


def test_xywh2xyxy_returns_new_tensor() -> None:
    boxes = torch.tensor([[10.0, 20.0, 4.0, 6.0]])
    before = boxes.clone()
    out = xywh2xyxy(boxes)
    assert torch.equal(out, torch.tensor([[8.0, 17.0, 12.0, 23.0]]))
    assert torch.equal(boxes, before)
    assert out.data_ptr() != boxes.data_ptr()


def test_box_iou_hand_computed() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 6.0, 4.0], [10.0, 10.0, 11.0, 11.0], [0.0, 0.0, 2.0, 2.0]])
    expected = torch.tensor(
        [
            [1 / 7, 0.0, 0.0, 1.0],  # 1x1 overlap of two 2x2 boxes: 1 / (4 + 4 - 1)
            [4 / 16, 8 / 24, 0.0, 4 / 16],
        ]
    )
    assert torch.allclose(box_iou(a, b), expected)


# ------------------------------------------------------------------------------------------------------------ nms


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.65, 0.9])
def test_nms_matches_brute_force(seed: int, thr: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    boxes = _random_boxes(gen, 300, size=100, max_wh=40)  # crowded: many overlaps
    scores = torch.randint(0, 10, (300,), generator=gen).float()  # many duplicate scores
    expected = _greedy_nms([tuple(b) for b in boxes.tolist()], scores.tolist(), thr)
    kept = nms(boxes, scores, thr)
    assert kept.dtype == torch.long
    assert kept.tolist() == expected


def test_nms_dense_and_chunked_paths_match_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(7)
    boxes = _random_boxes(gen, 400, size=60, max_wh=50)
    scores = torch.randint(0, 5, (400,), generator=gen).float()
    expected = _greedy_nms([tuple(b) for b in boxes.tolist()], scores.tolist(), 0.5)
    # Force the dense block pass for a few steps, then the sparse pass with many tiny pair chunks.
    monkeypatch.setattr(pp, "_MAX_SPARSE_PAIRS", 2000)
    monkeypatch.setattr(pp, "_DENSE_BLOCK", 16)
    monkeypatch.setattr(pp, "_PAIR_CHUNK", 50)
    monkeypatch.setattr(pp, "_DENSE_CHUNK_ELEMS", 100)
    assert nms(boxes, scores, 0.5).tolist() == expected
    # Dense pass only.
    monkeypatch.setattr(pp, "_MAX_SPARSE_PAIRS", -1)
    assert nms(boxes, scores, 0.5).tolist() == expected


def test_nms_iou_equal_to_threshold_is_not_suppressed() -> None:
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 1.0]])  # IoU exactly 0.5
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.49).tolist() == [0]


def test_nms_ties_keep_lower_index_and_sorted_output() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10], [20.0, 20, 30, 30], [40.0, 40, 50, 50]])
    scores = torch.tensor([0.5, 0.5, 0.7, 0.1])
    assert nms(boxes, scores, 0.5).tolist() == [2, 0, 3]


def test_nms_edge_cases() -> None:
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    boxes = torch.tensor([[0.0, 0, 1, 1], [5.0, 5, 6, 6]])
    # A negative threshold suppresses even disjoint boxes (IoU 0 > thr), like torchvision.
    assert nms(boxes, torch.tensor([0.1, 0.2]), -0.1).tolist() == [1]
    assert nms(boxes.half(), torch.tensor([0.1, 0.2]).half(), 0.5).tolist() == [1, 0]
    with pytest.raises(ValueError):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)


# ------------------------------------------------------------------------------------------- non_max_suppression


def _reference_nms(
    pred: torch.Tensor, conf: float, iou: float, multi_label: bool, agnostic: bool, max_det: int, max_nms: int
) -> list[tuple[tuple[float, ...], float, int]]:
    """Independent per-image reference: list of (box, score, class) in plain Python."""
    dets = []
    for cx, cy, w, h, obj, *cls in pred.tolist():
        if not (obj > conf and max(cls) > conf):
            continue
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        scores = [c * obj for c in cls]
        if multi_label:
            dets += [(box, s, k) for k, s in enumerate(scores) if s > conf]
        else:
            k = max(range(len(scores)), key=lambda c: scores[c])
            if scores[k] > conf:
                dets.append((box, scores[k], k))
    dets = sorted(dets, key=lambda d: -d[1])[:max_nms]
    kept: list[tuple[tuple[float, ...], float, int]] = []
    for det in dets:
        if all(not (_iou(k[0], det[0]) > iou and (agnostic or k[2] == det[2])) for k in kept):
            kept.append(det)
    return kept[:max_det]


def _random_prediction(gen: torch.Generator, batch: int, anchors: int, nc: int) -> torch.Tensor:
    pred = torch.rand(batch, anchors, 5 + nc, generator=gen, dtype=torch.float64)
    pred[..., :2] *= 200
    pred[..., 2:4] = pred[..., 2:4] * 60 + 2
    pred[..., 4] = pred[..., 4] ** 2
    pred[..., 5:] = pred[..., 5:] ** 3
    return pred


def _as_sorted_rows(dets: list[tuple[tuple[float, ...], float, int]] | torch.Tensor) -> list[tuple[float, ...]]:
    if isinstance(dets, torch.Tensor):
        rows = [tuple(r) for r in dets.tolist()]
    else:
        rows = [(*box, score, float(cls)) for box, score, cls in dets]
    return sorted(rows)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("multi_label", [True, False])
@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize(("max_det", "max_nms"), [(40, 30000), (10000, 30000), (10000, 150)])
def test_non_max_suppression_matches_reference(
    seed: int, multi_label: bool, agnostic: bool, max_det: int, max_nms: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    nc = 3 + seed  # 3..5 classes
    pred = _random_prediction(gen, batch=2, anchors=400, nc=nc)
    conf, iou = 0.05, 0.45
    out = non_max_suppression(
        pred, conf, iou, multi_label=multi_label, agnostic=agnostic, max_det=max_det, max_nms=max_nms
    )
    assert len(out) == 2
    for image_pred, det in zip(pred, out):
        expected = _reference_nms(image_pred, conf, iou, multi_label, agnostic, max_det, max_nms)
        assert det.shape == (len(expected), 6)
        got_rows, want_rows = _as_sorted_rows(det), _as_sorted_rows(expected)
        assert torch.allclose(torch.tensor(got_rows), torch.tensor(want_rows), atol=1e-9)
        assert torch.all(det[:-1, 4] >= det[1:, 4])  # decreasing score


def _one_image(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.float32)


def test_conf_filtering() -> None:
    pred = _one_image(
        [
            [50, 50, 10, 10, 0.9, 0.02, 0.01],  # best class score not above conf
            [150, 50, 10, 10, 0.02, 0.9, 0.9],  # objectness not above conf
            [250, 50, 10, 10, 0.5, 0.05, 0.01],  # candidate, but 0.5 * 0.05 = 0.025 <= conf
            [350, 50, 10, 10, 0.5, 0.5, 0.01],  # 0.25: kept
        ]
    )
    (det,) = non_max_suppression(pred, conf_thres=0.03)
    assert det.shape == (1, 6)
    assert torch.allclose(det[0], torch.tensor([345.0, 45.0, 355.0, 55.0, 0.25, 0.0]))


def test_multi_label_gives_several_classes_for_one_box() -> None:
    pred = _one_image([[50, 50, 10, 10, 1.0, 0.9, 0.8, 0.01]])
    (det,) = non_max_suppression(pred, conf_thres=0.03, multi_label=True)
    assert det[:, 5].tolist() == [0.0, 1.0]
    assert torch.equal(det[0, :4], det[1, :4])
    (det,) = non_max_suppression(pred, conf_thres=0.03, multi_label=False)
    assert det[:, 4:].tolist() == [[pytest.approx(0.9), 0.0]]


def test_class_offset_and_agnostic() -> None:
    # Two boxes with IoU 0.81: different classes survive class-aware NMS, not agnostic NMS.
    pred = _one_image([[50, 50, 20, 20, 1.0, 0.9, 0.0], [51, 51, 20, 20, 1.0, 0.0, 0.8]])
    (det,) = non_max_suppression(pred, iou_thres=0.65)
    assert det[:, 5].tolist() == [0.0, 1.0]
    (det,) = non_max_suppression(pred, iou_thres=0.65, agnostic=True)
    assert det[:, 4:].tolist() == [[pytest.approx(0.9), 0.0]]
    same_class = _one_image([[50, 50, 20, 20, 1.0, 0.9, 0.0], [51, 51, 20, 20, 1.0, 0.8, 0.0]])
    (det,) = non_max_suppression(same_class, iou_thres=0.65)
    assert det[:, 4:].tolist() == [[pytest.approx(0.9), 0.0]]


def _disjoint_boxes(n: int) -> torch.Tensor:
    """n non-overlapping single-class boxes with scores 0.1 .. ~0.99 in shuffled order."""
    scores = torch.linspace(0.1, 0.99, n)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    rows = [[20.0 * i + 5, 5, 8, 8, 1.0, float(s)] for i, s in enumerate(scores)]
    return _one_image(rows)


def test_max_det_keeps_best() -> None:
    pred = _disjoint_boxes(20)
    (det,) = non_max_suppression(pred, max_det=5)
    expected = torch.sort(pred[0, :, 5], descending=True).values[:5]
    assert torch.allclose(det[:, 4], expected)


def test_pre_nms_cap_keeps_best() -> None:
    # Box 0 (best) suppresses box 1; with max_nms=2 only boxes 0 and 1 enter NMS, so box 2 is lost.
    pred = _one_image([[50, 50, 20, 20, 1.0, 0.9], [50, 50, 20, 20, 1.0, 0.8], [150, 50, 20, 20, 1.0, 0.7]])
    (det,) = non_max_suppression(pred, max_nms=2)
    assert det[:, 4].tolist() == [pytest.approx(0.9)]
    (det,) = non_max_suppression(pred, max_nms=3)
    assert det[:, 4].tolist() == [pytest.approx(0.9), pytest.approx(0.7)]


def test_input_not_mutated_and_empty_output() -> None:
    gen = torch.Generator().manual_seed(3)
    pred = _random_prediction(gen, batch=2, anchors=100, nc=4).float()
    before = pred.clone()
    non_max_suppression(pred)
    assert torch.equal(pred, before)
    out = non_max_suppression(torch.zeros(2, 10, 8))
    assert [o.shape for o in out] == [(0, 6), (0, 6)]


def test_half_input_computed_in_float32() -> None:
    gen = torch.Generator().manual_seed(4)
    pred = _random_prediction(gen, batch=1, anchors=200, nc=3).float()
    (det16,) = non_max_suppression(pred.half())
    (det32,) = non_max_suppression(pred.half().float())
    assert det16.dtype == torch.float32
    assert torch.equal(det16, det32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"conf_thres": 1.5}, "--conf must be in [0, 1], got 1.5"),
        ({"conf_thres": -0.1}, "--conf must be in [0, 1]"),
        ({"conf_thres": math.nan}, "--conf must be in [0, 1]"),
        ({"iou_thres": 2.0}, "--iou must be in [0, 1], got 2.0"),
        ({"max_det": 0}, "--max-det must be >= 1"),
        ({"max_nms": 0}, "--max-nms must be >= 1"),
    ],
)
def test_threshold_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        non_max_suppression(torch.zeros(1, 4, 7), **kwargs)


def test_bad_prediction_shape() -> None:
    with pytest.raises(InputError, match="expected"):
        non_max_suppression(torch.zeros(4, 7))
    with pytest.raises(InputError, match="expected"):
        non_max_suppression(torch.zeros(1, 4, 5))
