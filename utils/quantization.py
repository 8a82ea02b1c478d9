"""Fake-quant INT8 for the deployed YOLOv6 model: insert quantizers, switch layers, calibrate, save and load amax.

The only module that uses pytorch-quantization, through utils.quant_compat (which imports it and fixes its CPU paths).
A quantized layer is a ``QuantConv2d`` / ``QuantConvTranspose2d`` (per-tensor input, per-channel weight on axis 0) or
a ``QuantMaxPool2d`` (input only), named by its module path, e.g. ``backbone.ERBlock_2.0.rbr_reparam``.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from models import Checkpoint, is_deployed, model_from_checkpoint, save_checkpoint
from models.checkpoint import FORMAT
from utils.errors import InputError
from utils.quant_compat import QuantDescriptor, TensorQuantizer, calib, device_safe, quant_nn, quiet_library_logs

_logger = logging.getLogger(__name__)

METHODS = ("max", "percentile", "entropy", "mse")
# proj_conv: DFL's fixed integration weights 0..16 (quantizing them only costs accuracy);
# reg_preds_dist: the training-only DFL branch of distill-ns heads, never run in eval mode nor exported.
DEFAULT_SKIP = ("detect.proj_conv", "detect.reg_preds_dist")
# Replaces a zero/NaN/inf amax: positive, FP16-representable and far above the 2**-24 below which 2.1.3 treats
# amax as zero, so PyTorch, ONNX and TensorRT agree; zero inputs and zero weights still quantize to exactly 0.
DEAD_AMAX = 1e-4
_ZERO_AMAX = 2.0 ** -24
QUANT_TYPES = (quant_nn.QuantConv2d, quant_nn.QuantConvTranspose2d, quant_nn.QuantMaxPool2d)


# ------------------------------------------------------------------------------------------------ insertion
def _check_method(method: str) -> None:
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


def _insert_quantizers(model: nn.Module, skip: tuple[str, ...], calib_method: str, num_bits: int) -> None:
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
    _check_method(calib_method)
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
    _insert_quantizers(qmodel, skip, calib_method, num_bits)
    return qmodel


# --------------------------------------------------------------------------------------------- layer access
def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantized layers by module path, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANT_TYPES)}


def _quantizers(layer: nn.Module) -> list[TensorQuantizer]:
    weight = getattr(layer, "weight_quantizer", None)
    return [layer.input_quantizer] + ([weight] if weight is not None else [])


def _is_enabled(layer: nn.Module) -> bool:
    return not any(q._disabled for q in _quantizers(layer))  # 2.1.3 has no public getter for disable()


def layer_info(model: nn.Module) -> list[dict[str, Any]]:
    """Name, type, weight shape, parameter count and on/off state of every quantized layer, for reports."""
    info = []
    for name, layer in quant_layers(model).items():
        weight = getattr(layer, "weight", None)
        info.append({"name": name, "type": type(layer).__name__,
                     "weight_shape": list(weight.shape) if weight is not None else None,
                     "params": sum(p.numel() for p in layer.parameters()), "quantized": _is_enabled(layer)})
    return info


def _select(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Module]:
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
    """Turn the input and weight quantizers of ``layers`` (None: all) on or off."""
    for layer in _select(model, layers).values():
        for quantizer in _quantizers(layer):
            if enabled:
                quantizer.enable()
            else:
                quantizer.disable()


def quantize_only(model: nn.Module, layers: Iterable[str]) -> None:
    """Quantize exactly ``layers``; every other quantized layer runs in float."""
    chosen = list(_select(model, layers))  # validate before changing anything
    set_quantized(model, None, False)
    if chosen:
        set_quantized(model, chosen, True)


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


# ------------------------------------------------------------------------------------------------ calibration
def _model_device(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _check_calib_args(method: str, num_batches: int, percentile: float) -> None:
    _check_method(method)
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise InputError(f"number of calibration batches must be a positive integer, got {num_batches!r}")
    if method == "percentile" and not 0 < percentile <= 100:
        raise InputError(f"percentile must be in (0, 100], got {percentile!r}: e.g. 99.9, 99.99 or 99.999")


def _new_calibrator(method: str, quantizer: TensorQuantizer) -> Any:
    if method == "max":
        return calib.MaxCalibrator(quantizer.num_bits, None, quantizer.unsigned)
    return calib.HistogramCalibrator(quantizer.num_bits, None, quantizer.unsigned)


@contextlib.contextmanager
def _collecting(layers: dict[str, nn.Module], method: str) -> Iterator[None]:
    """Within the block the model computes in float while fresh calibrators collect its layer inputs."""
    disabled = {q: q._disabled for layer in layers.values() for q in _quantizers(layer)}
    for layer in layers.values():
        quantizer = layer.input_quantizer
        quantizer._calibrator = _new_calibrator(method, quantizer)  # fresh statistics on every call
        quantizer.enable()
        quantizer.disable_quant()
        quantizer.enable_calib()
        if getattr(layer, "weight_quantizer", None) is not None:
            layer.weight_quantizer.disable()
    try:
        yield
    finally:
        for layer in layers.values():
            layer.input_quantizer.disable_calib()
            layer.input_quantizer.enable_quant()
        for quantizer, was_disabled in disabled.items():
            quantizer._disabled = was_disabled


def _batch_images(batch: Any) -> torch.Tensor:
    """The readable images of a batch: a collate_detection dict (items with ok=False left out) or a tensor."""
    if isinstance(batch, torch.Tensor):
        return batch
    images = batch["image"]
    ok = batch.get("ok")
    return images if ok is None else images[torch.as_tensor(ok, dtype=torch.bool)]


@torch.no_grad()
def _feed(model: nn.Module, loader: Iterable[Any], num_batches: int, device: torch.device) -> tuple[int, int]:
    """Run the first ``num_batches`` batches through ``model``; returns (batches, images) used."""
    batches = images = 0
    for batch in tqdm(itertools.islice(loader, num_batches), total=num_batches, desc="calibrate", unit="batch",
                      file=sys.stderr, leave=False):
        x = _batch_images(batch)
        batches += 1
        if len(x):
            model(x.to(device))
            images += len(x)
    return batches, images


def _weight_amax(layer: nn.Module) -> torch.Tensor:
    """Per-channel max |w| along the weight quantizer's axis (0: Conv2d output, ConvTranspose2d input channels),
    shaped to broadcast over the weight."""
    axis = layer.weight_quantizer.axis[0]
    dims = [d for d in range(layer.weight.dim()) if d != axis]
    return layer.weight.detach().abs().amax(dim=dims, keepdim=True).float()


def _load_amax(layers: dict[str, nn.Module], method: str, percentile: float) -> None:
    """Inputs: amax from the calibrators (NaN where a layer saw no data); weights: per-channel max."""
    args = () if method == "max" else (method,)
    kwargs = {"percentile": percentile} if method == "percentile" else {}
    for layer in layers.values():
        quantizer = layer.input_quantizer
        if hasattr(quantizer, "_amax"):
            del quantizer._amax  # re-created: max gives shape [1,1,1,1], histograms a scalar
        quantizer.load_calib_amax(*args, strict=False, **kwargs)
        quantizer._calibrator.reset()  # drop histograms (up to MBs per layer)
        if getattr(layer, "weight_quantizer", None) is not None:
            layer.weight_quantizer.register_buffer("_amax", _weight_amax(layer))


def _replace_dead(amax: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``amax`` with zero/NaN/inf values (and those 2.1.3 treats as zero) set to DEAD_AMAX; how many were."""
    dead = ~torch.isfinite(amax) | (amax <= _ZERO_AMAX)
    return torch.where(dead, torch.full_like(amax, DEAD_AMAX), amax), int(dead.sum())


