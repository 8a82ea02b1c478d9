"""Input equalization: what one per-tensor activation scale cannot hold, moved into the per-channel weight scales.

TensorRT quantizes activations with one scale per tensor and weights with one scale per output channel. When the
input channels of a conv differ widely in range (the depthwise convs after hardswish of YOLOv6Lite: 12-25x), the
small channels get a few INT8 levels. For a conv ``y = W * x`` and any positive per-input-channel ``s``:

    y = (W . s) * (x / s)

so the float function is unchanged when input channel ``c`` is divided by ``s_c`` and the weights that read it
are multiplied by ``s_c``. With ``s_c = a_c / max(a)`` (``a_c``: the channel's range on calibration images) a
per-tensor quantizer on ``x / s`` quantizes every channel at its own range; a depthwise conv's weights absorb
``s_c`` exactly (each output channel reads one input channel, and weights are quantized per output channel). For
a regular conv the weights of one output channel then hold several ``s_c``, so SmoothQuant's migration strength
``alpha`` trades the two: ``s_c = a_c^alpha / w_c^(1 - alpha)`` (``w_c``: max |W| over what reads channel c).

Where ``1/s_c`` lives: when the input is produced by a conv whose output only passes through a positively
homogeneous activation (none, ReLU) and is read by this conv alone, ``1/s_c`` is folded into that conv's output
channels (weights and bias): no extra operation. Otherwise (hardswish, SiLU, a Concat, a tensor with several
readers) the conv becomes an ``EqualizedQuantConv2d``, which multiplies its input by ``1/s`` right before the
input quantizer: in ONNX a ``Mul`` by a per-channel constant feeding the ``QuantizeLinear``, on this conv's path
only (other readers of the tensor see it unscaled). The transform is recorded (``transform_record``) so that a
calibrated checkpoint rebuilds the same model.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from utils.data.coco import readable_images
from utils.errors import InputError
from utils.quant.compat import quant_nn
from utils.quant.quantizers import float_pass, quant_layers, set_bias_shift

_logger = logging.getLogger(__name__)

KINDS = ("depthwise", "conv")  # what --equalize selects: depthwise convs, every other conv
CHOICES = ("none", "depthwise", "all", "auto")  # the user-facing settings; auto picks by head SQNR
_BINS = 2048  # per-channel histogram bins for percentile ranges
RANGE_PERCENTILE = 100.0  # default channel range: the max (best on COCO train of the grid in README)
MIN_SCALE = 1e-3  # s_c floor: a channel is never amplified more than 1000x (FP16 engines keep the constants)
_HOMOGENEOUS = ("relu",)  # f(x / s) = f(x) / s for s > 0: 1/s folds through these into the producing conv


class EqualizedQuantConv2d(quant_nn.QuantConv2d):
    """A QuantConv2d whose input is multiplied per channel by ``input_scale`` ([1, C, 1, 1], = 1/s) first."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - pytorch-quantization's name
        return super().forward(input * self.input_scale)


def equalized_layers(model: nn.Module) -> dict[str, EqualizedQuantConv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, EqualizedQuantConv2d)}


def layer_kind(layer: nn.Module) -> str | None:
    """``depthwise`` (one input channel per output channel), ``conv`` (any other Conv2d) or None (not equalizable:
    ConvTranspose, MaxPool)."""
    if type(layer) not in (quant_nn.QuantConv2d, EqualizedQuantConv2d):
        return None
    return "depthwise" if layer.groups == layer.in_channels == layer.out_channels and layer.groups > 1 else "conv"


def kinds_of(setting: str) -> tuple[str, ...]:
    """The layer kinds a ``--equalize`` setting names (``auto`` is resolved by the caller)."""
    if setting not in CHOICES:
        raise InputError(f"unknown --equalize {setting!r}; choose one of {', '.join(CHOICES)}")
    return {"none": (), "depthwise": ("depthwise",), "all": KINDS}.get(setting, ())


# ---------------------------------------------------------------------------------------------- statistics
def _per_channel_abs(x: torch.Tensor) -> torch.Tensor:
    """|x| as [C, everything else]."""
    return x.detach().abs().transpose(0, 1).reshape(x.shape[1], -1).float()


def _layer_inputs(model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[torch.Tensor],
                  on_input: Any, desc: str) -> None:
    """Run ``batches`` through the float model and call ``on_input(name, x)`` with every layer's (unscaled) input."""
    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            on_input(name, args[0])
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        with float_pass(model), torch.no_grad():
            for x in tqdm(batches, desc=desc, unit="batch", file=sys.stderr, leave=False):
                model(x)
    finally:
        for handle in handles:
            handle.remove()


