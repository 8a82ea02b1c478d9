"""Checkpoints: safe loading of YOLOv6's released files and the project's own format.

YOLOv6 releases pickle the whole model object. Unpickling such a file normally imports and runs the ``yolov6``
package; here a restricted unpickler rebuilds only tensors and plain containers and turns every module object
into an inert record, from which the state_dict is read. Any other global is refused before anything runs.
The project's own format is a plain dict of tensors, strings and numbers, loadable with ``weights_only=True``.
"""
from __future__ import annotations

import _compat_pickle
import collections
import copy
import logging
import pickle
import re
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.config import DEFAULT_CONFIG_DIR, available_configs, load_config, resolve_config
from utils.errors import InputError
from utils.fileio import atomic_output

_logger = logging.getLogger(__name__)

FORMAT = "yolov6-partial-quant/1"


class UnsafeCheckpointError(InputError):
    """The pickle names a global outside the allow-list; nothing was executed."""


# ----------------------------------------------------------------------------------------------- restricted pickle
class InertRecord:
    """Stands in for a pickled object of a module class: keeps its state, runs none of its code."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.state = args, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


class InertValue(InertRecord):
    """Result of an allowed-but-irrelevant call (numpy scalars in training metadata): arguments kept, nothing run."""


_RECORD_CLASSES: dict[str, type[InertRecord]] = {}
# pytorch_quantization: the seed's calibration files pickle its quantized modules, quantizers and calibrators
_RECORD_PREFIXES = ("yolov6.", "torch.nn.modules.", "pytorch_quantization.")
# numpy arrays (a histogram calibrator's bins) are kept as inert values: their data is never needed
_INERT_CALLS = {"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype", "_codecs.encode",
                "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray"}
_TORCH_CALLS = {"_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"}
_SAFE_GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict, ("builtins", "set"): set,
                 ("builtins", "frozenset"): frozenset, ("torch", "Size"): torch.Size}


def _record_class(qualname: str, base: type[InertRecord] = InertRecord) -> type[InertRecord]:
    if qualname not in _RECORD_CLASSES:
        _RECORD_CLASSES[qualname] = type(qualname.rsplit(".", 1)[-1], (base,), {"qualname": qualname})
    return _RECORD_CLASSES[qualname]


class RestrictedUnpickler(pickle.Unpickler):
    """Allows tensors, plain containers and module records; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles written by Python 2-compatible code name Python 2 modules (``__builtin__.set``)
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualname = f"{module}.{name}"
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch._utils" and name in _TORCH_CALLS:
            return getattr(torch._utils, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if qualname in _INERT_CALLS:
            return _record_class(qualname, InertValue)
        if module.startswith(_RECORD_PREFIXES) or module == "__main__":
            return _record_class(qualname)
        raise UnsafeCheckpointError(
            f"checkpoint refers to {qualname!r}, which is not allowed in a model file; nothing was executed. "
            "Load only YOLOv6 or yolov6-partial-quant checkpoints from sources you trust")


_restricted_pickle = types.SimpleNamespace(__name__="restricted_pickle", Unpickler=RestrictedUnpickler,
                                           load=None)  # only zip checkpoints are read, so load() is never used


def _restricted_load(path: Path) -> Any:
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path} is not a PyTorch checkpoint (expected a zip-format .pt file as torch.save "
                         "writes since PyTorch 1.6); pass a YOLOv6 .pt or a checkpoint written by this toolkit")
    try:
        return torch.load(path, map_location="cpu", pickle_module=_restricted_pickle, weights_only=False)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure inside torch.load means a broken file
        raise InputError(f"{path} could not be read as a PyTorch checkpoint ({type(exc).__name__}: {exc}); "
                         "check that the file is complete") from None


# ------------------------------------------------------------------------------------------ records -> state_dict
def _record_state(record: InertRecord) -> dict[str, Any]:
    state = record.state
    if isinstance(state, tuple):  # (dict, slots) form
        state = state[0]
    return state if isinstance(state, dict) else {}


