"""The tools a user would pick instead of this toolkit, driven the way their documentation shows, on our model, data
and evaluation: NNCF (post-training quantization and quantization with accuracy control, ONNX backend) and NVIDIA
ModelOpt (ONNX post-training quantization; PyTorch ``auto_quantize``).

Every peer is optional (``requirements-peers.txt``): ``missing_peers`` says which are not installed, and nothing
here imports a peer before its row runs. Their inputs are ours: the FP32 ONNX we export, the calibration images as
our calibration reads them (first N in sorted order, square letterbox, [0, 1] RGB), the same search set and budget.
"""
from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from utils.data.calibration import calibration_loader
from utils.data.coco import CocoDetection, collate_detection, readable_images
from utils.errors import InputError
from utils.inference.coco_eval import CocoEvaluator
from utils.inference.evaluate import add_batch_detections, class_categories
from utils.inference.postprocess import non_max_suppression
from utils.inference.runners import OnnxRuntimeRunner

_logger = logging.getLogger(__name__)

# peer -> the module its rows import (what requirements-peers.txt installs)
PEER_MODULES = {"nncf": "nncf", "modelopt-onnx": "modelopt.onnx.quantization",
                "modelopt-torch": "modelopt.torch.quantization"}
FLOAT_BITS = 16  # auto_quantize's cost of a layer left unquantized ("do not quantize" counts as 16-bit weights)
PSEUDO_LABEL_CONF = 0.25  # the float model's detections kept as auto_quantize's label-free targets


def missing_peers(peers: Iterable[str] = PEER_MODULES) -> dict[str, str]:
    """peer -> one line saying why it cannot run (not installed, or its import fails), for the peers asked."""
    missing = {}
    for peer in peers:
        try:
            importlib.import_module(PEER_MODULES[peer])
        except Exception as exc:  # noqa: BLE001 - a broken optional install must not stop the other rows
            missing[peer] = (f"{peer} cannot be imported ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}): "
                             "pip install -r requirements-peers.txt")
    return missing


def calibration_images(folder: str | Path, img_size: int, count: int, workers: int = 2) -> np.ndarray:
    """The first ``count`` readable images of ``folder`` as our calibration reads them: [N, 3, S, S] float32."""
    images = torch.cat([readable_images(b) for b in calibration_loader(folder, img_size, count, 1, workers)])
    if not len(images):
        raise InputError(f"none of the first {count} images in {folder} could be read: check the folder")
    return images.numpy().astype(np.float32)


def onnx_input_name(model: Any) -> str:
    """The image input's name of an ONNX ModelProto (initializers are not inputs)."""
    initializers = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in initializers)


# --------------------------------------------------------------------------------------------------------- NNCF
def _nncf_dataset(images: np.ndarray, input_name: str) -> Any:
    import nncf

    return nncf.Dataset([images[i:i + 1] for i in range(len(images))], lambda x: {input_name: x})


def nncf_ptq(model: Any, images: np.ndarray) -> Any:
    """``nncf.quantize`` with its defaults (its patterns keep some subgraphs float; fast bias correction) on all
    ``images``: the quantized ONNX ModelProto."""
    import nncf

    return nncf.quantize(model, _nncf_dataset(images, onnx_input_name(model)), subset_size=len(images))


class OnnxMapValidation:
    """NNCF's ``validation_fn`` for a detector: mAP@.5:.95 of an ONNX ModelProto on images of ``dataset`` (NNCF's data
    items are image indices).

    It returns no per-item values, as NNCF's YOLOv8 example: NNCF then ranks quantizer groups by one-image mAPs,
    calling it once per image of its ranking subset per group (its ONNX backend has no output-based ranking). The
    images are decoded once and the session of the last model is kept; sessions run at ONNX Runtime's default
    optimisation, as NNCF's examples and its own engine do.
    """

    def __init__(self, dataset: CocoDetection, class_names: Sequence[str] | None = None, batch_size: int = 32,
                 conf: float = 0.03, iou: float = 0.65):
        self.dataset, self.class_names, self.batch_size = dataset, class_names, batch_size
        self.conf, self.iou = conf, iou
        self._items: dict[int, dict[str, Any]] = {}
        self._session: tuple[Any, OnnxRuntimeRunner] | None = None  # (model, its runner): the model is kept alive
        self.calls = 0

    def indices(self) -> list[int]:
        return list(range(len(self.dataset)))

    def item(self, index: int) -> dict[str, Any]:
        """Dataset item ``index`` (decoded once)."""
        if index not in self._items:
            self._items[index] = self.dataset[index]
        return self._items[index]

    def _runner(self, model: Any) -> OnnxRuntimeRunner:
        if self._session is None or self._session[0] is not model:
            self._session = (model, OnnxRuntimeRunner(model.SerializeToString(), optimization="all"))
        return self._session[1]

    def __call__(self, model: Any, items: Iterable[int]) -> tuple[float, None]:
        self.calls += 1
        runner, items = self._runner(model), [self.item(int(i)) for i in items]
        evaluator = None
        for start in range(0, len(items), self.batch_size):
            batch = collate_detection(items[start:start + self.batch_size])
            outputs = runner(batch["image"])
            if evaluator is None:
                evaluator = CocoEvaluator(self.dataset.coco, class_categories(outputs.shape[-1] - 5, self.dataset,
                                                                              self.class_names))
            add_batch_detections(evaluator, outputs, batch, self.conf, self.iou)
        metric = 0.0 if evaluator is None or not evaluator.image_ids else float(evaluator.summarize()["mAP50_95"])
        return metric, None


