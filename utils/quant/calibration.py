"""Calibration of the quantized model: amax from calibration images, saved and loaded with the deployed weights.

Inputs are calibrated per tensor (max / percentile / entropy / mse, or ``auto``: each quantizer's amax chosen among
all of them, ``utils.quant.amax_choice``), weights per channel by max |w|; calibrated checkpoints hold FP32 amax and
load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from models import Checkpoint, model_from_checkpoint, save_checkpoint
from models.checkpoint import FORMAT, read_pickled_model_state
from utils.data.coco import readable_images
from utils.errors import InputError
from utils.quant import equalize as eq
from utils.quant.amax_choice import candidate_amax, choose_amax, head_sqnr, tracking_max
from utils.quant.compat import TensorQuantizer, calib, device_safe, quiet_library_logs
from utils.quant.quantizers import (
    DEFAULT_SKIP,
    METHODS,
    check_calib_method,
    float_layers,
    float_pass,
    insert_quantizers,
    layer_quantizers,
    quant_layers,
    quantize_model,
    resolve_layers,
    set_quantized,
)

_logger = logging.getLogger(__name__)

# Replaces a zero/NaN/inf amax: positive, FP16-representable and far above the 2**-24 below which 2.1.3 treats
# amax as zero, so PyTorch, ONNX and TensorRT agree; zero inputs and zero weights still quantize to exactly 0.
DEAD_AMAX = 1e-4
_ZERO_AMAX = 2.0 ** -24


# ------------------------------------------------------------------------------------------------ calibration
def _model_device(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _check_calib_args(method: str, num_batches: int, percentile: float, entropy_stride: int = 1) -> None:
    check_calib_method(method)
    if isinstance(entropy_stride, bool) or not isinstance(entropy_stride, int) or entropy_stride < 1:
        raise InputError(f"entropy stride must be a positive integer, got {entropy_stride!r}")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise InputError(f"number of calibration batches must be a positive integer, got {num_batches!r}")
    if method == "percentile" and not 0 < percentile <= 100:
        raise InputError(f"percentile must be in (0, 100], got {percentile!r}: e.g. 99.9, 99.99 or 99.999")


def _new_calibrator(method: str, quantizer: TensorQuantizer) -> Any:
    if method == "max":
        return calib.MaxCalibrator(quantizer.num_bits, None, quantizer.unsigned)
    return calib.HistogramCalibrator(quantizer.num_bits, None, quantizer.unsigned)


@contextlib.contextmanager
def _keeping_states(layers: dict[str, nn.Module]) -> Iterator[None]:
    """Every quantizer of ``layers`` is on or off after the block as it was before."""
    disabled = {q: q._disabled for layer in layers.values() for q in layer_quantizers(layer)}
    try:
        yield
    finally:
        for quantizer, was_disabled in disabled.items():
            quantizer._disabled = was_disabled


@contextlib.contextmanager
def _collecting(layers: dict[str, nn.Module], method: str) -> Iterator[None]:
    """Within the block the model computes in float while fresh calibrators collect its layer inputs."""
    with _keeping_states(layers):
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


@torch.no_grad()
def _feed(model: nn.Module, loader: Iterable[Any], num_batches: int, device: torch.device,
          keep: int = 0) -> tuple[int, int, list[torch.Tensor]]:
    """Run the first ``num_batches`` batches through ``model``; returns (batches, images) used and the first
    ``keep`` images (as batches on ``device``)."""
    batches = images = 0
    kept: list[torch.Tensor] = []
    for batch in tqdm(itertools.islice(loader, num_batches), total=num_batches, desc="calibrate", unit="batch",
                      file=sys.stderr, leave=False):
        x = readable_images(batch)
        batches += 1
        if len(x):
            x = x.to(device)
            model(x)
            if images < keep:
                kept.append(x[:keep - images])
            images += len(x)
    return batches, images, kept


def _weight_amax(layer: nn.Module) -> torch.Tensor:
    """Per-channel max |w| along the weight quantizer's axis (0: Conv2d output, ConvTranspose2d input channels),
    shaped to broadcast over the weight."""
    axis = layer.weight_quantizer.axis[0]
    dims = [d for d in range(layer.weight.dim()) if d != axis]
    return layer.weight.detach().abs().amax(dim=dims, keepdim=True).float()


def _load_amax(layers: dict[str, nn.Module], method: str, percentile: float, entropy_stride: int = 1) -> None:
    """Inputs: amax from the calibrators (NaN where a layer saw no data); weights: per-channel max."""
    args = () if method == "max" else (method,)
    kwargs = {"percentile": percentile} if method == "percentile" else \
        {"stride": entropy_stride} if method == "entropy" else {}
    for layer in layers.values():
        quantizer = layer.input_quantizer
        if hasattr(quantizer, "_amax"):
            del quantizer._amax  # re-created: max gives shape [1,1,1,1], histograms a scalar
        quantizer.load_calib_amax(*args, strict=False, **kwargs)
        quantizer._calibrator.reset()  # drop histograms (up to MBs per layer)
        if getattr(layer, "weight_quantizer", None) is not None:
            layer.weight_quantizer.register_buffer("_amax", _weight_amax(layer))


def _auto_amax(model: nn.Module, layers: dict[str, nn.Module], maxima: dict[str, float],
               images: list[torch.Tensor], entropy_stride: int) -> dict[str, Any]:
    """``auto``: every candidate amax from the collected histograms, the best assignment applied (on/off states
    kept); returns amax_choice.choose_amax's record."""
    candidates = {}
    for name, layer in tqdm(layers.items(), desc="auto: candidates", unit="layer", file=sys.stderr, leave=False):
        found = candidate_amax(layer.input_quantizer._calibrator, maxima[name], entropy_stride)
        safe, _ = _replace_dead(torch.tensor(list(found.values()), dtype=torch.float32))
        candidates[name] = dict(zip(found, safe.tolist(), strict=True))
        layer.input_quantizer._calibrator.reset()  # drop histograms (up to MBs per layer)
        if getattr(layer, "weight_quantizer", None) is not None:
            layer.weight_quantizer.register_buffer("_amax", _weight_amax(layer))
    with _keeping_states(layers):
        return choose_amax(model, layers, candidates, images)