def record_state_dict(record: InertRecord, prefix: str = "") -> "collections.OrderedDict[str, torch.Tensor]":
    """The state_dict a pickled nn.Module would return, read from its inert record."""
    out: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    state = _record_state(record)
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value.detach()
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in non_persistent:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, InertRecord):
            out.update(record_state_dict(child, f"{prefix}{name}."))
    return out


def record_classes(record: InertRecord, prefix: str = "") -> dict[str, str]:
    """Module path -> pickled class name for every module in the record tree."""
    out = {prefix.rstrip("."): record.qualname}
    for name, child in (_record_state(record).get("_modules") or {}).items():
        if isinstance(child, InertRecord):
            out.update(record_classes(child, f"{prefix}{name}."))
    return out


# ------------------------------------------------------------------------------------------ variant inference
def _out_channels(sd: dict[str, torch.Tensor], module: str) -> int:
    """Output channels of the first conv weight under ``module``."""
    for key, value in sd.items():
        if key.startswith(module + ".") and key.endswith("weight") and value.ndim == 4:
            return int(value.shape[1] if "upsample_transpose" in key else value.shape[0])
    raise KeyError(module)


def _count_blocks(sd: dict[str, torch.Tensor], stage: str) -> int:
    """Blocks in a RepBlock (conv1 + block.N) whose path starts with ``stage``."""
    idx = {int(m.group(1)) for k in sd for m in [re.match(re.escape(stage) + r"\.block\.(\d+)\.", k)] if m}
    return 1 + (max(idx) + 1 if idx else 0)


def _infer_block(sd: dict[str, torch.Tensor], classes: dict[str, str]) -> str:
    stem_class = classes.get("backbone.stem", "").rsplit(".", 1)[-1]
    by_class = {"RepVGGBlock": "repvgg", "QARepVGGBlock": "qarepvgg", "QARepVGGBlockV2": "qarepvggv2",
                "RealVGGBlock": "repopt", "ConvBNSiLU": "conv_silu", "ConvBNReLU": "conv_relu"}
    if stem_class in by_class:
        return by_class[stem_class]
    # Without class names some blocks share keys; pick the variant YOLOv6 actually ships.
    if "backbone.stem.rbr_dense.conv.weight" in sd:
        return "qarepvggv2" if "backbone.stem.bn.weight" in sd else "repvgg"  # v1 QARepVGG has no released files
    if "backbone.stem.conv.weight" in sd:
        return "repopt"
    if "backbone.stem.block.conv.weight" in sd:
        return "conv_silu"  # the l models; ConvBNReLU has the same keys
    raise KeyError("backbone.stem")


