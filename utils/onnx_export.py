"""ONNX export (opset 13, input ``images`` [B,3,H,W], output ``outputs`` [B,N,5+nc]) and ONNX Runtime checks."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from utils.errors import InputError
from utils.fileio import atomic_output

_logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "images", "outputs"
DEFAULT_OPSET = 13


def _simplify(path: Path) -> None:
    import onnx
    import onnxsim

    simplified, ok = onnxsim.simplify(onnx.load(str(path)))
    if ok:
        onnx.save(simplified, str(path))
    else:
        _logger.warning("onnxsim could not validate the simplified model; keeping the unsimplified export")


def export_onnx(model: torch.nn.Module, path: str | Path, img_size: int | tuple[int, int] = 640,
                batch_size: int = 1, dynamic_batch: bool = False, opset: int = DEFAULT_OPSET,
                simplify: bool = True) -> Path:
    """Export ``model`` (eval mode, on its own device) to ONNX; the file appears only when complete.

    ``dynamic_batch`` makes the batch axis symbolic; otherwise it is fixed to ``batch_size``.
    """
    import onnx

    path = Path(path)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    device = next(model.parameters()).device
    dummy = torch.zeros(batch_size, 3, h, w, device=device)
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with atomic_output(path, suffix=".tmp.onnx") as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python values are expected here
        torch.onnx.export(model.eval(), (dummy,), str(tmp), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
                          do_constant_folding=True)
        if simplify:
            _simplify(tmp)
        onnx.checker.check_model(str(tmp))
    _logger.info("exported %s (opset %d, %s batch)", path, opset, "dynamic" if dynamic_batch else batch_size)
    return path


@torch.no_grad()
def onnx_output_diff(onnx_path: str | Path, model: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Largest |ONNX Runtime - PyTorch| on ``images``: ``box`` (pixels), ``score`` and ``max`` over all outputs."""
    from utils.runners import OnnxRuntimeRunner

    expected = model.eval()(images.to(next(model.parameters()).device)).float().cpu()
    actual = OnnxRuntimeRunner(onnx_path)(images)
    if actual.shape != expected.shape:
        raise InputError(f"{onnx_path}: output shape {tuple(actual.shape)} differs from PyTorch's "
                         f"{tuple(expected.shape)}; re-export the model")
    diff = (actual - expected).abs()
    return {"box": float(diff[..., :4].max()), "score": float(diff[..., 4:].max()), "max": float(diff.max())}