def nncf_accuracy_control(model: Any, images: np.ndarray, validation: OnnxMapValidation, max_drop: float,
                          ranking_images: int | None = None) -> Any:
    """``nncf.quantize_with_accuracy_control``: NNCF's PTQ on ``images``, then quantizer groups returned to float,
    ranked by their one-image mAP drops on NNCF's ranking subset (``ranking_images``; NNCF's default: as many as
    ``images``), until the mAP drop on all ``validation``'s images is at most ``max_drop`` (absolute). The quantized
    ONNX ModelProto."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    return nncf.quantize_with_accuracy_control(
        model, _nncf_dataset(images, onnx_input_name(model)), nncf.Dataset(validation.indices()), validation,
        max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(images),
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(ranking_subset_size=ranking_images))


# ------------------------------------------------------------------------------------------------ ModelOpt ONNX
def modelopt_onnx_ptq(fp32_path: str | Path, images: np.ndarray, output: str | Path, method: str,
                      op_types: Sequence[str] | None = None) -> Path:
    """``modelopt.onnx.quantization.quantize`` INT8 (``method``: max or entropy) calibrated on ``images`` with ONNX
    Runtime's CPU provider; float regions stay FP32 (its default is FP16, which ONNX Runtime on CPU cannot compare
    with our FP32 rows); ``op_types``: its --op_types_to_quantize (None: its defaults)."""
    from modelopt.onnx.quantization import quantize

    quantize(str(fp32_path), quantize_mode="int8", calibration_data=images, calibration_method=method,
             calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=str(output),
             op_types_to_quantize=list(op_types) if op_types else None, log_level="WARNING")
    return Path(output)


# ------------------------------------------------------------------------------------------ ModelOpt auto_quantize
def pseudo_targets(model: nn.Module, batches: Sequence[torch.Tensor], conf: float = PSEUDO_LABEL_CONF,
                   iou: float = 0.65) -> list[torch.Tensor]:
    """The float model's own detections on each batch as training targets [M, 6] (batch index, class, x1, y1, x2,
    y2 in input pixels): a label-free loss whose gradient is not zero at the float model (a distance to the float
    outputs is, so auto_quantize's gradient score would see every layer as insensitive)."""
    targets = []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            rows = [torch.cat([torch.full((len(det), 1), float(i)), det[:, 5:6], det[:, :4]], 1)
                    for i, det in enumerate(non_max_suppression(model(batch), conf_thres=conf, iou_thres=iou))]
            targets.append(torch.cat(rows) if rows else torch.zeros(0, 6))
    return targets


def effective_bits(model: nn.Module, float_layers: Iterable[str]) -> float:
    """auto_quantize's effective bits of ``model`` with ``float_layers`` (conv names) unquantized: the weight-count
    weighted mean of 8 (INT8 convs) and FLOAT_BITS (float ones)."""
    float_layers = set(float_layers)
    sizes = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    unknown = float_layers - set(sizes)
    if unknown:
        raise InputError(f"float layers {sorted(unknown)[:3]} are not convolutions of the model")
    floating = sum(sizes[name] for name in float_layers)
    return (8 * (sum(sizes.values()) - floating) + FLOAT_BITS * floating) / sum(sizes.values())


def modelopt_auto_quantize(model: nn.Module, batches: Sequence[torch.Tensor], bits: float,
                           loss: Callable[[Any, torch.Tensor], tuple[torch.Tensor, Any]],
                           score_batches: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``mtq.auto_quantize`` with INT8 (its INT8_DEFAULT_CFG: per-channel weights, per-tensor max inputs) or float
    per layer under ``bits`` effective bits, its gradient score on ``loss`` (YOLOv6's detection loss: training
    outputs, [M, 6] targets -> (loss, parts)) against the float model's own detections (``pseudo_targets``; no
    labels), calibrated and scored on ``batches``. Returns the quantized model (a deep copy; fake quantization in
    PyTorch) and ``{"int8_layers", "total_layers", "float_layers"}``."""
    import modelopt.torch.quantization as mtq

    model = copy.deepcopy(model).eval()
    targets = {id(batch): t for batch, t in zip(batches, pseudo_targets(model, batches))}

    def forward_step(m: nn.Module, batch: torch.Tensor) -> Any:
        m.train()  # YOLOv6's head gives its training outputs (the loss's input) in train mode; no BN or dropout here
        try:
            return m(batch)
        finally:
            m.eval()

    quantized, _ = mtq.auto_quantize(model, constraints={"effective_bits": bits},
                                     quantization_formats=[mtq.INT8_DEFAULT_CFG], data_loader=list(batches),
                                     forward_step=forward_step,
                                     loss_func=lambda out, batch: loss(out, targets[id(batch)])[0],
                                     num_calib_steps=len(batches), num_score_steps=score_batches or len(batches))
    quantized.eval()
    convs = {name: m for name, m in quantized.named_modules() if isinstance(m, nn.Conv2d)}
    floating = [name for name, m in convs.items()
                if not (getattr(m, "weight_quantizer", None) is not None and m.weight_quantizer.is_enabled)]
    return quantized, {"int8_layers": len(convs) - len(floating), "total_layers": len(convs),
                       "float_layers": floating}
