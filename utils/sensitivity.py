"""Per-layer quantization sensitivity of a calibrated YOLOv6 model: probes, resumable progress files, reports.

Every quantized layer is quantized alone (all others in float) and scored by a *probe*:

``map``
    COCO mAP50 / mAP50:95 on a labelled evaluation set, as YOLOv6's ``tools/partial_quantization`` measures it.
    Lower mAP = more sensitive. Also reports the float baseline (all layers off) and full PTQ (all on).
``sqnr`` / ``cosine`` / ``mse``
    Label-free proxies: the layer's effect on the model outputs, measured against the float outputs on calibration
    images (cached once). The raw head output [B,N,5+nc] mixes pixel-scale boxes with [0,1] scores, so it is split:

    * scores: objectness x class score of every anchor and class, compared as they are;
    * boxes: each anchor's corners relative to its *float* box centre, divided by the float box's size
      (sqrt(w*h), at least 1 px): a scale-free box error, close to what IoU sees, whatever the box's position and
      size. Box errors are weighted by the anchor's float best score, so anchors that make detections count and
      background anchors (whose boxes NMS throws away) do not.

    The head value combines the two parts equally: ``sqnr`` averages their noise-to-signal ratios and reports
    -10*log10 of the mean (dB; lower = more sensitive), ``cosine`` averages their cosine similarities (lower = more
    sensitive), ``mse`` averages their mean squared errors (higher = more sensitive). The same metric at the three
    neck outputs (levels weighted equally) is reported as a second, diagnostic column; rankings use the head value.
    All values are finite: zero error gives ``SQNR_CAP_DB``, non-finite outputs the worst value.

Probing re-runs only what a layer changes: sub-modules whose inputs equal those of the float pass return their
cached float outputs (``ForwardReuse``), so a head layer costs a fraction of a forward pass.

Results are appended to a JSONL progress file as soon as each layer is done (flushed and fsync'ed); its first line
identifies model, method, calibration, image size and data, so ``resume`` skips finished layers and refuses a file
made for something else. ``shard=(k, n)`` analyses every n-th layer starting at k; ``merge_shards`` joins them.
"""
from __future__ import annotations

import contextlib
import csv
import fnmatch
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from utils import quantization as quant
from utils.cli import write_json
from utils.data import CocoDetection, ImageFolderDataset, create_dataloader
from utils.errors import InputError
from utils.evaluate import evaluate
from utils.fileio import atomic_output, atomic_write_text, file_sha256
from utils.quant_compat import TensorQuantizer
from utils.runners import TorchRunner

_logger = logging.getLogger(__name__)

METHODS = ("map", "sqnr", "cosine", "mse")
PROXY_METHODS = ("sqnr", "cosine", "mse")
SQNR_CAP_DB = 200.0  # |SQNR| never exceeds this: zero error is "200 dB", not infinity
MSE_CAP = 1e30  # the mse of non-finite outputs
PROGRESS_FORMAT = "yolov6-partial-quant/sensitivity-progress"
PROGRESS_VERSION = 1

# the two text-file columns per method; the second one ranks (as mAP50:95 does in YOLOv6's partial_quant.py)
COLUMNS = {"map": ("mAP50", "mAP50_95"), "sqnr": ("sqnr_db_neck", "sqnr_db"),
           "cosine": ("cosine_neck", "cosine"), "mse": ("mse_neck", "mse")}