def _infer_lite_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A YOLOv6Lite config from its state_dict: the shipped config whose widths and depths it has, else 'custom'
    (exact per-stage widths cannot be written back into a width multiple, so unknown widths are refused)."""
    repeats = [1 + max(int(k.split(".")[2]) for k in sd if k.startswith(f"backbone.lite_effiblock_{i}."))
               for i in range(1, 5)]
    stages = ["backbone.conv_0"] + [f"backbone.lite_effiblock_{i}.0.conv_pw_3" for i in range(1, 5)]
    widths = [_out_channels(sd, m) for m in stages]
    unified = _out_channels(sd, "neck.reduce_layer0")
    num_classes = int(sd["detect.cls_preds.0.weight"].shape[0])
    for name in available_configs():
        known = load_config(name)
        if known["layout"] != "lite":
            continue
        channels, known_repeats = resolve_config(known)
        if channels[:5] == widths and channels[-1] == unified and known_repeats == repeats:
            config = copy.deepcopy(known)
            config["num_classes"] = num_classes
            return config
    raise KeyError("a shipped YOLOv6Lite width (lite widths " + str(widths) + ")")


def infer_config(sd: dict[str, torch.Tensor], classes: dict[str, str] | None = None) -> dict[str, Any]:
    """Config (layout, block, widths, depths, head, classes) of a YOLOv6 state_dict, from its keys and shapes."""
    classes = classes or {}
    if any(k.startswith("backbone.lite_effiblock_1.") for k in sd):
        return _infer_lite_config(sd)
    layout = "v2" if any(k.startswith("neck.upsample0.") for k in sd) else "v3"
    csp = any(k.startswith("backbone.ERBlock_2.1.cv1.") for k in sd)
    block = _infer_block(sd, classes)
    channel_modules = ["backbone.stem", "backbone.ERBlock_2.0", "backbone.ERBlock_3.0", "backbone.ERBlock_4.0",
                       "backbone.ERBlock_5.0", "neck.reduce_layer0", "neck.reduce_layer1", "neck.downsample2",
                       "detect.stems.1", "neck.downsample1", "detect.stems.2"]  # index i = YOLOv6's channels_list[i]
    channels = [_out_channels(sd, m) for m in channel_modules]
    stages = ["backbone.ERBlock_2.1", "backbone.ERBlock_3.1", "backbone.ERBlock_4.1", "backbone.ERBlock_5.1",
              "neck.Rep_p4", "neck.Rep_p3", "neck.Rep_n3", "neck.Rep_n4"]
    repeats = [1] + [2 * _count_blocks(sd, s + ".m") if csp else _count_blocks(sd, s) for s in stages]
    distill_ns = any(k.startswith("detect.reg_preds_dist.") for k in sd)
    dfl_key = "detect.reg_preds_dist.0.weight" if distill_ns else "detect.reg_preds.0.weight"
    reg_max = int(sd[dfl_key].shape[0]) // 4 - 1
    csp_e = None
    if csp:
        csp_e = sd["backbone.ERBlock_2.1.cv1.block.conv.weight"].shape[0] / channels[1]
    config: dict[str, Any] = {
        "name": "custom", "layout": layout, "block": block,
        "num_classes": int(sd["detect.cls_preds.0.weight"].shape[0]),
        "backbone": {"type": "CSPBepBackbone" if csp else "EfficientRep",
                     "num_repeats": repeats[:5], "out_channels": channels[:5],
                     "fuse_P2": layout == "v3", "cspsppf": any(".cspsppf." in k for k in sd)},
        "neck": {"type": "RepPANNeck" if layout == "v2" else ("CSPRepBiFPANNeck" if csp else "RepBiFPANNeck"),
                 "num_repeats": repeats[5:], "out_channels": channels[5:]},
        "head": {"use_dfl": reg_max > 0, "reg_max": reg_max, "distill_ns": distill_ns},
        "channels_list": channels, "num_repeats_list": repeats,
    }
    if csp:
        config["backbone"]["csp_e"] = config["neck"]["csp_e"] = _closest_csp_e(csp_e)
    config["name"] = _match_known_config(config)
    return config


def _closest_csp_e(ratio: float) -> float:
    """Map the measured hidden/out ratio back to YOLOv6's csp_e values, so int(c * e) reproduces the widths."""
    for e in (float(2) / 3, 0.5):
        if abs(ratio - e) < 0.02:
            return e
    return ratio


