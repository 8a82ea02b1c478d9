"""Quantizer sharing derived from the model's own data flow, so that TensorRT never has to requantize.

TensorRT runs Concat and MaxPool in INT8 only when every tensor they join carries the same scale, and a tensor read
by several quantized convs is quantized once only when those convs agree on its scale. Which input quantizers must
agree is read from one traced forward pass (no list of layer names): every tensor is a node, a quantized layer's
input quantizer reads one, and ``cat`` (all inputs and the output) and ``max_pool2d`` (input and output) are
scale-preserving, so they join their tensors into one group. Quantizers reading tensors of one group share one amax:
the largest calibrated amax among the group's layers that run INT8.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from utils.quant.calibration import quantizer_state
from utils.quant.quantizers import float_layers, float_pass, quant_layers

_logger = logging.getLogger(__name__)

# torch functions whose output has the scale of their inputs (INT8 in, INT8 out in TensorRT)
_SCALE_PRESERVING = ("cat", "concat", "concatenate", "max_pool2d", "max_pool2d_with_indices")
INPUT_QUANTIZER = "_input_quantizer"


class _UnionFind:
    """Groups of tensors, keyed by id(); the tensors themselves are kept alive so ids are never reused."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self._alive: list[torch.Tensor] = []

    def add(self, tensor: torch.Tensor) -> int:
        key = id(tensor)
        if key not in self.parent:
            self.parent[key] = key
            self._alive.append(tensor)
        return key

    def find(self, key: int) -> int:
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, tensors: Sequence[torch.Tensor]) -> None:
        roots = [self.find(self.add(t)) for t in tensors]
        for root in roots[1:]:
            self.parent[root] = roots[0]


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


class _ScaleFlow(TorchFunctionMode):
    """Joins the inputs and outputs of scale-preserving torch functions while active."""

    def __init__(self, groups: _UnionFind):
        super().__init__()
        self.groups = groups

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "").lstrip("_") in _SCALE_PRESERVING:
            tensors = _tensors(args) + _tensors(list((kwargs or {}).values()))
            outputs = _tensors(out)[:1]  # max_pool2d_with_indices: the values, not the indices
            self.groups.union(tensors + outputs)
        return out


@torch.no_grad()
def trace_sharing_groups(model: nn.Module, img_size: int = 64) -> list[list[str]]:
    """Groups (of two or more) of quantized layers whose input quantizers must share one amax, in model order.

    Args:
        model: a quantized model (``utils.quant.quantizers.quantize_model``); it is not changed.
        img_size: side of the zero image traced through the model (a multiple of its largest stride).
    """
    layers = quant_layers(model)
    flow = _UnionFind()
    reads: dict[str, list[int]] = {name: [] for name in layers}
    handles = []
    for name, layer in layers.items():
        def hook(_module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor, name: str = name) -> None:
            reads[name].append(flow.add(inputs[0]))
            flow.union([inputs[0], output])  # the quantized tensor stands for the one it quantizes
        handles.append(getattr(layer, INPUT_QUANTIZER).register_forward_hook(hook))
    try:
        image = torch.zeros(1, 3, img_size, img_size, device=next(model.parameters()).device)
        with float_pass(model), _ScaleFlow(flow):
            model.eval()(image)
    finally:
        for handle in handles:
            handle.remove()
    by_root: dict[int, list[str]] = {}
    for name, keys in reads.items():
        for root in {flow.find(k) for k in keys}:
            members = by_root.setdefault(root, [])
            if name not in members:
                members.append(name)
    merged = _merge_overlapping([names for names in by_root.values()])
    order = {name: i for i, name in enumerate(layers)}
    groups = [sorted(g, key=order.__getitem__) for g in merged if len(g) > 1]
    return sorted(groups, key=lambda g: order[g[0]])


def _merge_overlapping(groups: list[list[str]]) -> list[set[str]]:
    """A layer whose quantizer reads tensors of two groups (a MaxPool called on several tensors) joins them."""
    merged: list[set[str]] = []
    for group in map(set, groups):
        overlapping = [m for m in merged if m & group]
        for m in overlapping:
            group |= m
            merged.remove(m)
        merged.append(group)
    return merged


def input_amax(model: nn.Module) -> dict[str, torch.Tensor]:
    """The calibrated input amax of every quantized layer (a snapshot to share from, again and again)."""
    state = quantizer_state(model)
    return {name: state[f"{name}.{INPUT_QUANTIZER}"] for name in quant_layers(model)}


@torch.no_grad()
def share_input_amax(model: nn.Module, groups: Sequence[Sequence[str]],
                     calibrated: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Give the INT8 layers of each group the largest of their calibrated input amax (float layers keep theirs).

    ``calibrated`` is the ``input_amax`` snapshot taken before any sharing, so calling this again after the float
    set changed recomputes every group from the calibration, not from an earlier shared value.

    Returns:
        One entry per group with at least one INT8 layer: ``layers`` (INT8 members), ``amax`` and ``raised``
        (members whose amax grew, with the factor).
    """
    layers = quant_layers(model)
    for name, layer in layers.items():  # restore first: groups only ever raise values
        layer.input_quantizer._amax.copy_(calibrated[name].to(layer.input_quantizer._amax))
    report, in_float = [], set(float_layers(model))
    for group in groups:
        active = [name for name in group if name not in in_float]
        if not active:
            continue
        amax = max(float(calibrated[name].max()) for name in active)
        raised = {}
        for name in active:
            quantizer = layers[name].input_quantizer
            before = float(quantizer._amax.max())
            quantizer._amax.fill_(amax)
            if amax > before:
                raised[name] = round(amax / before, 4)
        report.append({"layers": active, "amax": amax, "raised": raised})
    _logger.debug("shared input amax over %d group(s)", len(report))
    return report