# True: a higher value means the layer is *less* sensitive
HIGHER_IS_LESS_SENSITIVE = {"map": True, "sqnr": True, "cosine": True, "mse": False}
_VALUE_FORMAT = {"map": "{:0.4f}", "sqnr": "{:0.4f}", "cosine": "{:0.8f}", "mse": "{:0.6e}"}
_HEADER_RE = re.compile(r"^#\s*metric:\s*(\w+)")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise InputError(f"unknown sensitivity method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def key_column(method: str) -> str:
    """The value that ranks layers for ``method``."""
    return COLUMNS[check_method(method)][1]


# ------------------------------------------------------------------------------------------------ error metrics
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


# ------------------------------------------------------------------------------------------------ forward reuse
def _leaves(obj: Any) -> list[Any]:
    """Flatten tuples / lists / dicts of arguments into their leaves (tensors and plain values)."""
    if isinstance(obj, (list, tuple)):
        return [leaf for item in obj for leaf in _leaves(item)]
    if isinstance(obj, dict):
        return [leaf for key in sorted(obj) for leaf in [key, *_leaves(obj[key])]]
    return [obj]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are treated as different
        return False


class ForwardReuse:
    """Float outputs of sub-module calls, recorded per batch; while one layer is quantized, a sub-module that does
    not contain it and gets the recorded inputs (same tensor, or equal values) returns its recorded output.

    Only calls that a probe can reuse are recorded: modules whose parent holds an analysed layer outside them
    (elsewhere the parent is reused whole), except parameter-free leaves such as activations (cheap to recompute;
    skipping them frees the pre-activation tensors). Only valid for deterministic modules that do not modify
    tensors in place (true of this project's models); ``ProxyProbe`` checks the first probe against a full forward
    pass and turns reuse off if they disagree. Batches beyond ``max_bytes`` of recorded tensors are not recorded.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] | None = None, max_bytes: int = 4 << 30):
        self.model = model
        layers = list(quant.quant_layers(model)) if layers is None else list(layers)
        self.modules = [m for name, m in model.named_modules() if name and not isinstance(m, TensorQuantizer)]
        self.recorded = {id(m) for name, m in model.named_modules() if name and self._useful(name, m, layers)}
        self.records: list[dict[int, list[tuple[list[Any], Any]]] | None] = []
        self.max_bytes, self.bytes = max_bytes, 0

    @staticmethod
    def _useful(name: str, module: nn.Module, layers: list[str]) -> bool:
        if isinstance(module, TensorQuantizer):
            return False
        if not isinstance(module, quant.QUANT_TYPES) and not any(True for _ in module.children()) \
                and not any(True for _ in module.parameters(recurse=False)):
            return False
        parent = name.rpartition(".")[0]
        return any((not parent or n.startswith(parent + ".")) and n != name and not n.startswith(name + ".")
                   for n in layers)

    @torch.no_grad()
    def record(self, x: torch.Tensor) -> Any:
        """Run ``model(x)`` (quantizers as they are: the float pass) and record every sub-module call."""
        calls: dict[int, list[tuple[list[Any], Any]]] = {}
        seen: set[int] = set()
        size = 0

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            nonlocal size
            inputs = _leaves((args, kwargs))
            calls.setdefault(id(module), []).append((inputs, output))
            for t in inputs + _leaves(output):  # inputs too: temporaries (torch.cat results) are kept alive here
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    size += t.numel() * t.element_size()

        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in self.modules if id(m) in self.recorded]
        try:
            out = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        if self.bytes + size > self.max_bytes:
            _logger.info("forward reuse: batch %d not cached (%.0f MB would exceed the %.0f MB limit)",
                         len(self.records), (self.bytes + size) / 2**20, self.max_bytes / 2**20)
            self.records.append(None)
        else:
            self.bytes += size
            self.records.append(calls)
        return out

    @contextlib.contextmanager
    def reuse(self, batch: int, changed: Iterable[nn.Module]) -> Iterator[None]:
        """Within the block, sub-modules not in ``changed`` reuse batch ``batch``'s recorded calls."""
        calls = self.records[batch] if batch < len(self.records) else None
        if calls is None:
            yield
            return
        changed_ids = {id(m) for m in changed}
        counters: dict[int, int] = {}

        def forward(module: nn.Module, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            recorded = calls.get(id(module), ())
            index = counters.get(id(module), 0)
            counters[id(module)] = index + 1
            if id(module) not in changed_ids and index < len(recorded):
                inputs, output = recorded[index]
                leaves = _leaves((args, kwargs))
                if len(leaves) == len(inputs) and all(_same(a, b) for a, b in zip(leaves, inputs)):
                    return output
            return original(*args, **kwargs)

        patched = []
        try:
            for module in self.modules:
                if id(module) not in self.recorded or "forward" in module.__dict__:
                    continue  # already patched by someone else: leave it alone
                module.forward = functools.partial(forward, module, module.forward)
                patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward


# ------------------------------------------------------------------------------------------------------- probes
def _ancestors(model: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".")
    return [model] + [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts) + 1)]


def _result(metrics: dict[str, Any]) -> dict[str, float]:
    return {"mAP50": float(metrics["mAP50"]), "mAP50_95": float(metrics["mAP50_95"])}