def _finalize_amax(model: nn.Module, device: torch.device) -> dict[str, int]:
    """Every amax to FP32 on ``device``; zero/NaN/inf values (dead channels, unused layers) to DEAD_AMAX.

    Returns quantizer path -> number of values replaced (only where any were).
    """
    replaced = {}
    for name, quantizer in model.named_modules():
        if not isinstance(quantizer, TensorQuantizer) or not hasattr(quantizer, "_amax"):
            continue
        amax, dead = _replace_dead(quantizer._amax.detach().float().to(device))
        if dead:
            replaced[name] = dead
        quantizer.register_buffer("_amax", amax)
    return replaced


def _warn_dead(replaced: dict[str, int], model: nn.Module) -> None:
    if not replaced:
        return
    sizes = {name: q._amax.numel() for name, q in model.named_modules() if name in replaced}
    listed = ", ".join(f"{name} ({n} of {sizes[name]})" for name, n in list(replaced.items())[:10])
    more = f" and {len(replaced) - 10} more" if len(replaced) > 10 else ""
    _logger.warning("zero, NaN or infinite amax (dead channels, or layers that saw no calibration data) set to %g "
                    "so outputs stay finite: %s%s", DEAD_AMAX, listed, more)


def calibrate(model: nn.Module, loader: Iterable[Any], num_batches: int, method: str = "max",
              percentile: float = 99.99, device: str | torch.device | None = None) -> dict[str, Any]:
    """Set every quantizer's amax from the first ``num_batches`` batches of ``loader`` (in place, deterministic).

    Inputs are calibrated per tensor by ``method``: ``max`` (max calibrator) or ``percentile`` / ``entropy`` /
    ``mse`` (histograms); weights per channel (axis 0) by max |w|. On/off states are kept; calibration runs in float.

    Args:
        loader: batches as ``collate_detection`` makes them (items with ``ok`` False are left out) or image tensors.
        device: where the model runs (moved there); None keeps the model's device.

    Returns:
        A summary (method, percentile, batches, images, dead amax count), also kept as ``model.quant_calib``.
    """
    _check_calib_args(method, num_batches, percentile)
    layers = _select(model, None)
    device = torch.device(device) if device is not None else _model_device(model)
    if isinstance(getattr(loader, "sampler", None), torch.utils.data.RandomSampler):
        _logger.warning("the calibration loader shuffles: amax will differ from run to run; use shuffle=False")
    was_training = model.training
    model.to(device).eval()
    with quiet_library_logs(), device_safe(device):
        with _collecting(layers, method):
            batches, images = _feed(model, loader, num_batches, device)
        if images == 0:
            raise InputError(f"no readable image in the first {num_batches} calibration batches: check the "
                             "calibration images")
        _load_amax(layers, method, percentile)
    replaced = _finalize_amax(model, device)
    _warn_dead(replaced, model)
    model.train(was_training)
    if batches < num_batches:
        _logger.warning("calibration used all %d batches the loader has (%d requested)", batches, num_batches)
    summary = {"method": method, "batches": batches, "images": images, "dead_amax": sum(replaced.values())}
    if method == "percentile":
        summary["percentile"] = float(percentile)
    model.quant_calib = summary
    _logger.info("calibrated %d layers (%s) on %d images", len(layers), method, images)
    return summary


