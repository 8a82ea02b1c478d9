"""``--calib-method auto``: every candidate amax from one histogram pass, chosen by the error it causes.

Calibrators disagree most on the few layers whose inputs have long tails, and the right clipping differs from layer
to layer: on the real YOLOv6Lite-S full INT8 goes from 0.04 mAP (max) to 0.21 (percentile 99.9). ``auto`` collects
one histogram (and the exact max) per input quantizer, derives every candidate of ``CANDIDATES`` from it, and
chooses among assignments by a label-free criterion measured against the float model on a few calibration images:

* each candidate for every quantizer (what a single calibrator gives), and
* ``per-layer``: for each quantizer, the candidate whose INT8 layer output is closest (MSE) to the float layer's
  output on the float model's own inputs.

The assignment whose full-INT8 head output has the highest SQNR against float (``utils.inference.output_error``:
score and box error of the detections) wins, so ``auto`` is never worse by that measure than the best single
calibrator. Each quantizer's choice and every assignment's score are reported and saved with the calibration.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from utils.inference.output_error import DetectionError
from utils.quant.compat import TensorQuantizer
from utils.quant.quantizers import disable_all, enable_all, layer_quantizers

_logger = logging.getLogger(__name__)

# name -> (histogram method, percentile); "max" is the exact max |x| seen
CANDIDATES: dict[str, tuple[str, float | None]] = {
    "max": ("max", None), "percentile-99.9": ("percentile", 99.9), "percentile-99.99": ("percentile", 99.99),
    "percentile-99.999": ("percentile", 99.999), "entropy": ("entropy", None), "mse": ("mse", None)}
PER_LAYER = "per-layer"
CRITERION = "head output SQNR (dB) against float"


@contextlib.contextmanager
def tracking_max(layers: Mapping[str, nn.Module]) -> Iterator[dict[str, float]]:
    """Within the block, the largest |x| each layer's input quantizer sees (the ``max`` candidate)."""
    maxima: dict[str, float] = {name: 0.0 for name in layers}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            maxima[name] = max(maxima[name], float(args[0].detach().abs().max()))
        return record

    handles = [layer.input_quantizer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        yield maxima
    finally:
        for handle in handles:
            handle.remove()


def candidate_amax(calibrator: Any, max_abs: float, entropy_stride: int = 1) -> dict[str, float]:
    """Every candidate amax of one input quantizer from its histogram calibrator (NaN where it saw nothing)."""
    if getattr(calibrator, "_calib_hist", None) is None:
        return {name: float("nan") for name in CANDIDATES}
    values = {}
    for name, (method, percentile) in CANDIDATES.items():
        if method == "max":
            values[name] = max_abs
        elif method == "percentile":
            values[name] = float(calibrator.compute_amax("percentile", percentile=percentile))
        elif method == "entropy":
            values[name] = float(calibrator.compute_amax("entropy", stride=entropy_stride))
        else:
            values[name] = float(calibrator.compute_amax(method))
    return values


def _set_amax(quantizer: TensorQuantizer, value: float) -> None:
    quantizer.register_buffer("_amax", torch.tensor(value, dtype=torch.float32, device=_device_of(quantizer)))


def _device_of(module: nn.Module) -> torch.device:
    buffer = next(iter(module.buffers()), None)
    return buffer.device if buffer is not None else torch.device("cpu")


def apply_choice(layers: Mapping[str, nn.Module], candidates: Mapping[str, Mapping[str, float]],
                 choice: Mapping[str, str]) -> None:
    """Give each layer's input quantizer its chosen candidate amax."""
    for name, layer in layers.items():
        _set_amax(layer.input_quantizer, candidates[name][choice[name]])


@torch.no_grad()
def _layer_output_errors(model: nn.Module, layers: Mapping[str, nn.Module],
                         candidates: Mapping[str, Mapping[str, float]],
                         images: Sequence[torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per layer and candidate: MSE of the layer's INT8 output (that candidate's input amax, weights INT8) against
    its float output, both on the float model's inputs."""
    errors = {name: {c: 0.0 for c in CANDIDATES} for name in layers}

    def hook(name: str):
        def measure(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            for quantizer in layer_quantizers(module):
                quantizer.enable()
            try:
                for cand, value in candidates[name].items():
                    _set_amax(module.input_quantizer, value)
                    errors[name][cand] += float(torch.mean((module.forward(*args) - output).double() ** 2))
            finally:
                for quantizer in layer_quantizers(module):
                    quantizer.disable()
        return measure

    disable_all(model)
    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        for x in tqdm(images, desc="auto: layer errors", unit="batch", file=sys.stderr, leave=False):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return errors


@torch.no_grad()
def head_sqnr(model: nn.Module, images: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    """Head-output SQNR (dB) of ``model`` as it is against the float outputs ``refs`` on ``images``."""
    error = DetectionError()
    for x, ref in zip(images, refs, strict=True):
        error.update(ref, model(x))
    return error.head("sqnr")


@torch.no_grad()
def choose_amax(model: nn.Module, layers: Mapping[str, nn.Module], candidates: Mapping[str, Mapping[str, float]],
                images: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Score every assignment (each candidate everywhere, and ``per-layer``), apply the best (every quantizer on).

    Args:
        layers: the quantized layers by name (weight amax already set).
        candidates: layer -> candidate name -> input amax (``candidate_amax``, dead / NaN values already replaced
            by a safe amax).
        images: image batches the criterion is measured on.

    Returns:
        ``selected`` (assignment name), ``scores`` (assignment -> head SQNR dB), ``choice`` (layer -> candidate)
        and ``counts`` (candidate -> how many quantizers use it).
    """
    disable_all(model)
    refs = [model(x) for x in images]
    local = _layer_output_errors(model, layers, candidates, images)
    assignments = {c: {name: c for name in layers} for c in CANDIDATES}
    assignments[PER_LAYER] = {name: min(CANDIDATES, key=lambda c, n=name: (local[n][c], c)) for name in layers}
    scores = {}
    enable_all(model)
    for assignment, choice in tqdm(assignments.items(), desc="auto: assignments", unit="try", file=sys.stderr,
                                   leave=False):
        apply_choice(layers, candidates, choice)
        scores[assignment] = round(head_sqnr(model, images, refs), 6)
    selected = max(scores, key=lambda a: (scores[a], a == PER_LAYER))
    choice = assignments[selected]
    apply_choice(layers, candidates, choice)
    counts = {c: sum(1 for v in choice.values() if v == c) for c in CANDIDATES}
    _logger.info("auto calibration: %s (head SQNR %.2f dB; %s)", selected, scores[selected],
                 ", ".join(f"{a} {s:.2f}" for a, s in scores.items()))
    return {"selected": selected, "criterion": CRITERION, "scores": scores, "choice": dict(choice),
            "counts": {c: n for c, n in counts.items() if n}}