def channel_ranges(model: nn.Module, layers: Mapping[str, nn.Module], batches: Sequence[torch.Tensor],
                   percentile: float = RANGE_PERCENTILE) -> dict[str, torch.Tensor]:
    """Per input channel of each layer, the ``percentile`` of |x| over the float model's inputs on ``batches``
    (100: the max). Percentiles come from a per-channel histogram of ``_BINS`` bins over [0, max]."""
    maxima: dict[str, torch.Tensor] = {}

    def track_max(name: str, x: torch.Tensor) -> None:
        m = _per_channel_abs(x).amax(dim=1)
        maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)

    _layer_inputs(model, layers, batches, track_max, "equalize: ranges")
    if percentile >= 100:
        return {name: m.cpu() for name, m in maxima.items()}
    counts: dict[str, torch.Tensor] = {}

    def histogram(name: str, x: torch.Tensor) -> None:
        values = _per_channel_abs(x)
        top = maxima[name].clamp_min(1e-12)[:, None]
        bins = (values / top * _BINS).long().clamp_(max=_BINS - 1)
        bins += torch.arange(values.shape[0], device=bins.device)[:, None] * _BINS
        found = torch.bincount(bins.flatten(), minlength=values.shape[0] * _BINS).view(-1, _BINS)
        counts[name] = found if name not in counts else counts[name] + found

    _layer_inputs(model, layers, batches, histogram, "equalize: percentiles")
    ranges = {}
    for name, hist in counts.items():
        cdf = hist.cumsum(dim=1).double()
        needed = cdf[:, -1:] * (percentile / 100.0)
        edge = (cdf < needed).sum(dim=1).clamp(max=_BINS - 1)  # first bin whose cumulative count reaches it
        ranges[name] = ((edge + 1).double() / _BINS * maxima[name].double()).float().cpu()
    return ranges


