"""What a sensitivity method measures: the methods, their columns and direction, and the label-free error metrics.

The label-free proxies compare a model's outputs with its float outputs. The raw head output [B,N,5+nc] mixes
pixel-scale boxes with [0,1] scores, so it is split (``head_parts``):

* scores: objectness x class score of every anchor and class, compared as they are;
* boxes: each anchor's corners relative to its *float* box centre, divided by the float box's size
  (sqrt(w*h), at least 1 px): a scale-free box error, close to what IoU sees, whatever the box's position and
  size. Box errors are weighted by the anchor's float best score, so anchors that make detections count and
  background anchors (whose boxes NMS throws away) do not.

The head value combines the two parts equally (``combine``): ``sqnr`` averages their noise-to-signal ratios and
reports -10*log10 of the mean (dB; lower = more sensitive), ``cosine`` averages their cosine similarities (lower =
more sensitive), ``mse`` averages their mean squared errors (higher = more sensitive). The same metric at the three
neck outputs (levels weighted equally) is a second, diagnostic column; rankings use the head value. All values are
finite: zero error gives ``SQNR_CAP_DB``, non-finite outputs the worst value.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from utils.errors import InputError

METHODS = ("map", "sqnr", "cosine", "mse")
PROXY_METHODS = ("sqnr", "cosine", "mse")
SQNR_CAP_DB = 200.0  # |SQNR| never exceeds this: zero error is "200 dB", not infinity
MSE_CAP = 1e30  # the mse of non-finite outputs
# the two text-file columns per method; the second one ranks (as mAP50:95 does in YOLOv6's partial_quant.py)
COLUMNS = {"map": ("mAP50", "mAP50_95"), "sqnr": ("sqnr_db_neck", "sqnr_db"),
           "cosine": ("cosine_neck", "cosine"), "mse": ("mse_neck", "mse")}
# True: a higher value means the layer is *less* sensitive (direction "single": the layer is quantized alone)
HIGHER_IS_LESS_SENSITIVE = {"map": True, "sqnr": True, "cosine": True, "mse": False}
# single: this layer alone INT8, all others float (the seed's, YOLOv6's). revert: this layer alone back to float, all
# others INT8 (leave-one-out, as NNCF's accuracy-aware quantization ranks): sees the interactions of a full-INT8 model.
DIRECTIONS = ("single", "revert")
VALUE_FORMAT = {"map": "{:0.4f}", "sqnr": "{:0.4f}", "cosine": "{:0.8f}", "mse": "{:0.6e}"}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise InputError(f"unknown sensitivity method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise InputError(f"unknown sensitivity direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
    return direction


def key_column(method: str) -> str:
    """The value that ranks layers for ``method``."""
    return COLUMNS[check_method(method)][1]


def higher_is_less_sensitive(method: str, direction: str = "single") -> bool:
    """Whether a higher value means less sensitive. Reverting a sensitive layer *improves* the model, so the
    revert direction reads every metric the other way round."""
    single = HIGHER_IS_LESS_SENSITIVE[check_method(method)]
    return single if check_direction(direction) == "single" else not single


def ranking_name(method: str, direction: str = "single") -> str:
    """The stem of a ranking's files: ``map``, ``sqnr``, ... or ``map_revert``, ``sqnr_revert``, ..."""
    return check_method(method) if check_direction(direction) == "single" else f"{method}_revert"


def sensitivity_order(values: Sequence[float], method: str, direction: str = "single") -> list[int]:
    """Indices from most to least sensitive; ties keep model order."""
    sign = 1.0 if higher_is_less_sensitive(method, direction) else -1.0
    return sorted(range(len(values)), key=lambda i: (sign * values[i], i))


