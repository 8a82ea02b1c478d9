"""How far a detector's outputs are from its float outputs: SQNR, cosine and MSE of the head and the neck.

The raw head output [B,N,5+nc] mixes pixel-scale boxes with [0,1] scores, so it is split (``head_parts``):

* scores: objectness x class score of every anchor and class, compared as they are;
* boxes: each anchor's corners relative to its *float* box centre, divided by the float box's size
  (sqrt(w*h), at least 1 px): a scale-free box error, close to what IoU sees, whatever the box's position and
  size. Box errors are weighted by the anchor's float best score, so anchors that make detections count and
  background anchors (whose boxes NMS throws away) do not.

The head value combines the two parts equally (``combine``): ``sqnr`` averages their noise-to-signal ratios and
reports -10*log10 of the mean (dB; lower = worse), ``cosine`` averages their cosine similarities (lower = worse),
``mse`` averages their mean squared errors (higher = worse). The same metric at the neck outputs (levels weighted
equally) is a second, diagnostic value. All values are finite: zero error gives ``SQNR_CAP_DB``, non-finite outputs
the worst value. Used by the sensitivity proxies and by automatic calibration.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

ERROR_METRICS = ("sqnr", "cosine", "mse")
SQNR_CAP_DB = 200.0  # |SQNR| never exceeds this: zero error is "200 dB", not infinity
MSE_CAP = 1e30  # the mse of non-finite outputs


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

    def head(self, metric: str) -> float:
        """The head's value: boxes and scores combined (``combine``)."""
        return combine(metric, [self.box, self.score])

    def neck_value(self, metric: str) -> float:
        """The neck levels combined (the head's value when no neck was compared)."""
        return combine(metric, self.neck) if self.neck else self.head(metric)


@contextlib.contextmanager
def capturing_neck(model: nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """Within the block, every forward of ``model`` appends its neck's outputs (one tensor per level) to the list
    yielded (nothing for a model without a ``neck``)."""
    captured: list[list[torch.Tensor]] = []
    neck = getattr(model, "neck", None)
    handle = None if neck is None else neck.register_forward_hook(lambda m, i, o: captured.append(list(o)))
    try:
        yield captured
    finally:
        if handle is not None:
            handle.remove()
