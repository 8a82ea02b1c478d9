"""Partial quantization: which layers stay float, from a sensitivity ranking, three ways.

* ``skip_most_sensitive(order, n)``: the ``n`` most sensitive layers stay float.
* ``quant_boundary_layers(order, k)``: YOLOv6's ``--quant-boundary``. The seed sorts its ranking from least to most
  sensitive and quantizes the entries at indices ``0..k`` *inclusive* (``[:k + 1]``): ``k + 1`` layers run INT8,
  every other layer (also layers the ranking does not list) stays float.
* ``search_target_drop(...)``: add layers to the float set, most sensitive first, re-measuring mAP after each, until
  the drop against float is at most ``target``; then a revert pass re-quantizes every float layer (least sensitive
  first) whose return to INT8 keeps the drop within ``target``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from utils.errors import InputError
from utils.quant import quantizers as quant
from utils.quant.sharing import input_amax, share_input_amax, trace_sharing_groups

_logger = logging.getLogger(__name__)


def check_ranking(order: Sequence[str], model_layers: Sequence[str], source: str = "the sensitivity file") -> None:
    """Every ranked layer must be a quantized layer of the model; unranked model layers are reported."""
    known = set(model_layers)
    unknown = [name for name in order if name not in known]
    if unknown:
        raise InputError(f"{source} names {len(unknown)} layer(s) this model does not have (e.g. {unknown[0]!r}); "
                         f"it was made for another model: run sensitivity_analyse.py on these weights")
    missing = [name for name in model_layers if name not in set(order)]
    if missing:
        _logger.warning("%d quantized layer(s) are not in %s (e.g. %s)", len(missing), source, missing[0])


def skip_most_sensitive(order: Sequence[str], n: int) -> list[str]:
    """The float layers of ``--skip-layers n``: the ``n`` most sensitive."""
    if not 0 <= n <= len(order):
        raise InputError(f"--skip-layers {n} is out of range: the ranking has {len(order)} layers (0..{len(order)})")
    return list(order[:n])


def quant_boundary_layers(order: Sequence[str], k: int, model_layers: Sequence[str]) -> list[str]:
    """The float layers of YOLOv6's ``--quant-boundary k``: all but the ``k + 1`` least sensitive ranked layers."""
    if not 0 <= k < len(order):
        raise InputError(f"--quant-boundary {k} is out of range: with {len(order)} ranked layers it must be "
                         f"0..{len(order) - 1} (indices 0..k of the least-to-most sensitive list are quantized)")
    quantized = set(list(reversed(order))[:k + 1])
    return [name for name in model_layers if name not in quantized]