# ------------------------------------------------------------------------------------------------- save / load
def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every calibrated quantizer's amax as an FP32 CPU tensor, keyed by the quantizer's module path."""
    return {name: q._amax.detach().float().cpu().clone() for name, q in model.named_modules()
            if isinstance(q, TensorQuantizer) and hasattr(q, "_amax")}


def _quantizer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, TensorQuantizer)]


class _FloatView:
    """What save_checkpoint reads from a model (``config``, ``state_dict()``), without the quantizer buffers."""

    def __init__(self, model: nn.Module):
        if not isinstance(getattr(model, "config", None), dict):
            raise TypeError("save_calibrated needs a YOLOv6 model (models.Model, with its config)")
        self.config = model.config
        self._state = {k: v for k, v in model.state_dict().items() if not k.endswith("._amax")}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def save_calibrated(path: str | Path, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write the deployed weights, config, every amax and the calibration settings (``torch.load``-able with
    ``weights_only=True``); the file loads back with ``load_calibrated``."""
    state = quantizer_state(model)
    missing = [name for name in _quantizer_names(model) if name not in state]
    if not state or missing:
        raise InputError(f"{len(missing)} quantizers have no amax (e.g. {missing[:3]}): calibrate the model before "
                         "saving it")
    settings = dict(getattr(model, "quant_settings", {}))
    extra = {"quantizers": state, "calib": dict(getattr(model, "quant_calib", {})),
             "quant": {"skip": list(settings.get("skip", DEFAULT_SKIP)), "num_bits": int(settings.get("num_bits", 8)),
                       "float_layers": float_layers(model)}}
    return save_checkpoint(path, _FloatView(model), deployed=True, meta=meta, extra=extra)