# -------------------------------------------------------------------------------------------------- scales
def _weight_by_input_channel(layer: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """``s`` (one value per input channel) laid out over the weight [out, in/groups, kh, kw] of a grouped conv."""
    out_ch, in_per_group = layer.weight.shape[:2]
    groups = layer.groups
    per_group = s.view(groups, 1, in_per_group).expand(groups, out_ch // groups, in_per_group)
    return per_group.reshape(out_ch, in_per_group, 1, 1)


def _weight_range_per_input(layer: nn.Module) -> torch.Tensor:
    """max |W| over everything that reads each input channel (for grouped convs: that group's output channels)."""
    w = layer.weight.detach().abs().amax(dim=(2, 3))  # [out, in/groups]
    groups = layer.groups
    return w.view(groups, -1, w.shape[1]).amax(dim=1).reshape(-1)


def equalization_scale(layer: nn.Module, ranges: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s`` per input channel (max 1, floor MIN_SCALE): depthwise ``(a_c / max a)^alpha``; other convs
    SmoothQuant's ``a_c^alpha / w_c^(1-alpha)`` normalised to max 1. Dead channels (a_c = 0) keep s = 1."""
    a = ranges.double().to(layer.weight.device)
    if layer_kind(layer) == "depthwise":
        s = a.pow(alpha)
    else:
        w = _weight_range_per_input(layer).double().clamp_min(1e-12)
        s = a.pow(alpha) / w.pow(1.0 - alpha)
    live = a > 0
    if not live.any():
        return torch.ones_like(a, dtype=torch.float32)
    s = s / s[live].max()
    s = torch.where(live, s.clamp(min=MIN_SCALE), torch.ones_like(s))
    return s.float()


# ----------------------------------------------------------------------------------------- folding into producers
class _DataFlow(TorchFunctionMode):
    """Which call produced each tensor and how often each tensor is read, for one forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.producer: dict[int, tuple[str, tuple[Any, ...]]] = {}
        self.reads: dict[int, int] = {}
        self._alive: list[Any] = []  # keep tensors alive: ids are never reused within the pass

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "").strip("_")
        inputs = [t for t in itertools.chain(args, (kwargs or {}).values()) if isinstance(t, torch.Tensor)]
        for item in itertools.chain(args, (kwargs or {}).values()):
            if isinstance(item, (list, tuple)):
                inputs += [t for t in item if isinstance(t, torch.Tensor)]
        for t in inputs:
            self.reads[id(t)] = self.reads.get(id(t), 0) + 1
        outputs = [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)] \
            if isinstance(out, (list, tuple)) else []
        for t in outputs:
            self.producer[id(t)] = (name, args)
        self._alive += inputs + outputs
        return out


def foldable_producers(model: nn.Module, layers: Iterable[str], img_size: int = 64) -> dict[str, str]:
    """For each named layer whose input is ``act(conv_P(z))`` with ``act`` none or ReLU, the conv output read only by
    ``act`` and the input read only by this layer: the path of ``conv_P`` (where ``1/s`` can be folded exactly)."""
    names = list(layers)
    all_layers = quant_layers(model)
    param_owner = {id(m.weight): n for n, m in model.named_modules() if type(m) in (quant_nn.QuantConv2d,
                                                                                    EqualizedQuantConv2d, nn.Conv2d)}
    read_by: dict[str, int] = {}
    flow = _DataFlow()

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            read_by[name] = id(args[0])
            flow._alive.append(args[0])
        return record

    handles = [all_layers[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        first = next(m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd))  # image channels
        image = torch.zeros(1, first.in_channels, img_size, img_size, device=first.weight.device,
                            dtype=first.weight.dtype)
        with float_pass(model), torch.no_grad(), flow:
            model.eval()(image)
    finally:
        for handle in handles:
            handle.remove()
    found = {}
    for name in names:
        tensor = read_by.get(name)
        if tensor is None or flow.reads.get(tensor, 0) != 1 or tensor not in flow.producer:
            continue
        func, args = flow.producer[tensor]
        if func in _HOMOGENEOUS:
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if source is None or flow.reads.get(id(source), 0) != 1 or id(source) not in flow.producer:
                continue
            func, args = flow.producer[id(source)]
        if func == "conv2d" and len(args) > 1 and id(args[1]) in param_owner and param_owner[id(args[1])] != name:
            found[name] = param_owner[id(args[1])]
    return found


# ------------------------------------------------------------------------------------------------ applying
def _to_equalized(layer: quant_nn.QuantConv2d, inverse: torch.Tensor) -> None:
    """Turn ``layer`` into an EqualizedQuantConv2d multiplying its input by ``inverse`` (same parameters and
    quantizers; the buffer is not persistent: checkpoints keep the scales in their transform record)."""
    layer.__class__ = EqualizedQuantConv2d
    layer.register_buffer("input_scale", inverse.view(1, -1, 1, 1).to(layer.weight), persistent=False)


@torch.no_grad()
def apply_scales(model: nn.Module, scales: Mapping[str, torch.Tensor], folded: Mapping[str, str],
                 weights: bool = True) -> None:
    """Divide each named layer's input by ``s`` (folded into its producer when ``folded`` names one, else an explicit
    multiply) and, when ``weights``, multiply the weights reading it by ``s``. ``weights=False`` attaches only the
    explicit multiplies, for weights saved after the transform."""
    layers = quant_layers(model)
    for name, s in scales.items():
        layer = layers[name]
        s = s.to(layer.weight)
        if weights:
            layer.weight.mul_(_weight_by_input_channel(layer, s))
        producer = folded.get(name)
        if producer is None:
            _to_equalized(layer, 1.0 / s)
        elif weights:
            conv = model.get_submodule(producer)
            conv.weight.div_(s.view(-1, *([1] * (conv.weight.dim() - 1))))
            if conv.bias is not None:
                conv.bias.div_(s)


def equalize(model: nn.Module, batches: Sequence[torch.Tensor], kinds: Sequence[str], alpha: float = 1.0,
             percentile: float = RANGE_PERCENTILE, fold: bool = True) -> dict[str, Any]:
    """Equalize the inputs of the quantized ``model``'s convs of ``kinds`` (in place, before calibration) from
    per-channel ranges on ``batches``; the float function is unchanged. Returns the transform record, also kept as
    ``model.quant_transform["equalize"]``.

    Args:
        kinds: any of KINDS (``depthwise``; ``conv``: every other Conv2d).
        alpha: migration strength in [0, 1] (1: all of the input's imbalance into the weights).
        percentile: the per-channel range statistic (100: max).
        fold: fold 1/s into a homogeneous producing conv where the graph allows (else always a multiply).
    """
    check_settings(kinds, alpha, percentile)
    if equalized_layers(model) or getattr(model, "quant_transform", {}).get("equalize"):
        raise InputError("the model is already equalized: equalize the freshly quantized model once")
    layers = {n: m for n, m in quant_layers(model).items() if layer_kind(m) in kinds}
    if not layers:
        record = {"kinds": list(kinds), "alpha": alpha, "percentile": percentile, "scales": {}, "folded": {}}
        model.quant_transform = {**getattr(model, "quant_transform", {}), "equalize": record}
        return record
    ranges = channel_ranges(model, layers, batches, percentile)
    scales = {name: equalization_scale(layer, ranges[name], alpha) for name, layer in layers.items()}
    folded = foldable_producers(model, layers, img_size=2 * getattr(model, "max_stride", 32)) if fold else {}
    apply_scales(model, scales, folded)
    record = {"kinds": list(kinds), "alpha": float(alpha), "percentile": float(percentile),
              "scales": {n: s.cpu() for n, s in scales.items()}, "folded": dict(folded)}
    model.quant_transform = {**getattr(model, "quant_transform", {}), "equalize": record}
    spread = [float(s.max() / s.min()) for s in scales.values()]
    _logger.info("equalized %d layer inputs (%s; %d folded into their producer, %d as a multiply; channel ranges "
                 "differed up to %.1fx)", len(scales), ", ".join(kinds), len(folded), len(scales) - len(folded),
                 max(spread))
    return record


def check_settings(kinds: Sequence[str], alpha: float, percentile: float) -> None:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise InputError(f"unknown layer kind(s) {unknown} to equalize; choose from {', '.join(KINDS)}")
    if not 0 <= alpha <= 1:
        raise InputError(f"--equalize-alpha must be in [0, 1], got {alpha}: 1 moves all of the input's imbalance "
                         "into the weights")
    if not 0 < percentile <= 100:
        raise InputError(f"--equalize-percentile must be in (0, 100], got {percentile}: e.g. 99.99, or 100 for max")


# ------------------------------------------------------------------------------------------------ bias correction
@torch.no_grad()
def correct_bias(model: nn.Module, batches: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fast (per-layer) empirical bias correction: for every INT8 conv with a bias, the mean per output channel of
    (its fake-quant output - its float output) on its float input over ``batches``, subtracted from the bias while
    the layer runs INT8 (a layer later kept float gets its float bias back). Returns the shifts subtracted, also
    kept as ``model.quant_transform["bias_correction"]``.

    Each layer's own quantization error is measured on the float model's activations (as NNCF's fast bias
    correction does; Nagel et al. 2019 correct sequentially on the quantized model's own activations).
    """
    layers = {n: m for n, m in quant_layers(model).items()
              if getattr(m, "bias", None) is not None and not m.input_quantizer._disabled
              and not m.weight_quantizer._disabled}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def measure(name: str, layer: nn.Module, x: torch.Tensor, output: torch.Tensor) -> None:
        for q in (layer.input_quantizer, layer.weight_quantizer):
            q.enable()
        quantized = type(layer).forward(layer, x)  # the forward itself: no hooks re-entered
        for q in (layer.input_quantizer, layer.weight_quantizer):
            q.disable()
        diff = (quantized - output).transpose(0, 1).reshape(output.shape[1], -1)
        sums[name] = diff.double().sum(dim=1) + sums.get(name, 0)
        counts[name] = counts.get(name, 0) + diff.shape[1]

    def hook(name: str):
        return lambda module, args, output: measure(name, module, args[0], output)

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        with float_pass(model):
            for x in tqdm(batches, desc="bias correction", unit="batch", file=sys.stderr, leave=False):
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    shifts = {name: (sums[name] / counts[name]).float().cpu() for name in sums}
    apply_bias_shifts(model, shifts)
    model.quant_transform = {**getattr(model, "quant_transform", {}), "bias_correction": shifts}
    largest = max((float(s.abs().max()) for s in shifts.values()), default=0.0)
    _logger.info("bias correction: %d layers, largest shift %.4g", len(shifts), largest)
    return shifts


def apply_bias_shifts(model: nn.Module, shifts: Mapping[str, torch.Tensor]) -> None:
    """Each named layer subtracts its shift from its bias while it runs INT8 (quantizers.set_bias_shift)."""
    layers = quant_layers(model)
    for name, shift in shifts.items():
        set_bias_shift(layers[name], shift)


# ------------------------------------------------------------------------------------------------ records
def transform_record(model: nn.Module) -> dict[str, Any]:
    """What a calibrated checkpoint keeps of the model's transform (empty when it has none)."""
    return dict(getattr(model, "quant_transform", {}) or {})


def apply_transform(model: nn.Module, record: Mapping[str, Any], weights: bool = True) -> None:
    """Rebuild a recorded transform on a freshly quantized model: with ``weights`` from the original deployed
    weights (scales applied to them), without from weights saved after the transform (only the explicit multiplies
    attached). Bias shifts are attached either way: files keep float biases (calibration.save_calibrated).

    Raises:
        InputError: the record names layers this model does not have.
    """
    if not record:
        return
    layers = quant_layers(model)
    eq = record.get("equalize") or {}
    shifts = record.get("bias_correction") or {}
    unknown = [n for n in [*eq.get("scales", {}), *eq.get("folded", {}).values(), *shifts] if n not in
               dict(model.named_modules())]
    wrong = [n for n, s in eq.get("scales", {}).items() if n in layers and s.numel() != layers[n].in_channels]
    if unknown or wrong:
        raise InputError(f"the file's equalization / bias correction was made for another model: "
                         f"{(unknown + wrong)[:3]} do not fit this model's layers; calibrate this model")
    apply_scales(model, eq.get("scales", {}), eq.get("folded", {}), weights=weights)
    apply_bias_shifts(model, shifts)
    model.quant_transform = dict(record)


def describe(record: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-friendly summary of a transform record, for reports."""
    out: dict[str, Any] = {}
    eq = record.get("equalize")
    if eq:
        scales = eq.get("scales", {})
        out["equalize"] = {"kinds": eq.get("kinds"), "alpha": eq.get("alpha"), "percentile": eq.get("percentile"),
                           "layers": len(scales), "folded": len(eq.get("folded", {})),
                           "multiplies": len(scales) - len(eq.get("folded", {})),
                           "max_channel_spread": round(max((float(s.max() / s.min()) for s in scales.values()),
                                                           default=1.0), 2)}
        if "selected_by" in eq:
            out["equalize"]["selected_by"] = eq["selected_by"]
    if record.get("bias_correction"):
        out["bias_correction"] = {"layers": len(record["bias_correction"])}
    return out


def calibration_batches(loader: Iterable[Any], num_batches: int, device: torch.device) -> list[torch.Tensor]:
    """The readable images of the first ``num_batches`` batches of ``loader`` on ``device``."""
    batches = []
    for batch in itertools.islice(loader, num_batches):
        x = readable_images(batch)
        if len(x):
            batches.append(x.to(device))
    return batches


# ------------------------------------------------------------------------------------- settings of the scripts
@dataclasses.dataclass(frozen=True)
class TransformSettings:
    """What happens to the quantized model around calibration: input equalization (``equalize``: none, depthwise,
    all or auto; ``alpha``, ``percentile``: ``equalize``) before it, bias correction after it."""

    equalize: str = "none"
    alpha: float = 1.0
    percentile: float = RANGE_PERCENTILE
    bias_correction: bool = False
    auto_images: int = 16  # equalize=auto: images its head-SQNR criterion is measured on

    def __post_init__(self) -> None:
        kinds_of(self.equalize)
        check_settings((), self.alpha, self.percentile)

    @property
    def active(self) -> bool:
        return self.equalize != "none" or self.bias_correction

    @classmethod
    def from_args(cls, args: Any) -> TransformSettings:
        return cls(args.equalize, args.equalize_alpha, args.equalize_percentile, args.bias_correction)


def add_transform_arguments(group: Any) -> None:
    """The --equalize / --bias-correction options of every script that calibrates."""
    group.add_argument("--equalize", choices=CHOICES, default="none",
                       help="before calibration, move each channel's input range into the conv's per-channel weight "
                            "scales (float outputs unchanged): depthwise convs, all convs (SmoothQuant-style), or "
                            "auto (the one of none / depthwise / all whose full-INT8 head output is closest to "
                            "float; calibrates three times). Recorded in calibrated.pt")
    group.add_argument("--equalize-alpha", type=float, default=1.0, metavar="A",
                       help="migration strength in [0, 1]: 1 moves all of the input's channel imbalance into the "
                            "weights, 0.5 splits it with the weights' own (regular convs)")
    group.add_argument("--equalize-percentile", type=float, default=RANGE_PERCENTILE, metavar="P",
                       help="each channel's range for --equalize: this percentile of |x| (default 100: the max; "
                            "chosen on COCO train images, README)")
    group.add_argument("--bias-correction", action="store_true",
                       help="after calibration, subtract from each INT8 conv's bias the mean output shift its "
                            "quantization causes on the calibration images")