@dataclass
class Moments:
    """Running (optionally weighted) sums of ref^2, test^2, ref*test, (test-ref)^2 and weights, in float64.

    ``sqnr_db``, ``cosine`` and ``mse`` are computed from the sums, so batches can be added one at a time.
    """

    rr: float = 0.0
    tt: float = 0.0
    rt: float = 0.0
    ee: float = 0.0
    w: float = 0.0
    nonfinite: bool = False

    def update(self, ref: torch.Tensor, test: torch.Tensor, weight: torch.Tensor | None = None) -> Moments:
        """Add ``ref`` / ``test`` (same shape); ``weight`` broadcasts against them (None: every element counts 1)."""
        if ref.shape != test.shape:
            raise ValueError(f"reference and test shapes differ: {tuple(ref.shape)} vs {tuple(test.shape)}")
        ref, test = ref.detach().double(), test.detach().double()
        if not bool(torch.isfinite(test).all()):
            self.nonfinite = True
            return self
        w = torch.ones_like(ref) if weight is None else weight.detach().double().expand_as(ref)
        err = test - ref
        sums = torch.stack([(w * ref * ref).sum(), (w * test * test).sum(), (w * ref * test).sum(),
                            (w * err * err).sum(), w.sum()]).tolist()
        self.rr, self.tt, self.rt, self.ee, self.w = (a + b for a, b in
                                                      zip((self.rr, self.tt, self.rt, self.ee, self.w), sums))
        return self

    @property
    def sqnr_db(self) -> float:
        """10*log10(signal / noise) in dB, within +-SQNR_CAP_DB (zero noise: the cap)."""
        if self.nonfinite:
            return -SQNR_CAP_DB
        if self.ee <= 0.0:
            return SQNR_CAP_DB
        if self.rr <= 0.0:
            return -SQNR_CAP_DB
        return max(-SQNR_CAP_DB, min(SQNR_CAP_DB, 10.0 * math.log10(self.rr / self.ee)))

    @property
    def cosine(self) -> float:
        """Cosine similarity in [-1, 1]; two zero vectors are identical (1), one zero vector is orthogonal (0)."""
        if self.nonfinite:
            return -1.0
        if self.rr <= 0.0 and self.tt <= 0.0:
            return 1.0
        if self.rr <= 0.0 or self.tt <= 0.0:
            return 0.0
        return max(-1.0, min(1.0, self.rt / math.sqrt(self.rr * self.tt)))

    @property
    def mse(self) -> float:
        """Weighted mean squared error (0 when nothing was added, MSE_CAP for non-finite outputs)."""
        if self.nonfinite:
            return MSE_CAP
        return min(MSE_CAP, self.ee / self.w) if self.w > 0 else 0.0

    def value(self, method: str) -> float:
        return {"sqnr": lambda: self.sqnr_db, "cosine": lambda: self.cosine, "mse": lambda: self.mse}[method]()


def sqnr_db(ref: torch.Tensor, test: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``ref`` in dB (finite: capped at +-SQNR_CAP_DB)."""
    return Moments().update(ref, test, weight).sqnr_db


def cosine_similarity(ref: torch.Tensor, test: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """Cosine similarity of the flattened (weighted) tensors."""
    return Moments().update(ref, test, weight).cosine


def mse(ref: torch.Tensor, test: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """(Weighted) mean squared error."""
    return Moments().update(ref, test, weight).mse


def combine(method: str, parts: Sequence[Moments]) -> float:
    """One value from several parts weighted equally: mean noise-to-signal ratio (sqnr), mean cosine, mean mse."""
    if not parts:
        raise ValueError("nothing to combine")
    if method == "sqnr":
        nsr = sum(10.0 ** (-p.sqnr_db / 10.0) for p in parts) / len(parts)
        return max(-SQNR_CAP_DB, min(SQNR_CAP_DB, -10.0 * math.log10(nsr)))
    return sum(p.value(method) for p in parts) / len(parts)


def _xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def head_parts(ref: torch.Tensor, test: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Split raw head outputs [..., 5+nc] into ((box_ref, box_test, box_weight), (score_ref, score_test)).

    Boxes: corners relative to the float box centre over the float box size (see the module docstring), weighted
    by the float best score of the anchor. Scores: objectness x class scores.
    """
    cx, cy, w, h = ref[..., :4].unbind(-1)
    size = (w.abs().clamp(min=1.0) * h.abs().clamp(min=1.0)).sqrt().unsqueeze(-1)
    centre = torch.stack([cx, cy, cx, cy], -1)
    box_ref = (_xyxy(ref[..., :4]) - centre) / size
    box_test = (_xyxy(test[..., :4]) - centre) / size
    score_ref = ref[..., 4:5] * ref[..., 5:]
    score_test = test[..., 4:5] * test[..., 5:]
    weight = score_ref.amax(-1, keepdim=True).clamp(min=0.0)
    return (box_ref, box_test, weight), (score_ref, score_test)


@dataclass
class DetectionError:
    """Accumulated error of a detector's outputs against its float outputs: head boxes, head scores, neck levels."""

    box: Moments = field(default_factory=Moments)
    score: Moments = field(default_factory=Moments)
    neck: list[Moments] = field(default_factory=list)

    def update(self, ref: torch.Tensor, test: torch.Tensor, ref_feats: Sequence[torch.Tensor] = (),
               test_feats: Sequence[torch.Tensor] = ()) -> DetectionError:
        (box_ref, box_test, weight), (score_ref, score_test) = head_parts(ref, test)
        if not bool(torch.isfinite(test).all()):
            self.box.nonfinite = self.score.nonfinite = True
        else:
            self.box.update(box_ref, box_test, weight)
            self.score.update(score_ref, score_test)
        if not self.neck:
            self.neck = [Moments() for _ in ref_feats]
        for moments, a, b in zip(self.neck, ref_feats, test_feats, strict=True):
            moments.update(a, b)
        return self

    def values(self, method: str) -> dict[str, float]:
        """The method's head value (ranking), neck value and the head's two parts, keyed as in COLUMNS."""
        neck_col, head_col = COLUMNS[method]
        head = combine(method, [self.box, self.score])
        return {head_col: head, neck_col: combine(method, self.neck) if self.neck else head,
                f"{head_col}_box": self.box.value(method), f"{head_col}_score": self.score.value(method)}