@torch.no_grad()
def refresh_weight_amax(model: nn.Module) -> None:
    """Every weight quantizer's amax to its layer's current per-channel max |w| (dead channels: DEAD_AMAX), as
    calibration sets it: after the weights changed (fine-tuning), the checkpoint and the export stay consistent."""
    for layer in quant_layers(model).values():
        quantizer = getattr(layer, "weight_quantizer", None)
        if quantizer is not None:
            amax, _ = _replace_dead(_weight_amax(layer))
            quantizer.register_buffer("_amax", amax.to(layer.weight.device))


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
              percentile: float = 99.99, device: str | torch.device | None = None, auto_images: int = 16,
              entropy_stride: int = 1) -> dict[str, Any]:
    """Set every quantizer's amax from the first ``num_batches`` batches of ``loader`` (in place, deterministic).

    Inputs are calibrated per tensor by ``method``: ``max`` (max calibrator), ``percentile`` / ``entropy`` /
    ``mse`` (histograms) or ``auto`` (every candidate from one histogram pass, chosen on the first ``auto_images``
    images: ``utils.quant.amax_choice``); weights per channel (axis 0) by max |w|. On/off states are kept;
    calibration runs in float.

    Args:
        loader: batches as ``collate_detection`` makes them (items with ``ok`` False are left out) or image tensors.
        device: where the model runs (moved there); None keeps the model's device.
        entropy_stride: ``entropy`` and ``auto``'s entropy candidate: step of the search over histogram bins
            (1: every bin, as YOLOv6 and pytorch-quantization; k: every k-th, about k times faster, close amax).

    Returns:
        A summary (method, percentile, batches, images, dead amax count; ``auto``: its choice record), also kept
        as ``model.quant_calib``.
    """
    _check_calib_args(method, num_batches, percentile, entropy_stride)
    layers = resolve_layers(model, None)
    device = torch.device(device) if device is not None else _model_device(model)
    if isinstance(getattr(loader, "sampler", None), torch.utils.data.RandomSampler):
        _logger.warning("the calibration loader shuffles: amax will differ from run to run; use shuffle=False")
    was_training = model.training
    model.to(device).eval()
    auto = method == "auto"
    with quiet_library_logs(), device_safe(device):
        with _collecting(layers, method), (tracking_max(layers) if auto else contextlib.nullcontext({})) as maxima:
            batches, images, kept = _feed(model, loader, num_batches, device, keep=auto_images if auto else 0)
        if images == 0:
            raise InputError(f"no readable image in the first {num_batches} calibration batches: check the "
                             "calibration images")
        if auto:
            choice = _auto_amax(model, layers, maxima, kept, entropy_stride)
        else:
            _load_amax(layers, method, percentile, entropy_stride)
    replaced = _finalize_amax(model, device)
    _warn_dead(replaced, model)
    model.train(was_training)
    if batches < num_batches:
        _logger.warning("calibration used all %d batches the loader has (%d requested)", batches, num_batches)
    summary = {"method": method, "batches": batches, "images": images, "dead_amax": sum(replaced.values())}
    if method == "percentile":
        summary["percentile"] = float(percentile)
    if method in ("entropy", "auto") and entropy_stride != 1:
        summary["entropy_stride"] = entropy_stride
    if auto:
        summary["auto"] = choice
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
             "transform": eq.transform_record(model),
             "quant": {"skip": list(settings.get("skip", DEFAULT_SKIP)), "num_bits": int(settings.get("num_bits", 8)),
                       "float_layers": float_layers(model)}}
    with float_pass(model):  # the file keeps float biases: bias shifts are re-attached per layer on loading
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