def _read_calibrated(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"calibrated checkpoint {path} not found; write one with save_calibrated() after calibrating")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever fails here, the file is not one of ours
        raise InputError(f"{path} is not a calibrated checkpoint of this toolkit ({type(exc).__name__}); pass a file "
                         "written by save_calibrated()") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("quantizers"), dict):
        raise InputError(f"{path} holds no quantizer state: pass a checkpoint written by save_calibrated() (a float "
                         "checkpoint must be calibrated first)")
    return raw


def is_calibrated_file(path: str | Path) -> bool:
    """Whether ``path`` is a calibrated checkpoint written by ``save_calibrated`` (any other file: False)."""
    try:
        _read_calibrated(path)
    except InputError:
        return False
    return True


def _check_state_fits(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Quantizer names, amax shapes and weight amax must be this model's, or the state is another model's."""
    names = set(_quantizer_names(model))
    extra, missing = sorted(set(state) - names), sorted(names - set(state))
    problem = ""
    if extra or missing:
        problem = f"{len(extra)} of its quantizers are not in this model (e.g. {extra[:2]}), {len(missing)} of " \
                  f"this model's have no amax there (e.g. {missing[:2]})"
    else:
        for name, layer in quant_layers(model).items():
            if state[f"{name}._input_quantizer"].numel() != 1:
                problem = f"{name} has a per-channel input amax"
            elif getattr(layer, "weight_quantizer", None) is not None:
                expected, _ = _replace_dead(_weight_amax(layer))
                saved = state[f"{name}._weight_quantizer"]
                if saved.shape != expected.shape or not torch.allclose(saved.to(expected), expected, rtol=1e-5):
                    problem = f"the weight amax of {name} does not fit this model's weights"
            if problem:
                break
    if problem:
        raise InputError(f"{source} was calibrated for another model: {problem}. Calibrate this model, or load the "
                         "weights the calibration was made for")


def load_quantizers(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> nn.Module:
    """Load amax (a calibrated checkpoint or a ``quantizer_state`` dict) into the quantized ``model`` (in place).

    Raises:
        InputError: the state belongs to another model (other layers, shapes or weights).
    """
    what = "the quantizer state"
    if not isinstance(source, Mapping):
        raw = _read_calibrated(source)
        what, source = f"{source} (config {raw['config'].get('name', '?')!r})", raw["quantizers"]
    _select(model, None)
    _check_state_fits(model, source, what)
    for quantizer in model.modules():
        if isinstance(quantizer, TensorQuantizer) and hasattr(quantizer, "_amax"):
            del quantizer._amax  # shapes may differ from an earlier calibration ([1,1,1,1] vs scalar)
    device = _model_device(model)
    with device_safe(device), quiet_library_logs():
        model.load_state_dict({f"{name}._amax": t for name, t in source.items()}, strict=False)
    return model


def load_calibrated(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The quantized, calibrated deployed model a ``save_calibrated`` file describes (eval mode, on ``device``)."""
    raw = _read_calibrated(path)
    ckpt = Checkpoint(dict(raw["state_dict"]), raw["config"], "ours", bool(raw.get("deployed")),
                      dict(raw.get("meta") or {}))
    model = model_from_checkpoint(ckpt, path)
    settings = raw.get("quant") or {}
    calib_info = dict(raw.get("calib") or {})
    _insert_quantizers(model, tuple(settings.get("skip", DEFAULT_SKIP)), calib_info.get("method", "max"),
                       int(settings.get("num_bits", 8)))
    load_quantizers(model, raw["quantizers"])
    disabled = [name for name in settings.get("float_layers", []) if name in quant_layers(model)]
    if disabled:
        set_quantized(model, disabled, False)
    model.quant_calib = calib_info
    return model.to(torch.device(device)).eval()


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
