"""Device-correct stand-ins for the two places where pytorch-quantization 2.1.3 calls ``Tensor.cuda`` unconditionally.

1. ``calib.histogram._compute_amax_mse`` (the ``mse`` histogram method) moves the histogram to CUDA.
2. ``TensorQuantizer._load_from_state_dict`` creates a missing ``_amax`` buffer on CUDA unconditionally, so loading a
   calibrated state_dict into a freshly quantized (uncalibrated) model fails without a GPU.

``device_safe()`` swaps in the replacements below for the duration of a ``with`` block and restores the originals in
``finally``; nothing is patched outside it (not thread-safe: calibrate/load from one thread at a time).

Importing this module imports pytorch-quantization, whose ``__init__`` calls absl's ``use_absl_handler()``: that
removes the application's stderr handlers from the root logger, installs absl's own and sets the root level to
WARNING. The import below undoes that; the rest of the project reaches the library through this module (the names
in ``__all__``), so that this guarded import is always the first one.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def _import_library() -> None:
    """Import pytorch-quantization, then give the root logger back its handlers and level."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with warnings.catch_warnings():  # its tensor_quant.py decorates a function with the deprecated jit.script
            warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
            import pytorch_quantization.nn  # noqa: F401 - the import is the point
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


_import_library()

# Everything below comes from the (now imported) library; utils.quant.quantizers and utils.quant.calibration take
# these names from here.
from pytorch_quantization import calib  # noqa: E402
from pytorch_quantization import nn as quant_nn  # noqa: E402
from pytorch_quantization.calib import histogram  # noqa: E402
from pytorch_quantization.nn import TensorQuantizer  # noqa: E402
from pytorch_quantization.tensor_quant import QuantDescriptor, fake_tensor_quant  # noqa: E402

__all__ = ["QuantDescriptor", "TensorQuantizer", "calib", "compute_amax_mse", "device_safe", "histogram", "quant_nn",
           "quiet_library_logs"]

_MSE_CHUNK = 256  # candidate amaxes evaluated at once: bounds memory to 256 x bins floats


def compute_amax_mse(calib_hist: Any, calib_bin_edges: Any, num_bits: int = 8, unsigned: bool = False,
                     stride: int = 1, start_bin: int = 128) -> torch.Tensor | None:
    """The bin centre whose use as amax minimises the histogram-weighted fake-quant MSE (2.1.3's search, on CPU).

    Same candidates (centres ``start_bin``, ``start_bin + stride``, ...), same error and the first minimum, as
    ``histogram._compute_amax_mse``; evaluated in chunks instead of one candidate at a time. Returns None when no
    histogram was collected and the last edge when the histogram has no more than ``start_bin`` bins.
    """
    if calib_hist is None and calib_bin_edges is None:
        return None
    counts = torch.as_tensor(np.asarray(calib_hist), dtype=torch.float32)
    edges = torch.as_tensor(np.asarray(calib_bin_edges), dtype=torch.float32)
    centers = (edges[1:] + edges[:-1]) / 2
    candidates = torch.arange(start_bin, len(centers), stride)
    if len(candidates) == 0:
        return edges[-1].clone()
    mses = []
    for chunk in candidates.split(_MSE_CHUNK):
        amax = centers[chunk].unsqueeze(1)
        quantized = fake_tensor_quant(centers.expand(len(chunk), -1), amax, num_bits, unsigned)
        mses.append(((quantized - centers) ** 2 * counts).mean(dim=1))
    best = int(torch.argmin(torch.cat(mses)))  # argmin returns the first of equal minima, as np.argmin does
    return centers[candidates[best]].clone()


def _amax_loader(original: Any, device: torch.device | None) -> Any:
    """A ``TensorQuantizer._load_from_state_dict`` that creates a missing ``_amax`` on ``device``, not on CUDA."""

    def _load_from_state_dict(self: TensorQuantizer, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        key = prefix + "_amax"
        if key in state_dict and "_amax" not in self._buffers:
            source = state_dict[key]
            self.register_buffer("_amax", torch.empty_like(source, device=device or source.device))
        # the buffer now exists, so 2.1.3's own code only copies into it (nn.Module's loader checks the shape)
        original(self, state_dict, prefix, *args, **kwargs)

    return _load_from_state_dict


@contextlib.contextmanager
def device_safe(device: str | torch.device | None = None) -> Iterator[None]:
    """Within the block, 2.1.3's ``mse`` amax search and ``_amax`` state loading never move tensors to CUDA.

    Args:
        device: where a loaded ``_amax`` that did not exist yet is created; None puts it on the saved tensor's device.
    """
    device = torch.device(device) if device is not None else None
    saved_mse, saved_load = histogram._compute_amax_mse, TensorQuantizer._load_from_state_dict
    histogram._compute_amax_mse = compute_amax_mse
    TensorQuantizer._load_from_state_dict = _amax_loader(saved_load, device)
    try:
        yield
    finally:
        histogram._compute_amax_mse = saved_mse
        TensorQuantizer._load_from_state_dict = saved_load


@contextlib.contextmanager
def quiet_library_logs(level: int = logging.ERROR) -> Iterator[None]:
    """Hold pytorch-quantization's absl messages below ``level`` within the block (it warns once per quantizer)."""
    logger = logging.getLogger("absl")
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)