def load_quantizers(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor],
                    what: str = "the quantizer state") -> nn.Module:
    """Load amax (a calibrated checkpoint or a ``quantizer_state`` dict, named ``what`` in errors) into the
    quantized ``model`` (in place).

    Raises:
        InputError: the state belongs to another model (other layers, shapes or weights).
    """
    if not isinstance(source, Mapping):
        raw = _read_calibrated(source)
        what, source = f"{source} (config {raw['config'].get('name', '?')!r})", raw["quantizers"]
    resolve_layers(model, None)
    _check_state_fits(model, source, what)
    for quantizer in model.modules():
        if isinstance(quantizer, TensorQuantizer) and hasattr(quantizer, "_amax"):
            del quantizer._amax  # shapes may differ from an earlier calibration ([1,1,1,1] vs scalar)
    device = _model_device(model)
    with device_safe(device), quiet_library_logs():
        model.load_state_dict({f"{name}._amax": t for name, t in source.items()}, strict=False)
    return model


SEED_CALIBRATION = "yolov6-calib"  # the method recorded for amax read from YOLOv6's own calibration file


def seed_calibration_state(model: nn.Module, path: str | Path) -> dict[str, torch.Tensor] | None:
    """The quantizer state of ``model`` from a calibration file of YOLOv6's partial-quantization tools (its
    sensitivity_analyse.py / ptq.py: ``{"model": <whole quantized model>}``, pytorch-quantization modules with
    ``_amax`` buffers), read without executing code. Input amax come from the file; weight amax are this model's
    per-channel max |w| (how YOLOv6 calibrates weights too). None when the file is not of that kind.

    Raises:
        InputError: it is, but its quantized layers are not this model's.
    """
    state = read_pickled_model_state(path)
    if state is None:
        return None
    found = {k[:-len("._amax")]: v for k, v in state.items() if k.endswith("._amax")}
    if not found:
        raise InputError(f"{path} holds a pickled model without quantizer amax: pass a calibration file (YOLOv6's "
                         "*_calib.pt or our calibrated.pt), not the float weights")
    layers = quant_layers(model)
    missing = [name for name in layers if f"{name}._input_quantizer" not in found]
    if missing:
        raise InputError(f"{path} was calibrated for another model: {len(missing)} of this model's {len(layers)} "
                         f"quantized layers have no amax there (e.g. {missing[:2]}); pass the calibration made "
                         "for these --weights")
    out = {}
    for name, layer in layers.items():
        amax = found[f"{name}._input_quantizer"].float().reshape(())
        out[f"{name}._input_quantizer"], _ = _replace_dead(amax)
        if getattr(layer, "weight_quantizer", None) is not None:
            out[f"{name}._weight_quantizer"], _ = _replace_dead(_weight_amax(layer))
    return out