class MapProbe:
    """COCO mAP with one layer quantized (YOLOv6's evaluation recipe, ``utils.evaluate.evaluate``)."""

    method = "map"

    def __init__(self, model: nn.Module, dataset: CocoDetection, batch_size: int = 8, workers: int = 2,
                 device: str | torch.device = "cpu"):
        self.model, self.dataset = model, dataset
        self.batch_size, self.workers = batch_size, workers
        self.runner = TorchRunner(model, device)

    def _evaluate(self) -> dict[str, float]:
        return _result(evaluate(self.runner, self.dataset, batch_size=self.batch_size, workers=self.workers,
                                progress=False))

    def baselines(self) -> dict[str, dict[str, float]]:
        """mAP in float (every quantizer off) and with full PTQ (every quantizer on)."""
        quant.disable_all(self.model)
        fp = self._evaluate()
        quant.enable_all(self.model)
        return {"fp": fp, "ptq": self._evaluate()}

    def __call__(self, layer: str) -> dict[str, float]:
        quant.quantize_only(self.model, [layer])
        return self._evaluate()


class ProxyProbe:
    """Label-free proxy (``sqnr``, ``cosine`` or ``mse``) of one quantized layer's effect on the outputs."""

    def __init__(self, model: nn.Module, batches: Sequence[torch.Tensor], method: str,
                 device: str | torch.device = "cpu", reuse: bool = True, layers: Sequence[str] | None = None,
                 reuse_max_bytes: int = 4 << 30):
        if method not in PROXY_METHODS:
            raise InputError(f"unknown proxy {method!r}; choose one of {', '.join(PROXY_METHODS)}")
        if not batches:
            raise InputError("no images for the proxy: pass a calibration folder with images")
        self.method, self.device = method, torch.device(device)
        self.model = model.to(self.device).eval()
        self.batches = [b.to(self.device) for b in batches]
        self.reuse = ForwardReuse(self.model, layers, reuse_max_bytes) if reuse else None
        self._checked = False
        self._refs: list[tuple[torch.Tensor, list[torch.Tensor]]] | None = None

    @contextlib.contextmanager
    def _capture_neck(self) -> Iterator[list[Any]]:
        captured: list[Any] = []
        neck = getattr(self.model, "neck", None)
        handle = None if neck is None else neck.register_forward_hook(lambda m, i, o: captured.append(list(o)))
        try:
            yield captured
        finally:
            if handle is not None:
                handle.remove()

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with self._capture_neck() as captured:
            out = self.model(x)
        return out, (captured[-1] if captured else [])

    @torch.no_grad()
    def prepare(self) -> None:
        """Run the float model once over the images: reference outputs (and recorded calls for reuse)."""
        if self._refs is not None:
            return
        quant.disable_all(self.model)
        self._refs = []
        for x in tqdm(self.batches, desc="float reference", unit="batch", file=sys.stderr, leave=False):
            with self._capture_neck() as captured:
                out = self.reuse.record(x) if self.reuse is not None else self.model(x)
            self._refs.append((out, captured[-1] if captured else []))

    def _measure(self, changed: list[nn.Module] | None) -> dict[str, float]:
        error = DetectionError()
        for b, (x, (ref, ref_feats)) in enumerate(zip(self.batches, self._refs, strict=True)):
            if changed is not None and self.reuse is not None:
                with self.reuse.reuse(b, changed):
                    out, feats = self._forward(x)
                if not self._checked:
                    out, feats = self._check_reuse(x, out, feats)
            else:
                out, feats = self._forward(x)
            error.update(ref, out, ref_feats, feats)
        return error.values(self.method)

    def _check_reuse(self, x: torch.Tensor, out: torch.Tensor,
                     feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Once: the reused forward pass must give the full pass's output, else reuse is turned off."""
        self._checked = True
        full, full_feats = self._forward(x)
        if torch.allclose(out, full, rtol=1e-4, atol=1e-4 * float(full.abs().max().clamp(min=1.0))):
            return out, feats
        _logger.warning("reusing float sub-module outputs changed the result (max diff %.3g): turned off",
                        float((out - full).abs().max()))
        self.reuse = None
        return full, full_feats

    def baselines(self) -> dict[str, dict[str, float]]:
        """The proxy with full PTQ (every quantizer on); the float baseline is exact by definition."""
        self.prepare()
        quant.enable_all(self.model)
        return {"ptq": self._measure(None)}

    def __call__(self, layer: str) -> dict[str, float]:
        self.prepare()
        quant.quantize_only(self.model, [layer])
        return self._measure(_ancestors(self.model, layer))


# ------------------------------------------------------------------------------------------- data and models
def amax_sha256(model: nn.Module) -> str:
    """A hash of every quantizer's amax (names, shapes and FP32 values): identifies a calibration."""
    digest = hashlib.sha256()
    for name, amax in sorted(quant.quantizer_state(model).items()):
        digest.update(name.encode())
        digest.update(str(tuple(amax.shape)).encode())
        digest.update(amax.contiguous().numpy().tobytes())
    return digest.hexdigest()


def images_sha256(dataset: ImageFolderDataset) -> str:
    """A hash of the images' relative paths and bytes."""
    digest = hashlib.sha256()
    for path in dataset.paths:
        digest.update(path.relative_to(dataset.img_dir).as_posix().encode())
        digest.update(bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


def calibration_loader(data_root: str | Path, img_size: int, batch_size: int, batch_number: int,
                       workers: int = 2) -> torch.utils.data.DataLoader:
    """The first ``batch_size * batch_number`` images of ``data_root`` in sorted order, letterboxed, not shuffled."""
    dataset = ImageFolderDataset(data_root, img_size=img_size, max_images=batch_size * batch_number)
    return create_dataloader(dataset, batch_size, workers=workers, shuffle=False)


def proxy_batches(data_root: str | Path, img_size: int, num_images: int, batch_size: int,
                  workers: int = 2) -> tuple[list[torch.Tensor], ImageFolderDataset]:
    """The first ``num_images`` calibration images (sorted order) as batches; unreadable images left out."""
    dataset = ImageFolderDataset(data_root, img_size=img_size, max_images=num_images)
    batches = []
    for batch in create_dataloader(dataset, batch_size, workers=workers):
        images = batch["image"][torch.as_tensor(batch["ok"], dtype=torch.bool)]
        if len(images):
            batches.append(images)
    if not batches:
        raise InputError(f"none of the first {num_images} images in {data_root} could be read: check the folder")
    return batches, dataset


def calibrated_model(model: nn.Module, *, calib_weights: str | Path | None = None, loader: Any = None,
                     batch_number: int = 1, calib_method: str | None = None, percentile: float = 99.99,
                     device: str | torch.device = "cpu", num_bits: int = 8) -> tuple[nn.Module, dict[str, Any]]:
    """The quantized copy of the deployed float ``model``, calibrated here or loaded from ``calib_weights``.

    Returns (quantized model on ``device``, calibration record: method (+ percentile), source, amax_sha256).

    Raises:
        InputError: ``calib_weights`` belongs to another model, or its method differs from ``calib_method``.
    """
    if calib_method is not None and calib_method not in quant.METHODS:
        raise InputError(f"unknown calibration method {calib_method!r}; choose one of {', '.join(quant.METHODS)}")
    qmodel = quant.quantize_model(model, calib_method=calib_method or "max", num_bits=num_bits)
    if calib_weights is not None:
        quant.load_quantizers(qmodel, calib_weights)
        info = dict(quant.load_calibrated(calib_weights).quant_calib)
        if calib_method is not None and info.get("method") not in (None, calib_method):
            raise InputError(f"--calib-weights {calib_weights} was calibrated with {info.get('method')!r} but "
                             f"--calib-method is {calib_method!r}: drop --calib-method or recalibrate")
        record = {"method": info.get("method", "?"), "source": str(calib_weights)}
        if "percentile" in info:
            record["percentile"] = info["percentile"]
    else:
        if loader is None:
            raise InputError("no calibration data: pass --data-root with calibration images or --calib-weights")
        summary = quant.calibrate(qmodel, loader, batch_number, method=calib_method or "max", percentile=percentile,
                                  device=device)
        record = {k: summary[k] for k in ("method", "percentile") if k in summary}
        record.update(source="calibrated", images=summary["images"], dead_amax=summary["dead_amax"])
    record["amax_sha256"] = amax_sha256(qmodel)
    return qmodel.to(torch.device(device)).eval(), record


def select_layers(model: nn.Module, patterns: Sequence[str] | None = None) -> list[str]:
    """Quantized layer names in model order, restricted to those matching any name or glob in ``patterns``."""
    names = list(quant.quant_layers(model))
    if not patterns:
        return names
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise InputError(f"--layers {unmatched[0]!r} matches no quantized layer; names look like {names[:3]} "
                         f"(globs such as 'detect.*' work)")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(f"must be K/N with 0 <= K < N (e.g. 0/4), got {text!r}")
    return int(match[1]), int(match[2])


def shard_layers(layers: Sequence[str], shard: tuple[int, int] | None) -> list[str]:
    return list(layers) if shard is None else list(layers[shard[0]::shard[1]])


# ---------------------------------------------------------------------------------------------- progress file
def progress_path(output: str | Path, method: str, shard: tuple[int, int] | None = None) -> Path:
    suffix = "" if shard is None else f".shard{shard[0]}of{shard[1]}"
    return Path(output) / f"progress_{method}{suffix}.jsonl"


def make_header(*, model: dict[str, Any], method: str, calibration: dict[str, Any], img_size: int,
                data: dict[str, Any], layer_info: list[dict[str, Any]], shard: tuple[int, int] | None) -> dict:
    """The first line of a progress file: what the results are valid for."""
    calibration = {k: v for k, v in calibration.items() if k in ("method", "percentile", "amax_sha256")}
    layers = [{k: info.get(k) for k in ("name", "type", "weight_shape", "params")} for info in layer_info]
    return {"type": "header", "format": PROGRESS_FORMAT, "version": PROGRESS_VERSION, "model": model,
            "method": check_method(method), "calibration": calibration, "img_size": img_size, "data": data,
            "layers": layers, "shard": list(shard) if shard else None}


_HEADER_FIELDS = ("format", "version", "model", "method", "calibration", "img_size", "data", "layers", "shard")
_FIELD_WORDS = {"model": "model (weights sha256 / config)", "method": "method", "calibration": "calibration",
                "img_size": "image size", "data": "evaluation data", "layers": "layer list", "shard": "shard"}


def _mismatch(saved: dict[str, Any], header: dict[str, Any], fields: Iterable[str]) -> str | None:
    for key in fields:
        if saved.get(key) != header.get(key):
            what = _FIELD_WORDS.get(key, key)
            if key in ("layers",):
                return f"another {what}"
            return f"another {what} ({_short(saved.get(key))} there, {_short(header.get(key))} now)"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def check_progress(path: str | Path, model: dict[str, Any], method: str, resume: bool, overwrite: bool) -> None:
    """Fail fast (before calibrating) on a progress file that is there without --resume, or of another model or
    method; the full header check happens in ProgressFile."""
    path = Path(path)
    if not path.exists():
        return
    if not (resume or overwrite):
        raise InputError(f"{path} exists (an earlier run): pass --resume to continue it or --overwrite to start over")
    if resume:
        saved = read_progress(path)[0]
        problem = _mismatch(saved, {**saved, "model": model, "method": method}, ("model", "method"))
        if problem:
            raise InputError(f"cannot resume {path}: it was written for {problem}; use another --output, or "
                             "--overwrite to start over")


def read_progress(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """(header, records, bytes of intact lines) of a progress file; a torn last line is dropped with a warning.

    Raises:
        InputError: not a progress file, or a damaged line before the last one.
    """
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, good = [], 0
    for number, line in enumerate(lines, 1):
        last = number == len(lines)
        if not line.strip():
            if not last:
                good += len(line) + 1
            continue
        try:
            record = json.loads(line)
            if last:  # no newline after it: written up to the closing brace, but not finished
                raise ValueError("unterminated")
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if last or (number == len(lines) - 1 and not lines[-1]):
                _logger.warning("%s: ignoring an incomplete last line (the run was interrupted while writing it)",
                                path)
                break
            raise InputError(f"{path} is damaged at line {number}; pass --overwrite to start over") from None
        records.append(record)
        good += len(line) + 1
    if not records or records[0].get("type") != "header" or records[0].get("format") != PROGRESS_FORMAT:
        raise InputError(f"{path} is not a sensitivity progress file (no header line); remove it or pass "
                         "--overwrite")
    return records[0], records[1:], good


class ProgressFile:
    """The JSONL progress of one analysis: a header line, then one line per finished layer or baseline.

    Args:
        resume: continue an existing file (its header must equal ``header``); without it an existing file is
            an error unless ``overwrite``.
    """

    def __init__(self, path: str | Path, header: dict[str, Any], resume: bool = False, overwrite: bool = False):
        self.path, self.header = Path(path), header
        self.layers: dict[str, dict[str, Any]] = {}
        self.baselines: dict[str, dict[str, float]] = {}
        exists = self.path.exists()
        if exists and not (resume or overwrite):
            raise InputError(f"{self.path} exists (an earlier run): pass --resume to continue it or --overwrite to "
                             "start over")
        if exists and resume:
            saved, records, good = read_progress(self.path)
            problem = _mismatch(saved, header, _HEADER_FIELDS)
            if problem:
                raise InputError(f"cannot resume {self.path}: it was written for {problem}; use another --output, "
                                 "or --overwrite to start over")
            if good < self.path.stat().st_size:
                with open(self.path, "r+b") as f:  # cut the torn line so that appends start on a fresh line
                    f.truncate(good)
            for record in records:
                self._add(record)
            _logger.info("resuming %s: %d layer(s) done", self.path, len(self.layers))
        else:
            atomic_write_text(self.path, json.dumps(header, sort_keys=True) + "\n")

    def _add(self, record: dict[str, Any]) -> None:
        if record.get("type") == "layer":
            self.layers[record["name"]] = record
        elif record.get("type") == "baseline":
            self.baselines[record["name"]] = record["values"]

    def append(self, record: dict[str, Any]) -> None:
        """Add one record durably: written, flushed and fsync'ed before returning."""
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._add(record)


class MemoryProgress:
    """ProgressFile's interface without a file (benchmarks, library use)."""

    def __init__(self) -> None:
        self.layers: dict[str, dict[str, Any]] = {}
        self.baselines: dict[str, dict[str, float]] = {}

    def append(self, record: dict[str, Any]) -> None:
        if record["type"] == "layer":
            self.layers[record["name"]] = record
        else:
            self.baselines[record["name"]] = record["values"]


# ------------------------------------------------------------------------------------------------- the analysis
def _summary(values: dict[str, float], method: str) -> str:
    return " ".join(f"{col} {_VALUE_FORMAT[method].format(values[col])}" for col in COLUMNS[method])


def analyse(probe: Callable[[str], dict[str, float]], layers: Sequence[str], progress: ProgressFile | MemoryProgress,
            *, method: str, baselines: bool = True, on_layer: Callable[[str, dict[str, Any]], None] | None = None,
            show_progress: bool = True) -> dict[str, dict[str, Any]]:
    """Probe every layer not yet in ``progress`` (in order), appending each result as soon as it is known.

    Args:
        probe: layer name -> metric values (``MapProbe`` / ``ProxyProbe``); with ``baselines`` its ``baselines()``
            is also run once (results stored as baseline records).
        on_layer: called after each layer's record is on disk (name, record).

    Returns:
        Layer name -> record, for ``layers`` (finished earlier or now).
    """
    if baselines and not progress.baselines and hasattr(probe, "baselines"):
        for name, values in probe.baselines().items():
            progress.append({"type": "baseline", "name": name, "values": values})
            _logger.info("baseline %s: %s", name, _summary(values, method))
    todo = [name for name in layers if name not in progress.layers]
    index = {name: i for i, name in enumerate(layers)}
    with logging_redirect_tqdm(), tqdm(total=len(layers), initial=len(layers) - len(todo), unit="layer",
                                       desc=f"sensitivity [{method}]", file=sys.stderr, disable=not show_progress,
                                       dynamic_ncols=True) as bar:
        for name in todo:
            start = time.perf_counter()
            values = probe(name)
            record = {"type": "layer", "name": name, "index": index[name], "values": values,
                      "seconds": round(time.perf_counter() - start, 4)}
            progress.append(record)
            _logger.debug("%s: %s (%.2f s)", name, _summary(values, method), record["seconds"])
            bar.update(1)
            if on_layer is not None:
                on_layer(name, record)
    return {name: progress.layers[name] for name in layers}


# ---------------------------------------------------------------------------------------------------- reports
def sensitivity_order(values: Sequence[float], method: str) -> list[int]:
    """Indices from most to least sensitive; ties keep model order."""
    sign = 1.0 if HIGHER_IS_LESS_SENSITIVE[check_method(method)] else -1.0
    return sorted(range(len(values)), key=lambda i: (sign * values[i], i))


def build_report(header: dict[str, Any], records: dict[str, dict[str, Any]],
                 baselines: dict[str, dict[str, float]], args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rows in model order (name, type, shape, params, values, rank; rank 1 = most sensitive) + run metadata."""
    method = header["method"]
    key = key_column(method)
    rows = []
    for info in header["layers"]:
        record = records[info["name"]]
        rows.append({"name": info["name"], "type": info.get("type"), "shape": info.get("weight_shape"),
                     "params": info.get("params"), **record["values"], "seconds": record.get("seconds")})
    for rank, i in enumerate(sensitivity_order([row[key] for row in rows], method), 1):
        rows[i]["rank"] = rank
    return {"method": method, "metric": key, "higher_is_less_sensitive": HIGHER_IS_LESS_SENSITIVE[method],
            "columns": list(COLUMNS[method]), "model": header["model"], "calibration": header["calibration"],
            "img_size": header["img_size"], "data": header["data"], "baselines": baselines, "layers": rows,
            "args": args or {}}


def format_sensitivity(rows: Sequence[dict[str, Any]], method: str) -> str:
    """The text ranking: ``<layer> <v1> <v2>`` per line in model order, as YOLOv6's quant_sensitivity_save writes
    (mAP50 / mAP50:95, 4 decimals, no header for ``map``); proxy files start with a ``# metric:`` comment."""
    first, second = COLUMNS[method]
    fmt = _VALUE_FORMAT[method]
    lines = []
    if method != "map":
        direction = "higher" if HIGHER_IS_LESS_SENSITIVE[method] else "lower"
        lines.append(f"# metric: {second} ({direction} = less sensitive; columns: layer {first} {second}; "
                     f"ranked by {second})")
    lines += [f"{row['name']} {fmt.format(row[first])} {fmt.format(row[second])}" for row in rows]
    return "\n".join(lines) + "\n"


def parse_sensitivity(text: str, source: str = "sensitivity file") -> tuple[list[tuple[str, float, float]], str]:
    """Rows (layer, value1, value2) in file order and the metric (``mAP50_95`` for header-less seed files)."""
    metric, rows = "mAP50_95", []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            match = _HEADER_RE.match(stripped)
            if match:
                metric = match[1]
            continue
        fields = stripped.split()
        try:
            if len(fields) != 3:
                raise ValueError
            rows.append((fields[0], float(fields[1]), float(fields[2])))
        except ValueError:
            raise InputError(f"{source} line {number}: expected '<layer> <value> <value>', got {stripped[:80]!r}"
                             ) from None
    return rows, metric


def read_sensitivity(path: str | Path) -> tuple[list[tuple[str, float, float]], str]:
    """Read a ranking file written by ``write_reports`` or by YOLOv6's partial_quantization tools."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"sensitivity file {path} not found; write one with sensitivity_analyse.py")
    return parse_sensitivity(path.read_text(), str(path))


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in row.items()})
    return buffer.getvalue()


def _plot(path: Path, report: dict[str, Any]) -> Path:
    """Horizontal bars of the ranking metric, most sensitive at the top (Agg, written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sorted(report["layers"], key=lambda r: r["rank"])
    key = report["metric"]
    fig = Figure(figsize=(10, max(3.0, 0.22 * len(rows) + 1.2)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(range(len(rows)), [r[key] for r in rows], color="tab:red")
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    direction = "higher" if report["higher_is_less_sensitive"] else "lower"
    ax.set_xlabel(f"{key} with only this layer quantized ({direction} = less sensitive)")
    for name, values in report["baselines"].items():
        if key in values:
            ax.axvline(values[key], ls="--", lw=1, color="k" if name == "fp" else "tab:blue", label=name)
    if report["baselines"]:
        ax.legend(loc="lower right")
    ax.set_title(f"quantization sensitivity ({report['method']}), most sensitive first")
    fig.tight_layout()
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, metadata={"Software": None})
    return path


def report_paths(output: str | Path, method: str) -> dict[str, Path]:
    stem = Path(output) / f"sensitivity_{method}"
    return {kind: stem.with_suffix(f".{kind}") for kind in ("txt", "json", "csv", "png")}


def write_reports(output: str | Path, report: dict[str, Any], plot: bool = True) -> dict[str, Path]:
    """Text ranking, JSON, CSV (and a PNG chart) under ``output``, each written atomically."""
    paths = report_paths(output, report["method"])
    atomic_write_text(paths["txt"], format_sensitivity(report["layers"], report["method"]))
    write_json(paths["json"], report)
    atomic_write_text(paths["csv"], _csv_text(report["layers"]))
    if plot:
        _plot(paths["png"], report)
    else:
        paths.pop("png")
    return paths


def format_table(report: dict[str, Any], top: int | None = None) -> str:
    """The layers most sensitive first, as a fixed-width table for humans."""
    method, (first, second) = report["method"], COLUMNS[report["method"]]
    fmt = _VALUE_FORMAT[method]
    rows = sorted(report["layers"], key=lambda r: r["rank"])[:top]
    width = max([len("layer")] + [len(r["name"]) for r in rows])
    lines = [f"{'rank':>4}  {'layer':<{width}}  {first:>14}  {second:>14}  type"]
    lines += [f"{r['rank']:>4}  {r['name']:<{width}}  {fmt.format(r[first]):>14}  {fmt.format(r[second]):>14}  "
              f"{r['type']}" for r in rows]
    for name, values in report["baselines"].items():
        if first in values and second in values:
            lines.append(f"{'':>4}  {'[' + name + ']':<{width}}  {fmt.format(values[first]):>14}  "
                         f"{fmt.format(values[second]):>14}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ shards
def merge_shards(output: str | Path, method: str,
                 model: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict]:
    """Join ``progress_<method>.shardKofN.jsonl`` files: (header, layer records, baselines).

    Raises:
        InputError: no shard files, headers that disagree (or name another ``model``), a missing shard, or layers
            missing / analysed twice.
    """
    output = Path(output)
    pattern = re.compile(rf"progress_{re.escape(method)}\.shard(\d+)of(\d+)\.jsonl$")
    files = sorted((p for p in output.glob(f"progress_{method}.shard*of*.jsonl") if pattern.search(p.name)),
                   key=lambda p: tuple(int(g) for g in pattern.search(p.name).groups()))
    if not files:
        raise InputError(f"no shard progress files progress_{method}.shardKofN.jsonl in {output}: run the shards "
                         "with --shard K/N first")
    reference, records, baselines, seen = None, {}, {}, {}
    for path in files:
        header, lines, _ = read_progress(path)
        if reference is None:
            reference = header
        problem = _mismatch(header, reference, [f for f in _HEADER_FIELDS if f != "shard"])
        if problem or not header.get("shard") or header["shard"][1] != reference["shard"][1]:
            raise InputError(f"cannot merge {path.name} with {files[0].name}: written for "
                             f"{problem or 'another shard count'}")
        if model is not None and header["model"] != model:
            raise InputError(f"{path} was written for another model ({_short(header['model'])}); pass the same "
                             "--weights as the shards")
        seen[header["shard"][0]] = path
        for record in lines:
            if record.get("type") == "layer":
                if record["name"] in records:
                    raise InputError(f"layer {record['name']} was analysed by two shards ({path.name}); remove the "
                                     "duplicate shard file")
                records[record["name"]] = record
            elif record.get("type") == "baseline":
                baselines[record["name"]] = record["values"]
    count = reference["shard"][1]
    missing_shards = [k for k in range(count) if k not in seen]
    if missing_shards:
        raise InputError(f"shard(s) {', '.join(f'{k}/{count}' for k in missing_shards)} missing in {output}: run "
                         "them (with --resume if they started) before --merge")
    names = [info["name"] for info in reference["layers"]]
    missing = [n for n in names if n not in records]
    if missing:
        owners = sorted({names.index(n) % count for n in missing})
        raise InputError(f"{len(missing)} layer(s) not analysed yet (e.g. {missing[0]}) by shard(s) "
                         f"{', '.join(f'{k}/{count}' for k in owners)}: finish them with --resume, then --merge")
    extra = sorted(set(records) - set(names))
    if extra:
        raise InputError(f"shard files hold layers not in the analysis ({extra[:3]}): remove the stray files")
    header = {**reference, "shard": None}
    return header, {n: records[n] for n in names}, baselines


# ------------------------------------------------------------------------------------------- rank agreement
def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values`` (ascending), tied values sharing the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (0 when either side is constant)."""
    if len(a) != len(b):
        raise ValueError(f"sequences differ in length: {len(a)} vs {len(b)}")
    if len(a) < 2:
        return 0.0
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else 0.0


def sensitivity_scores(values: Sequence[float], method: str) -> list[float]:
    """Values turned so that larger = more sensitive, for comparing methods."""
    return [-v for v in values] if HIGHER_IS_LESS_SENSITIVE[check_method(method)] else list(values)


def top_k_overlap(order_a: Sequence[Any], order_b: Sequence[Any], k: int) -> int:
    """How many of the first ``k`` of one ranking are among the first ``k`` of the other."""
    return len(set(order_a[:k]) & set(order_b[:k]))
