"""What a --target-drop search compares, and the report-set rows of partial_quant.py: mAP of the partial model with
a given float set, per-image matches kept for the drops' 95 % intervals."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from utils.data.coco import CocoDetection
from utils.fallback.rules import PartialModel
from utils.inference.bootstrap import DropBootstrap, ImageMatches, predicted_interval, rounded_drop
from utils.inference.evaluate import evaluate
from utils.inference.runners import TorchRunner

STOP_RULES = ("point", "upper")  # partial_quant.py --stop-on
DEFAULT_STOP = "point"


@dataclass
class EvalSettings:
    batch_size: int = 32
    workers: int = 2
    progress: bool = True
    seed: int = 0  # of the bootstrap resamples
    stop_on: str = DEFAULT_STOP


class Measurer:
    """mAP50:95 of the partial model with a given float set, on the search set (calling it: what the search
    compares with fp - D) or the report set (``row``: its mAP@.5 and per-image matching are kept for the report and
    its intervals). ``stop_on="upper"``: the search sees fp minus the upper end of the drop's 95 % interval over the
    search images, so it stops only when the whole interval is within the budget."""

    def __init__(self, model: PartialModel, qmodel: torch.nn.Module, device: torch.device,
                 searching: CocoDetection | None, settings: EvalSettings):
        self.model, self.qmodel, self.device, self.searching, self.settings = model, qmodel, device, searching, \
            settings
        self.map50: dict[str, float] = {}  # report-set rows' mAP@.5, beside the mAP@.5:.95 that decides
        self.matches: dict[str, ImageMatches] = {}  # report-set rows' per-image matching, for their intervals
        self.letterbox: dict[str, str] = {}  # each row's geometry: a drop is taken from the float row of the same
        self.search_reference: DropBootstrap | None = None  # the float model on the search images
        self._last_search: dict[str, Any] = {}  # the latest search-set evaluation: float set and matching

    def evaluate(self, float_layers: list[str], dataset: CocoDetection) -> dict[str, Any]:
        self.model.set_float(float_layers)
        return evaluate(TorchRunner(self.qmodel, self.device), dataset, self.settings.batch_size,
                        self.settings.workers, progress=self.settings.progress, matches=True)

    def row(self, name: str, float_layers: list[str], dataset: CocoDetection) -> float:
        """A report row's mAP50:95 (``fp`` on the search set itself also becomes the search's reference)."""
        metrics = self.evaluate(float_layers, dataset)
        self.record(name, metrics, dataset.letterbox)
        if name == "fp" and dataset is self.searching:
            self.search_reference = DropBootstrap(metrics["matches"], seed=self.settings.seed)
        return metrics["mAP50_95"]

    def record(self, name: str, metrics: dict[str, Any], letterbox: str) -> None:
        """Keep a report row measured on ``letterbox`` canvases (by this model, or another runner of it)."""
        self.map50[name], self.matches[name], self.letterbox[name] = metrics["mAP50"], metrics["matches"], letterbox

    def search_float(self) -> float:
        """The float model on the search set: the reference of every search-set drop."""
        metrics = self.evaluate(list(self.model.layers), self.searching)
        self.search_reference = DropBootstrap(metrics["matches"], seed=self.settings.seed)
        return metrics["mAP50_95"]

    def search_ptq(self) -> float:
        return self.evaluate([], self.searching)["mAP50_95"]

    def __call__(self, float_layers: list[str]) -> float:
        """The search-set mAP (point), or fp minus the upper end of the drop's interval (upper)."""
        metrics = self.evaluate(float_layers, self.searching)
        self._last_search = {"float_layers": sorted(float_layers), "matches": metrics["matches"]}
        if self.settings.stop_on == "upper":
            result = self.search_reference.compare(metrics["matches"])["mAP50_95"]
            return result["reference"] - result["high"]
        return metrics["mAP50_95"]

    def search_interval(self, float_layers: list[str], report_images: int) -> dict[str, Any]:
        """The chosen model's search-set drop with its 95 % interval, and where that predicts the drop on
        ``report_images`` other images to fall."""
        if self._last_search.get("float_layers") != sorted(float_layers):
            self(float_layers)
        result = self.search_reference.compare(self._last_search["matches"])
        return {"drop_interval": rounded_drop(result), "predicted_report_interval": predicted_interval(
            result, report_images), "resamples": result["resamples"], "level": result["level"]}