def load_calibrated(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The quantized, calibrated deployed model a ``save_calibrated`` file describes (eval mode, on ``device``)."""
    raw = _read_calibrated(path)
    ckpt = Checkpoint(dict(raw["state_dict"]), raw["config"], "ours", bool(raw.get("deployed")),
                      dict(raw.get("meta") or {}))
    model = model_from_checkpoint(ckpt, path)
    settings = raw.get("quant") or {}
    calib_info = dict(raw.get("calib") or {})
    insert_quantizers(model, tuple(settings.get("skip", DEFAULT_SKIP)), calib_info.get("method", "max"),
                       int(settings.get("num_bits", 8)))
    eq.apply_transform(model, raw.get("transform") or {}, weights=False)  # the saved weights are transformed
    load_quantizers(model, raw["quantizers"])
    disabled = [name for name in settings.get("float_layers", []) if name in quant_layers(model)]
    if disabled:
        set_quantized(model, disabled, False)
    model.quant_calib = calib_info
    return model.to(torch.device(device)).eval()


# -------------------------------------------------------------------------------------------- calibrated model
def _equalized_and_calibrated(model: nn.Module, qmodel: nn.Module, batches: list[torch.Tensor], loader: Any,
                              batch_number: int, method: str, percentile: float, device: torch.device,
                              entropy_stride: int, transform: eq.TransformSettings) -> nn.Module:
    """``qmodel`` equalized as ``transform.equalize`` says and calibrated. ``auto``: each of none / depthwise / all
    is tried on a fresh copy of the uncalibrated ``qmodel``; the one whose calibrated full-INT8 head output is
    closest to float (head SQNR on the first ``transform.auto_images`` images, no labels) is kept."""
    def build(setting: str, target: nn.Module) -> nn.Module:
        target.to(device).quant_transform = {}
        kinds = eq.kinds_of(setting)
        if kinds:
            eq.equalize(target, batches, kinds, transform.alpha, transform.percentile)
        calibrate(target, loader, batch_number, method=method, percentile=percentile, device=device,
                  entropy_stride=entropy_stride)
        return target

    if transform.equalize != "auto":
        return build(transform.equalize, qmodel)
    images = _first_images(batches, transform.auto_images)
    with float_pass(qmodel.to(device)), torch.no_grad():
        refs = [qmodel.eval()(x) for x in images]
    untouched, scores, best = copy.deepcopy(qmodel), {}, {}
    for setting in ("none", "depthwise", "all"):
        candidate = build(setting, qmodel if setting == "none" else copy.deepcopy(untouched))
        scores[setting] = round(head_sqnr(candidate.eval(), images, refs), 4)
        if not best or scores[setting] > scores[best["setting"]]:
            best = {"setting": setting, "model": candidate}
    _logger.info("--equalize auto: %s (head SQNR %s)", best["setting"],
                 ", ".join(f"{k} {v:.2f} dB" for k, v in scores.items()))
    chosen = best["model"]
    record = chosen.quant_transform.setdefault("equalize", {"kinds": [], "alpha": transform.alpha,
                                                             "percentile": transform.percentile, "scales": {},
                                                             "folded": {}})
    record["selected_by"] = {"setting": best["setting"], "criterion": "head output SQNR (dB) against float",
                             "scores": scores}
    return chosen


def _first_images(batches: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    out, taken = [], 0
    for x in batches:
        if taken >= count:
            break
        out.append(x[:count - taken])
        taken += len(out[-1])
    return out


def _transformed_and_calibrated(model: nn.Module, qmodel: nn.Module, loader: Any, batch_number: int, method: str,
                                percentile: float, device: torch.device, entropy_stride: int,
                                transform: eq.TransformSettings) -> nn.Module:
    """Equalize (as ``transform`` says), calibrate, then correct biases; the calibration summary stays in
    ``quant_calib`` and the transform in ``quant_transform`` of the returned model."""
    batches = eq.calibration_batches(loader, batch_number, device)
    if not batches:
        raise InputError(f"no readable image in the first {batch_number} calibration batches: check the "
                         "calibration images")
    qmodel.quant_transform = {}
    qmodel = _equalized_and_calibrated(model, qmodel, batches, loader, batch_number, method, percentile, device,
                                       entropy_stride, transform)
    if transform.bias_correction:
        eq.correct_bias(qmodel, batches)
    return qmodel


def amax_sha256(model: nn.Module) -> str:
    """A hash of every quantizer's amax (names, shapes and FP32 values): identifies a calibration."""
    digest = hashlib.sha256()
    for name, amax in sorted(quantizer_state(model).items()):
        digest.update(name.encode())
        digest.update(str(tuple(amax.shape)).encode())
        digest.update(amax.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _auto_record(auto: dict[str, Any]) -> dict[str, Any]:
    """What a run's calibration record keeps of auto's choice (the per-quantizer choice stays in the checkpoint)."""
    return {k: auto[k] for k in ("selected", "scores", "counts") if k in auto}


def _load_calibration_file(qmodel: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load the amax of ``path`` (our calibrated checkpoint, or YOLOv6's calibration file) into ``qmodel``, reading
    the file once; returns its calibration settings."""
    try:
        raw = _read_calibrated(path)
    except InputError:
        seed_state = seed_calibration_state(qmodel, path)
        if seed_state is None:
            raise
        load_quantizers(qmodel, seed_state)
        qmodel.quant_calib = {"method": SEED_CALIBRATION, "source": str(path)}
        _logger.info("%s: input amax of YOLOv6's calibration file, weight amax from the weights", path)
        return dict(qmodel.quant_calib)
    eq.apply_transform(qmodel, raw.get("transform") or {})  # this model's float weights, transformed as the file's
    load_quantizers(qmodel, raw["quantizers"], f"{path} (config {raw['config'].get('name', '?')!r})")
    return dict(raw.get("calib") or {})


def calibrated_model(model: nn.Module, *, calib_weights: str | Path | None = None, loader: Any = None,
                     batch_number: int = 1, calib_method: str | None = None, percentile: float = 99.99,
                     device: str | torch.device = "cpu", num_bits: int = 8, entropy_stride: int = 1,
                     transform: eq.TransformSettings | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The quantized copy of the deployed float ``model``, calibrated here or loaded from ``calib_weights``.

    ``transform``: input equalization and bias correction around the calibration (``utils.quant.equalize``); a
    ``calib_weights`` file brings its own (recorded) transform instead.

    Returns (quantized model on ``device``, calibration record: method (+ percentile), source, amax_sha256,
    transform summary).

    Raises:
        InputError: ``calib_weights`` belongs to another model, or its method differs from ``calib_method``.
    """
    if calib_method is not None and calib_method not in METHODS:
        raise InputError(f"unknown calibration method {calib_method!r}; choose one of {', '.join(METHODS)}")
    qmodel = quantize_model(model, calib_method=calib_method or "max", num_bits=num_bits)
    if calib_weights is not None:
        if transform is not None and transform.active:
            raise InputError(f"--calib-weights {calib_weights} brings its own equalization / bias correction (or "
                             "none): drop --equalize / --bias-correction, or calibrate again without --calib-weights")
        info = _load_calibration_file(qmodel, calib_weights)
        if calib_method is not None and info.get("method") not in (None, calib_method, SEED_CALIBRATION):
            raise InputError(f"--calib-weights {calib_weights} was calibrated with {info.get('method')!r} but "
                             f"--calib-method is {calib_method!r}: drop --calib-method or recalibrate")
        record = {"method": info.get("method", "?"), "source": str(calib_weights)}
        record.update({k: info[k] for k in ("percentile", "entropy_stride") if k in info})
        if "auto" in info:
            record["auto"] = _auto_record(info["auto"])
    else:
        if loader is None:
            raise InputError("no calibration data: pass --data-root with calibration images or --calib-weights")
        transform = transform or eq.TransformSettings()
        if transform.active:
            qmodel = _transformed_and_calibrated(model, qmodel, loader, batch_number, calib_method or "max",
                                                 percentile, torch.device(device), entropy_stride, transform)
            summary = qmodel.quant_calib
        else:
            summary = calibrate(qmodel, loader, batch_number, method=calib_method or "max", percentile=percentile,
                                device=device, entropy_stride=entropy_stride)
        record = {k: summary[k] for k in ("method", "percentile", "entropy_stride") if k in summary}
        record.update(source="calibrated", images=summary["images"], dead_amax=summary["dead_amax"])
        if "auto" in summary:
            record["auto"] = _auto_record(summary["auto"])
    if eq.transform_record(qmodel):
        record["transform"] = eq.describe(eq.transform_record(qmodel))
    record["amax_sha256"] = amax_sha256(qmodel)
    return qmodel.to(torch.device(device)).eval(), record
