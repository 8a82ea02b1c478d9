"""Fake-quant INT8 for the deployed YOLOv6 model: insert quantizers, switch layers on and off, export mode.

With ``utils.quant.calibration`` the only user of pytorch-quantization, through ``utils.quant.compat`` (which imports
it and fixes its CPU paths).
A quantized layer is a ``QuantConv2d`` / ``QuantConvTranspose2d`` (per-tensor input, per-channel weight on axis 0) or
a ``QuantMaxPool2d`` (input only), named by its module path, e.g. ``backbone.ERBlock_2.0.rbr_reparam``.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from models import is_deployed
from utils.errors import InputError
from utils.quant.compat import QuantDescriptor, TensorQuantizer, quant_nn, quiet_library_logs

METHODS = ("max", "percentile", "entropy", "mse", "auto")  # auto: utils.quant.amax_choice
# proj_conv: DFL's fixed integration weights 0..16 (quantizing them only costs accuracy);
# reg_preds_dist: the training-only DFL branch of distill-ns heads, never run in eval mode nor exported.
DEFAULT_SKIP = ("detect.proj_conv", "detect.reg_preds_dist")
QUANT_TYPES = (quant_nn.QuantConv2d, quant_nn.QuantConvTranspose2d, quant_nn.QuantMaxPool2d)


# ------------------------------------------------------------------------------------------------ insertion
def check_calib_method(method: str) -> None:
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")


def _input_desc(calib_method: str, num_bits: int) -> QuantDescriptor:
    return QuantDescriptor(num_bits=num_bits, calib_method="max" if calib_method == "max" else "histogram")


def _weight_desc(num_bits: int, axis: int) -> QuantDescriptor:
    return QuantDescriptor(num_bits=num_bits, axis=(axis,))


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` the parameters and train/eval mode of ``old`` (the same tensors: outputs stay bit-exact)."""
    new.weight = old.weight
    new.bias = old.bias
    return new.train(old.training)


def _check_padding(name: str, conv: nn.Conv2d | nn.ConvTranspose2d) -> None:
    # 2.1.3's QuantConv2d pads 'reflect'/'replicate' as zeros and mangles 'circular' and string paddings
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise InputError(f"layer {name}: padding {conv.padding!r} with padding_mode {conv.padding_mode!r} cannot be "
                         "quantized faithfully by pytorch-quantization; add the layer to the skip list")


def _quant_conv(name: str, conv: nn.Conv2d, calib_method: str, num_bits: int) -> quant_nn.QuantConv2d:
    _check_padding(name, conv)
    new = quant_nn.QuantConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                               conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                               quant_desc_input=_input_desc(calib_method, num_bits),
                               quant_desc_weight=_weight_desc(num_bits, axis=0))
    return _adopt(new, conv)


def _quant_deconv(name: str, conv: nn.ConvTranspose2d, calib_method: str,
                  num_bits: int) -> quant_nn.QuantConvTranspose2d:
    _check_padding(name, conv)
    # weights are [in, out/groups, kh, kw]. TensorRT's INT8 deconvolution kernels take per-channel weight scales on
    # axis 0 (input channels: a deconvolution is the transpose of a convolution whose output channels those are);
    # axis 1 builds but computes wrong results (NVIDIA/TensorRT issues 1694 and 2380), so axis 0 it is.
    new = quant_nn.QuantConvTranspose2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                        conv.padding, conv.output_padding, conv.groups, bias=conv.bias is not None,
                                        dilation=conv.dilation, padding_mode=conv.padding_mode,
                                        quant_desc_input=_input_desc(calib_method, num_bits),
                                        quant_desc_weight=_weight_desc(num_bits, axis=0))
    return _adopt(new, conv)


def _quant_maxpool(name: str, pool: nn.MaxPool2d, calib_method: str, num_bits: int) -> quant_nn.QuantMaxPool2d:
    new = quant_nn.QuantMaxPool2d(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices,
                                  pool.ceil_mode, quant_desc_input=_input_desc(calib_method, num_bits))
    return new.train(pool.training)