def _structural_repeats(repeats: list[int], csp: bool) -> list[int]:
    """CSP stages build n // 2 BottleReps, so n and n + 1 give the same network."""
    return [r // 2 if csp else r for r in repeats]


def _match_known_config(config: dict[str, Any], config_dir: Path = DEFAULT_CONFIG_DIR) -> str:
    """Name of the shipped config with the same structure, else 'custom'."""
    csp = config["backbone"]["type"] == "CSPBepBackbone"
    for name in available_configs(config_dir):
        known = load_config(name, config_dir)
        channels, repeats = resolve_config(known)
        same = (known["layout"], known["block"]) == (config["layout"], config["block"]) and \
            known["backbone"]["type"] == config["backbone"]["type"] and channels == config["channels_list"] and \
            _structural_repeats(repeats, csp) == _structural_repeats(config["num_repeats_list"], csp)
        if same:
            return name
    return "custom"


# --------------------------------------------------------------------------------------------- checkpoint API
@dataclass
class Checkpoint:
    """What a checkpoint file holds, whatever its origin."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    source: str  # "official" (a YOLOv6 release file) or "ours"
    deployed: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def _describe_unknown(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {sorted(map(str, obj))[:10]}"
    return f"an object of type {type(obj).__name__}"


def _official_checkpoint(path: Path, obj: dict[str, Any]) -> Checkpoint:
    record = obj.get("ema") or obj.get("model")
    sd = record_state_dict(record)
    classes = record_classes(record)
    try:
        config = infer_config(sd, classes)
    except (KeyError, IndexError) as exc:
        top = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in sd if "." in k})[:12]
        yolo_classes = sorted({c.rsplit(".", 1)[-1] for c in classes.values() if c.startswith("yolov6.")})
        raise InputError(f"{path}: unknown YOLOv6 layout (no {exc} found). Seen modules {top}, classes "
                         f"{yolo_classes}; supported: {available_configs()}") from None
    names = _record_state(record).get("names")
    if isinstance(names, (list, tuple)) and len(names) == config["num_classes"]:
        config["names"] = [str(n) for n in names]
    meta = {k: obj[k] for k in ("epoch",) if isinstance(obj.get(k), int)}
    return Checkpoint(sd, config, "official", deployed=False, meta=meta)


def _fused_checkpoint(path: Path, obj: dict[str, Any]) -> Checkpoint:
    """A state_dict in YOLOv6's names with every Conv+BN folded (``{"state_dict", "form": "fused", "model"}``)."""
    sd = {k: v.float() if v.is_floating_point() else v for k, v in obj["state_dict"].items()}
    try:
        config = infer_config(sd)
    except (KeyError, IndexError) as exc:
        raise InputError(f"{path}: a fused state_dict of an unknown YOLOv6 layout (no {exc} found); supported: "
                         f"{available_configs()}") from None
    meta = {k: str(obj[k]) for k in ("model", "source") if k in obj}
    return Checkpoint(sd, config, "fused", deployed=True, meta=meta)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a YOLOv6 release file or one of ours, safely. Bad files raise InputError with what to do."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file {path} not found; pass --weights with a YOLOv6 .pt or our checkpoint")
    obj = _restricted_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return Checkpoint(dict(obj["state_dict"]), obj["config"], "ours", bool(obj.get("deployed")),
                          dict(obj.get("meta") or {}))
    if isinstance(obj, dict) and isinstance(obj.get("ema") or obj.get("model"), InertRecord):
        return _official_checkpoint(path, obj)
    if isinstance(obj, dict) and obj.get("form") == "fused" and isinstance(obj.get("state_dict"), dict):
        return _fused_checkpoint(path, obj)
    raise InputError(f"{path} is a PyTorch file but not a YOLOv6 checkpoint: it holds {_describe_unknown(obj)}; "
                     "expected a YOLOv6 release .pt (with a 'model' entry) or a checkpoint written by this toolkit")


def read_pickled_model_state(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The state_dict of the whole model pickled in a YOLOv6-style file (``{"model": <module>}``, as YOLOv6's
    release files and its partial-quantization calibration files hold), read safely; None for any other file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found")
    obj = _restricted_load(path)
    record = (obj.get("ema") or obj.get("model")) if isinstance(obj, dict) else None
    return dict(record_state_dict(record)) if isinstance(record, InertRecord) else None


def save_checkpoint(path: str | Path, model: torch.nn.Module, deployed: bool = False,
                    meta: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                    half: bool = False) -> Path:
    """Write state_dict + config (+ meta, + extra entries such as quantizer state) atomically.

    ``half`` stores floating-point tensors as FP16 (half the size; loading converts back to FP32).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    payload = {"format": FORMAT, "config": model.config, "deployed": deployed, "state_dict": state,
               "meta": meta or {}}
    payload.update(extra or {})
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return path