def search_target_drop(order: Sequence[str], measure: Callable[[list[str]], float], fp_map: float, target: float,
                       max_float: int | None = None, revert: bool = True,
                       on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The smallest float set (greedy, by sensitivity) whose mAP drop against ``fp_map`` is at most ``target``.

    Args:
        order: layers from most to least sensitive.
        measure: mAP of the model with exactly the given layers in float (all others INT8).
        fp_map: the float model's mAP.
        target: the largest allowed drop ``fp_map - mAP`` (>= 0).
        max_float: stop adding after this many float layers (default: the whole ranking).
        revert: run the revert pass.
        on_step: called with every step record as soon as it is measured.

    Returns:
        ``float_layers``, ``map``, ``drop`` and ``steps`` (each: ``action`` ptq/add/keep-float/requantize, ``layer``,
        ``map``, ``drop``, ``float_layers`` count).

    Raises:
        InputError: the drop stays above ``target`` with every allowed layer in float (says the best reached).
    """
    if target < 0:
        raise InputError(f"--target-drop must be >= 0, got {target}")
    limit = len(order) if max_float is None else min(max_float, len(order))
    steps: list[dict[str, Any]] = []

    def record(action: str, layer: str | None, float_set: list[str], value: float) -> float:
        step = {"action": action, "layer": layer, "map": value, "drop": fp_map - value, "float_layers": len(float_set)}
        steps.append(step)
        if on_step is not None:
            on_step(step)
        return value

    float_set: list[str] = []
    current = record("ptq", None, float_set, measure(float_set))
    while fp_map - current > target and len(float_set) < limit:
        float_set.append(order[len(float_set)])
        current = record("add", float_set[-1], float_set, measure(float_set))
    if fp_map - current > target:
        best = min(steps, key=lambda s: s["drop"])
        raise InputError(f"--target-drop {target} is not reachable with at most {limit} float layers: the best drop "
                         f"was {best['drop']:.4f} (mAP {best['map']:.4f}) with {best['float_layers']} float layers; "
                         "allow a larger drop or more float layers (--max-float-layers)")
    if revert:
        float_set, current = revert_pass(float_set, current, measure, fp_map, target, record)
    return {"float_layers": float_set, "map": current, "drop": fp_map - current, "steps": steps}


def revert_pass(float_set: Sequence[str], current: float, measure: Callable[[list[str]], float], fp_map: float,
                target: float, record: Callable[[str, str, list[str], float], Any]) -> tuple[list[str], float]:
    """Try to re-quantize every float layer, latest first, keeping each return to INT8 whose drop stays within
    ``target``; ``record(action, layer, float set, mAP)`` sees every trial. Returns (float set, its mAP)."""
    float_set = list(float_set)
    for layer in reversed(list(float_set)):
        trial = [name for name in float_set if name != layer]
        value = measure(trial)
        if fp_map - value <= target:
            float_set, current = trial, value
            record("requantize", layer, float_set, value)
        else:
            record("keep-float", layer, float_set, value)
    return float_set, current


class PartialModel:
    """A calibrated quantized model whose float set can change; input amax are re-shared after every change.

    Sharing groups come from ``utils.quant.sharing`` (traced once); the calibrated input amax are kept, so each
    float set gets the groups' maxima over its own INT8 layers.
    """

    def __init__(self, qmodel: nn.Module):
        self.model = qmodel
        self.layers = list(quant.quant_layers(qmodel))
        self.groups = trace_sharing_groups(qmodel)
        self.calibrated = input_amax(qmodel)
        self.sharing: list[dict[str, Any]] = []
        self.float_set: list[str] = []

    def set_float(self, layers: Sequence[str]) -> None:
        """Run exactly ``layers`` in float and every other quantized layer INT8."""
        quant.float_only(self.model, layers)
        self.float_set = list(layers)
        self.sharing = share_input_amax(self.model, self.groups, self.calibrated)

    def coupled(self) -> dict[str, list[str]]:
        """Layer -> the other layers of its sharing group (their amax change when it goes float)."""
        return {name: [other for other in group if other != name] for group in self.groups for name in group}

    def counts(self) -> tuple[int, int]:
        """(INT8 layers, quantizable layers)."""
        return quant.count_quantized(self.model)


def choose_float_layers(partial: PartialModel, order: Sequence[str], *, skip_layers: int | None = None,
                        quant_boundary: int | None = None, target_drop: float | None = None,
                        measure: Callable[[list[str]], float] | None = None, fp_map: float | None = None,
                        max_float: int | None = None, revert: bool = True,
                        on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The float set by exactly one of the three rules (the search also returns its steps)."""
    if sum(x is not None for x in (skip_layers, quant_boundary, target_drop)) != 1:
        raise InputError("choose the float layers one way: --skip-layers N, --quant-boundary K or --target-drop D")
    if skip_layers is not None:
        return {"rule": f"skip-layers {skip_layers}", "float_layers": skip_most_sensitive(order, skip_layers)}
    if quant_boundary is not None:
        return {"rule": f"quant-boundary {quant_boundary}",
                "float_layers": quant_boundary_layers(order, quant_boundary, partial.layers)}
    if measure is None or fp_map is None:
        raise ValueError("--target-drop needs measure() and fp_map")
    result = search_target_drop(order, measure, fp_map, target_drop, max_float=max_float, revert=revert,
                                on_step=on_step)
    return {"rule": f"target-drop {target_drop}", **result}