_SWAPS = {nn.Conv2d: _quant_conv, nn.ConvTranspose2d: _quant_deconv, nn.MaxPool2d: _quant_maxpool}


def _is_skipped(name: str, skip: tuple[str, ...]) -> bool:
    """A skip entry names a module or a subtree (``detect.reg_preds_dist`` skips its children)."""
    return any(name == s or name.startswith(s + ".") for s in skip)


def _check_skip(model: nn.Module, skip: tuple[str, ...]) -> None:
    names = [name for name, _ in model.named_modules()]
    unknown = [s for s in skip if s not in DEFAULT_SKIP and not any(_is_skipped(n, (s,)) for n in names)]
    if unknown:
        raise InputError(f"skip list names {unknown}, which are not modules of this model; use module paths such as "
                         f"{[n for n, m in model.named_modules() if type(m) in _SWAPS][:3]}")


def insert_quantizers(model: nn.Module, skip: tuple[str, ...], calib_method: str, num_bits: int) -> None:
    """Swap every non-skipped Conv2d / ConvTranspose2d / MaxPool2d of ``model`` (in place) for its quantized twin."""
    with quiet_library_logs():
        for name, module in list(model.named_modules()):
            swap = _SWAPS.get(type(module))  # exact types: QuantMaxPool2d is itself a MaxPool2d
            if name and swap is not None and not _is_skipped(name, skip):
                model.set_submodule(name, swap(name, module, calib_method, num_bits))
    model.quant_settings = {"skip": list(skip), "num_bits": num_bits, "calib_method": calib_method}


def quantize_model(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP, calib_method: str = "max",
                   num_bits: int = 8) -> nn.Module:
    """A deep copy of the deployed ``model`` with quantizers inserted (enabled, uncalibrated); ``model`` is untouched.

    Args:
        skip: module paths (or subtrees) left in float.
        calib_method: the calibrator the input quantizers start with; ``calibrate`` installs the one it needs.
        num_bits: quantization bits (8 for INT8).
    """
    check_calib_method(calib_method)
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 2 <= num_bits <= 16:
        raise InputError(f"num_bits must be an integer in 2..16, got {num_bits!r}: use 8 for INT8")
    if not is_deployed(model):
        raise InputError("quantize the deployed model (RepVGG branches fused, BatchNorm folded): load it with "
                         "load_model(path, deploy=True) or call models.reparameterize(model) first")
    if quant_layers(model):
        raise InputError("model already holds quantized layers; quantize the float deployed model")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    _check_skip(model, skip)
    qmodel = copy.deepcopy(model)
    insert_quantizers(qmodel, skip, calib_method, num_bits)
    return qmodel


# --------------------------------------------------------------------------------------------- layer access
def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantized layers by module path, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANT_TYPES)}


def layer_quantizers(layer: nn.Module) -> list[TensorQuantizer]:
    weight = getattr(layer, "weight_quantizer", None)
    return [layer.input_quantizer] + ([weight] if weight is not None else [])


def _is_enabled(layer: nn.Module) -> bool:
    return not any(q._disabled for q in layer_quantizers(layer))  # 2.1.3 has no public getter for disable()


def layer_info(model: nn.Module) -> list[dict[str, Any]]:
    """Name, type, weight shape, parameter count and on/off state of every quantized layer, for reports."""
    info = []
    for name, layer in quant_layers(model).items():
        weight = getattr(layer, "weight", None)
        info.append({"name": name, "type": type(layer).__name__,
                     "weight_shape": list(weight.shape) if weight is not None else None,
                     "params": sum(p.numel() for p in layer.parameters()), "quantized": _is_enabled(layer)})
    return info


def resolve_layers(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Module]:
    """The named quantized layers (all for None); unknown names raise InputError listing valid ones."""
    available = quant_layers(model)
    if not available:
        raise InputError("the model has no quantized layers: call quantize_model() first")
    if layers is None:
        return available
    names = [layers] if isinstance(layers, str) else list(layers)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise InputError(f"unknown quantized layer(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; valid "
                         f"names are module paths such as {list(available)[:3]} ({len(available)} in all, see "
                         "layer_info())")
    return {n: available[n] for n in names}


