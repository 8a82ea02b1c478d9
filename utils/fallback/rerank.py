"""The fallback search that re-ranks: after each layer goes float, the remaining INT8 layers are ranked again.

The seed adds float layers in one fixed order, measured once on the full-INT8 (or float) model, and pays a full mAP
evaluation after every addition. On a model that INT8 breaks, what each layer costs depends on which others are
already float. Here every step returns to float the INT8 layer whose revert helps the *current* partial model most,
by a label-free proxy (``ProxyProbe`` in the revert direction: head output against float on a few calibration
images, with forward reuse). Re-ranking is lazy: the first step scores every layer, later steps re-score only the
``pool`` best by their last score (a layer's gain rarely grows when others go float).

The order of additions depends on the proxy alone, so mAP is measured only to find where the budget is met:
after 1, 2, 4, 8, ... additions until the drop is within ``target``, then by bisection between the last two
checks; the revert pass then tries to re-quantize each float layer (latest additions first), one mAP each.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from utils.errors import InputError
from utils.fallback.rules import revert_pass
from utils.sensitivity.agreement import sensitivity_scores
from utils.sensitivity.metrics import key_column
from utils.sensitivity.probes import ProxyProbe

_logger = logging.getLogger(__name__)


class GreedyOrder:
    """The proxy-greedy sequence of layers to return to float, extended on demand (``prefix(n)``)."""

    def __init__(self, probe: ProxyProbe, layers: Sequence[str], pool: int = 24,
                 on_step: Callable[[dict[str, Any]], None] | None = None):
        if probe.direction != "revert":
            raise ValueError("re-ranking needs a revert-direction proxy probe")
        self.probe, self.layers, self.pool = probe, list(layers), max(1, pool)
        self._index = {name: i for i, name in enumerate(self.layers)}
        self.key = key_column(probe.method)
        self.sequence: list[str] = []
        self.scores: dict[str, float] = {}
        self.probes = 0
        self.on_step = on_step

    def _gain(self, layer: str) -> float:
        """Larger = returning ``layer`` to float helps the current partial model more."""
        self.probes += 1
        value = self.probe(layer)[self.key]
        return sensitivity_scores([value], self.probe.method, "revert")[0]

    def _next(self) -> str:
        taken = set(self.sequence)
        remaining = [name for name in self.layers if name not in taken]
        if not self.scores:
            candidates = remaining
        else:
            candidates = sorted(remaining, key=lambda n: (-self.scores[n], self._index[n]))[:self.pool]
        for name in candidates:
            self.scores[name] = self._gain(name)
        return max(candidates, key=lambda n: (self.scores[n], -self._index[n]))

    def prefix(self, n: int) -> list[str]:
        """The first ``n`` layers of the sequence (computed as far as needed)."""
        n = min(n, len(self.layers))
        while len(self.sequence) < n:
            self.probe.rebase(self.sequence)
            chosen = self._next()
            self.sequence.append(chosen)
            step = {"action": "rerank", "layer": chosen, "proxy": self.scores[chosen],
                    "float_layers": len(self.sequence), "probes": self.probes}
            _logger.debug("re-rank %d: %s (proxy %.4f)", len(self.sequence), chosen, self.scores[chosen])
            if self.on_step is not None:
                self.on_step(step)
        return self.sequence[:n]


def search_rerank(order: GreedyOrder, measure: Callable[[list[str]], float], fp_map: float, target: float,
                  max_float: int | None = None, revert: bool = True,
                  on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The shortest prefix of the re-ranked sequence within ``target`` of ``fp_map``, then the revert pass.

    Args:
        order: the proxy-greedy sequence (``GreedyOrder``).
        measure: mAP with exactly the given layers float (all others INT8).
        max_float: at most this many float layers (default: all).

    Returns:
        ``float_layers``, ``map``, ``drop``, ``steps`` (the mAP checks: ptq / check / requantize / keep-float),
        ``evaluations`` (mAP measurements) and ``probes`` (proxy measurements).

    Raises:
        InputError: the drop stays above ``target`` with every allowed layer in float.
    """
    if target < 0:
        raise InputError(f"--target-drop must be >= 0, got {target}")
    limit = len(order.layers) if max_float is None else min(max_float, len(order.layers))
    steps: list[dict[str, Any]] = []
    maps: dict[int, float] = {}

    def check(n: int, action: str = "check") -> float:
        if n not in maps:
            layers = order.prefix(n)
            maps[n] = measure(layers)
            record(action, layers[-1] if layers else None, n, maps[n])
        return maps[n]

    def record(action: str, layer: str | None, count: int, value: float) -> None:
        step = {"action": action, "layer": layer, "map": value, "drop": fp_map - value, "float_layers": count}
        steps.append(step)
        if on_step is not None:
            on_step(step)

    low, high = 0, None  # drop above target at `low` float layers; within it at `high`
    if fp_map - check(0, "ptq") <= target:
        high = 0
    n = 1
    while high is None and low < limit:
        n = min(n, limit)
        if fp_map - check(n) <= target:
            high = n
        else:
            low, n = n, n * 2
    if high is None:
        best = min(maps, key=lambda k: (fp_map - maps[k], k))
        raise InputError(f"--target-drop {target} is not reachable with at most {limit} float layers: the best drop "
                         f"was {fp_map - maps[best]:.4f} (mAP {maps[best]:.4f}) with {best} float layers; allow a "
                         "larger drop or more float layers (--max-float-layers)")
    while high - low > 1:
        mid = (low + high) // 2
        if fp_map - check(mid) <= target:
            high = mid
        else:
            low = mid
    float_set, current = order.prefix(high), maps[high]
    if revert:
        float_set, current = revert_pass(float_set, current, measure, fp_map, target,
                                         lambda action, layer, layers, value: record(action, layer, len(layers), value))
    evaluations = len(maps) + (len(order.prefix(high)) if revert else 0)
    return {"float_layers": float_set, "map": current, "drop": fp_map - current, "steps": steps,
            "evaluations": evaluations, "probes": order.probes, "sequence": list(order.sequence)}
