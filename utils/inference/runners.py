"""One inference interface, several back ends: a PyTorch module, an ONNX Runtime session, a TensorRT engine.

A runner takes a float32 batch [B,3,H,W] in [0,1] (any device) and returns the raw predictions [B,N,5+nc] as a
float32 tensor on the CPU: cx, cy, w, h (input pixels), objectness, class scores. The TensorRT runner lives in
utils/inference/tensorrt.py and is imported only for engine files (TensorRT is optional).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from utils.errors import InputError

_logger = logging.getLogger(__name__)

ONNX_SUFFIXES = {".onnx"}
ENGINE_SUFFIXES = {".engine", ".trt", ".plan"}


CLASS_NAMES_KEY = "names"  # ONNX metadata key: the model's class names as a JSON list (written by the export)


def class_names_of(metadata: dict[str, str]) -> list[str] | None:
    """Class names from an ONNX model's metadata (None when absent or not a JSON list of names)."""
    try:
        names = json.loads(metadata.get(CLASS_NAMES_KEY, "null"))
    except ValueError:
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


class Runner(Protocol):
    name: str
    input_hw: tuple[int, int] | None  # fixed input size the back end needs, None if any multiple of 32 works

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class TorchRunner:
    """Runs an nn.Module on a device, optionally in FP16. Never mutates the caller's model."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu", half: bool = False):
        self.device = torch.device(device)
        if half and self.device.type != "cuda":
            raise InputError("--half runs the model in FP16, which needs a CUDA device; drop --half with --device cpu")
        model = copy.deepcopy(model) if half else model
        self.model = model.to(self.device).eval()
        if half:
            self.model.half()
        self.half, self.name, self.input_hw = half, "pytorch" + (" fp16" if half else ""), None
        config = getattr(model, "config", None)
        names = config.get("names") if isinstance(config, dict) else None
        self.class_names: list[str] | None = [str(n) for n in names] if names else None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        out = self.model(images.half() if self.half else images)
        return out.float().cpu()


# ONNX Runtime graph optimisation levels. "basic" folds constants and removes redundant nodes but leaves every Q/DQ
# pair where the export put it, so a Q/DQ model runs as the graph says (quantize, dequantize, float ops): that checks
# the export. "all" (ORT's default) also removes or moves Q/DQ pairs and fuses activations into convolutions, another
# rounding that is neither PyTorch's fake quantization nor TensorRT's (on the real YOLOv6Lite-S partial models, 9 of
# 142 QuantizeLinear nodes go, and mAP moves by up to 0.008 between the two levels: that model is that sensitive to
# which of two equally valid INT8 roundings runs).
ORT_LEVELS = ("basic", "all")


class OnnxRuntimeRunner:
    """Runs an ONNX model on ONNX Runtime (CPU, or CUDA where the GPU build is installed)."""

    def __init__(self, path: str | Path | bytes, device: torch.device | str = "cpu", optimization: str = "all"):
        """``path``: an ONNX file, or a serialized model (``ModelProto.SerializeToString()``)."""
        import onnxruntime as ort  # lazy: only ONNX users pay the import

        if optimization not in ORT_LEVELS:
            raise InputError(f"unknown ONNX Runtime optimisation level {optimization!r}; choose one of "
                             f"{', '.join(ORT_LEVELS)}")
        source = path if isinstance(path, bytes) else str(Path(path))
        path = "the in-memory ONNX model" if isinstance(path, bytes) else Path(path)
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimization == "basic"
                                            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        try:
            self.session = ort.InferenceSession(source, sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for any bad model file
            raise InputError(f"{path} could not be loaded by ONNX Runtime ({str(exc).splitlines()[0][:200]}); "
                             "check that it is a complete ONNX model") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise InputError(f"{path}: expected one 4-D image input, found {[i.shape for i in inputs]}")
        self.input_name = inputs[0].name
        batch, _, h, w = inputs[0].shape
        self.fixed_batch = batch if isinstance(batch, int) else None
        self.input_hw = (h, w) if isinstance(h, int) and isinstance(w, int) else None
        self.name = f"onnxruntime ({providers[0]}{', basic optimisation' if optimization == 'basic' else ''})"
        self.class_names = class_names_of(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().float().cpu().numpy()
        step = self.fixed_batch or len(array)
        outputs = []
        for start in range(0, len(array), step):
            chunk = array[start:start + step]
            pad = step - len(chunk)  # a fixed-batch model needs full batches: pad the last one and drop the extra
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            out = self.session.run(None, {self.input_name: chunk})[0]
            outputs.append(out[:step - pad])
        return torch.from_numpy(np.concatenate(outputs)).float()


def create_runner(weights: str | Path, device: torch.device | str = "cpu", half: bool = False,
                  ort_optimization: str = "all") -> Runner:
    """The runner for a weights file, chosen by its suffix.

    .onnx -> ONNX Runtime; .engine/.trt/.plan -> TensorRT (needs the ``tensorrt`` package and a CUDA ``device``);
    anything else -> a PyTorch checkpoint (``half`` runs it in FP16).
    """
    from models import load_model  # here, not at import time: utils must not need models to import

    path = Path(weights)
    if not path.is_file():
        raise InputError(f"weights file {path} not found; pass --weights with a .pt checkpoint or an .onnx model")
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        if half:
            raise InputError("--half applies to PyTorch checkpoints; an ONNX model runs in the precision it was "
                             "exported with")
        return OnnxRuntimeRunner(path, device, ort_optimization)
    if suffix in ENGINE_SUFFIXES:
        if half:
            raise InputError("--half applies to PyTorch checkpoints; a TensorRT engine runs in the precision it was "
                             "built with: drop --half")
        from utils.inference.tensorrt import TensorRTRunner  # lazy: TensorRT is optional

        return TensorRTRunner(path, device)
    return TorchRunner(load_model(path, deploy=True, device="cpu"), device, half)