def set_quantized(model: nn.Module, layers: Iterable[str] | None, enabled: bool) -> None:
    """Turn the input and weight quantizers of ``layers`` (None: all) on or off (with their bias shift)."""
    for layer in resolve_layers(model, layers).values():
        for quantizer in layer_quantizers(layer):
            if enabled:
                quantizer.enable()
            else:
                quantizer.disable()
        _sync_bias_shift(layer)


# Bias correction (utils.quant.equalize.correct_bias) compensates a layer's own INT8 error, so its shift belongs to
# the layer only while the layer runs INT8: a float fallback layer, the float reference and a QAT teacher keep the
# float bias. Every switch here keeps bias = float bias - shift exactly while the layer is quantized.
@torch.no_grad()
def set_bias_shift(layer: nn.Module, shift: torch.Tensor) -> None:
    """Give ``layer`` the bias ``shift`` subtracted while it runs INT8 (replacing any it had)."""
    if getattr(layer, "bias_shift", None) is not None and layer._bias_shifted:
        layer.bias.add_(layer.bias_shift)
    layer.register_buffer("bias_shift", shift.to(layer.bias).clone(), persistent=False)
    layer._bias_shifted = False
    _sync_bias_shift(layer)


@torch.no_grad()
def _sync_bias_shift(layer: nn.Module, quantized: bool | None = None) -> None:
    if getattr(layer, "bias_shift", None) is None:
        return
    quantized = _is_enabled(layer) if quantized is None else quantized
    if quantized != layer._bias_shifted:
        layer.bias.sub_(layer.bias_shift) if quantized else layer.bias.add_(layer.bias_shift)
        layer._bias_shifted = quantized


def quantize_only(model: nn.Module, layers: Iterable[str]) -> None:
    """Quantize exactly ``layers``; every other quantized layer runs in float."""
    chosen = list(resolve_layers(model, layers))  # validate before changing anything
    set_quantized(model, None, False)
    if chosen:
        set_quantized(model, chosen, True)


def float_only(model: nn.Module, layers: Iterable[str]) -> None:
    """Run exactly ``layers`` in float; every other quantized layer INT8."""
    chosen = list(resolve_layers(model, layers)) if layers else []  # validate before changing anything
    set_quantized(model, None, True)
    if chosen:
        set_quantized(model, chosen, False)


def enable_all(model: nn.Module) -> None:
    """Turn every quantizer on."""
    set_quantized(model, None, True)


def disable_all(model: nn.Module) -> None:
    """Turn every quantizer off: the model computes its float function."""
    set_quantized(model, None, False)


def count_quantized(model: nn.Module) -> tuple[int, int]:
    """(layers running INT8, quantized layers in all)."""
    layers = quant_layers(model)
    return sum(_is_enabled(layer) for layer in layers.values()), len(layers)


def float_layers(model: nn.Module) -> list[str]:
    """Quantized layers whose quantizers are off."""
    return [name for name, layer in quant_layers(model).items() if not _is_enabled(layer)]


@contextlib.contextmanager
def float_pass(model: nn.Module) -> Iterator[None]:
    """Within the block every quantizer of ``model`` is off and every bias float (the float function; an
    uncalibrated model runs too); their on/off states are restored afterwards."""
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    saved = [q._disabled for q in quantizers]
    for q in quantizers:
        q.disable()
    layers = quant_layers(model).values()
    for layer in layers:
        _sync_bias_shift(layer, False)
    try:
        with quiet_library_logs():
            yield
    finally:
        for q, disabled in zip(quantizers, saved, strict=True):
            q._disabled = disabled
        for layer in layers:
            _sync_bias_shift(layer)


# ----------------------------------------------------------------------------------------------------- export
@contextlib.contextmanager
def fb_fake_quant() -> Iterator[None]:
    """Within the block quantizers use PyTorch's native fake-quant ops, which ONNX export turns into Q/DQ pairs."""
    saved = TensorQuantizer.use_fb_fake_quant
    TensorQuantizer.use_fb_fake_quant = True
    try:
        with quiet_library_logs():
            yield
    finally:
        TensorQuantizer.use_fb_fake_quant = saved
