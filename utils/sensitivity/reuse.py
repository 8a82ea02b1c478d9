"""Forward reuse: while one layer is quantized, sub-modules it cannot affect return their recorded float outputs.

Probing re-runs only what a layer changes, so a head layer costs a fraction of a forward pass.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from utils.quant.compat import TensorQuantizer
from utils.quant.quantizers import QUANT_TYPES, quant_layers

_logger = logging.getLogger(__name__)


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
        layers = list(quant_layers(model)) if layers is None else list(layers)
        self.modules = [m for name, m in model.named_modules() if name and not isinstance(m, TensorQuantizer)]
        self.recorded = {id(m) for name, m in model.named_modules() if name and self._useful(name, m, layers)}
        self.records: list[dict[int, list[tuple[list[Any], Any]]] | None] = []
        self.max_bytes, self.bytes = max_bytes, 0

    @staticmethod
    def _useful(name: str, module: nn.Module, layers: list[str]) -> bool:
        if isinstance(module, TensorQuantizer):
            return False
        if not isinstance(module, QUANT_TYPES) and not any(True for _ in module.children()) \
                and not any(True for _ in module.parameters(recurse=False)):
            return False
        parent = name.rpartition(".")[0]
        return any((not parent or n.startswith(parent + ".")) and n != name and not n.startswith(name + ".")
                   for n in layers)

    def clear(self) -> None:
        """Forget every recorded batch (the model's state changed: record again)."""
        self.records, self.bytes = [], 0

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
