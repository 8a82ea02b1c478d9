"""Probes: a layer name in, its sensitivity values out (``map``: COCO mAP; ``sqnr``/``cosine``/``mse``: proxies).

Direction ``single``: the probe quantizes the one layer it is asked about (all others in float); ``revert``: it
returns that one layer to float (all others INT8). Either way it measures the model; ``baselines()`` gives the
float and / or full-PTQ values the per-layer ones are read against.
"""
from __future__ import annotations

import fnmatch
import functools
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from utils.data.coco import CocoDetection
from utils.errors import InputError
from utils.inference.evaluate import evaluate
from utils.inference.output_error import DetectionError, capturing_neck
from utils.inference.runners import TorchRunner
from utils.quant import quantizers as quant
from utils.sensitivity.metrics import PROXY_METHODS, check_direction, detection_values
from utils.sensitivity.reuse import ForwardReuse

_logger = logging.getLogger(__name__)


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



def _ancestors(model: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".")
    return [model] + [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts) + 1)]


def set_probe_state(model: nn.Module, layer: str, direction: str) -> None:
    """single: only ``layer`` INT8; revert: every layer INT8 but ``layer``."""
    if check_direction(direction) == "single":
        quant.quantize_only(model, [layer])
    else:
        quant.float_only(model, [layer])


def split_halves(image_ids: Sequence[int]) -> dict[str, list[int]]:
    """Two interleaved halves of an image list (even / odd positions): for split-half reliability."""
    return {"half_a": list(image_ids[0::2]), "half_b": list(image_ids[1::2])}


def _result(metrics: dict[str, Any]) -> dict[str, float]:
    values = {"mAP50": float(metrics["mAP50"]), "mAP50_95": float(metrics["mAP50_95"])}
    for name, sub in metrics.get("subsets", {}).items():
        values[f"mAP50_95_{name}"] = float(sub["mAP50_95"])
    return values


class MapProbe:
    """COCO mAP with one layer quantized (``single``) or one layer back in float (``revert``), by YOLOv6's
    evaluation recipe (``utils.inference.evaluate.evaluate``). Each value also comes on the two interleaved halves
    of the images (``mAP50_95_half_a`` / ``_half_b``), from the same predictions: the ranking's split-half
    reliability costs no extra inference."""

    method = "map"

    def __init__(self, model: nn.Module, dataset: CocoDetection, batch_size: int = 8, workers: int = 2,
                 device: str | torch.device = "cpu", direction: str = "single"):
        self.model, self.dataset = model, dataset
        self.batch_size, self.workers = batch_size, workers
        self.direction = check_direction(direction)
        self.runner = TorchRunner(model, device)
        self.halves = split_halves(dataset.image_ids)

    def _evaluate(self) -> dict[str, float]:
        return _result(evaluate(self.runner, self.dataset, batch_size=self.batch_size, workers=self.workers,
                                progress=False, subsets=self.halves))

    def baselines(self) -> dict[str, dict[str, float]]:
        """mAP in float (every quantizer off) and with full PTQ (every quantizer on)."""
        quant.disable_all(self.model)
        fp = self._evaluate()
        quant.enable_all(self.model)
        return {"fp": fp, "ptq": self._evaluate()}

    def __call__(self, layer: str) -> dict[str, float]:
        set_probe_state(self.model, layer, self.direction)
        return self._evaluate()


class ProxyProbe:
    """Label-free proxy (``sqnr``, ``cosine`` or ``mse``) of the outputs against the float outputs, with one layer
    quantized (``single``) or one layer back in float (``revert``).

    Forward reuse replays the sub-modules a layer cannot affect from a recorded pass: the float pass (single) or
    the INT8 pass (revert). In the revert direction the probe starts from a partial model (``rebase``: these layers
    float, all others INT8; the fallback search re-ranks on it), set by ``apply_float`` (default: exactly these
    layers float; the search passes one that also re-shares input amax), and ``coupled`` names the layers whose
    quantizers change with a layer's (its sharing group), so that reuse never replays them."""

    def __init__(self, model: nn.Module, batches: Sequence[torch.Tensor], method: str,
                 device: str | torch.device = "cpu", reuse: bool = True, layers: Sequence[str] | None = None,
                 reuse_max_bytes: int = 4 << 30, direction: str = "single",
                 apply_float: Callable[[list[str]], None] | None = None,
                 coupled: Mapping[str, Sequence[str]] | None = None, progress: bool = True):
        if method not in PROXY_METHODS:
            raise InputError(f"unknown proxy {method!r}; choose one of {', '.join(PROXY_METHODS)}")
        if not batches:
            raise InputError("no images for the proxy: pass a calibration folder with images")
        self.direction = check_direction(direction)
        self.base: list[str] = []
        self.progress = progress
        self.coupled = dict(coupled or {})
        self.method, self.device = method, torch.device(device)
        self.model = model.to(self.device).eval()
        self.apply_float = apply_float or functools.partial(quant.float_only, self.model)
        self.batches = [b.to(self.device) for b in batches]
        self.reuse = ForwardReuse(self.model, layers, reuse_max_bytes) if reuse else None
        self._checked = False
        self._refs: list[tuple[torch.Tensor, list[torch.Tensor]]] | None = None

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with capturing_neck(self.model) as captured:
            out = self.model(x)
        return out, (captured[-1] if captured else [])

    @torch.no_grad()
    def prepare(self) -> None:
        """Run the float model once over the images: reference outputs (and recorded calls for reuse)."""
        if self._refs is not None:
            return
        quant.disable_all(self.model)
        refs = []
        record_float = self.reuse is not None and self.direction == "single"
        for x in tqdm(self.batches, desc="float reference", unit="batch", file=sys.stderr, leave=False,
                      disable=not self.progress):
            with capturing_neck(self.model) as captured:
                out = self.reuse.record(x) if record_float else self.model(x)
            refs.append((out, captured[-1] if captured else []))
        self._refs = refs
        self._record_base()

    @torch.no_grad()
    def _record_base(self) -> None:
        if self.reuse is not None and self.direction == "revert":
            self.reuse.clear()
            self.apply_float(list(self.base))
            for x in tqdm(self.batches, desc="INT8 pass to reuse", unit="batch", file=sys.stderr, leave=False,
                          disable=not self.progress):
                self.reuse.record(x)

    def rebase(self, float_layers: Sequence[str]) -> None:
        """Revert direction: probe from the model with ``float_layers`` in float (all others INT8)."""
        if self.direction != "revert":
            raise ValueError("rebase applies to the revert direction")
        self.base = list(float_layers)
        if self._refs is not None:
            self._record_base()

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
        return detection_values(error, self.method)

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
        if self.direction == "revert":
            self.apply_float([*self.base, layer])
        else:
            set_probe_state(self.model, layer, self.direction)
        changed = {id(m): m for name in [layer, *self.coupled.get(layer, ())] for m in _ancestors(self.model, name)}
        return self._measure(list(changed.values()))
