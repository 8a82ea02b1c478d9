"""What precision each layer of a built TensorRT engine runs at, and whether that is what the export intended.

Input is the JSON that ``trtexec --exportLayerInfo=FILE --profilingVerbosity=detailed`` writes (``build_engine.sh``
does both): ``{"Layers": [...], "Bindings": [...]}`` where each layer is a dict such as::

    {"Name": "/backbone/stem/rbr_reparam/Conv + /backbone/stem/act/Relu", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "images", "Location": "Device", "Dimensions": [1, 3, 640, 640],
                 "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
     "Outputs": [...], "ParameterType": "Convolution", "Weights": {"Type": "Int8", "Count": 432},
     "Bias": {"Type": "Float", "Count": 16}, ..., "Metadata": "[ONNX Layer: /backbone/stem/rbr_reparam/Conv]..."}

Without ``--profilingVerbosity=detailed`` the ``Layers`` list holds only names; that form carries no precisions and
is refused with a message that says how to rebuild.

A layer's precision is its weights' type when it has weights (convolutions: ``Int8``, ``Half``, ``Float``), else the
datatype in its first input's ``Format/Datatype`` text. The ONNX nodes fused into a layer come from its name
(TensorRT joins vertically fused nodes with `` + ``, horizontally fused ones with `` || ``, wraps point-wise fusions
in ``PWN(...)`` and Myelin regions in ``{ForeignNode[...]}``) and, in TensorRT 10 and later, from ``Metadata``
(``[ONNX Layer: name]`` records separated by U+001E). Myelin regions name only their first and last node, so nodes
inside one can be reported as not found.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.errors import InputError

_logger = logging.getLogger(__name__)

PRECISIONS = ("int8", "fp16", "fp32", "other")
INTENDED_PRECISIONS = ("int8", "float")
REBUILD_HINT = ("rebuild the engine with build_engine.sh, or trtexec with --profilingVerbosity=detailed "
                "--exportLayerInfo=FILE")

# Weights/Bias "Type" spellings in TensorRT's layer information (nvinfer1::DataType names).
_WEIGHT_TYPES = {"int8": "int8", "half": "fp16", "fp16": "fp16", "float": "fp32", "fp32": "fp32"}
# Datatype words inside "Format/Datatype" texts such as "Row major linear FP32" or "Channel major FP16 format where
# channel % 8 == 0"; bf16/fp8/int4 and the rest count as "other". Order matters: BFloat16 must not read as Float.
_FORMAT_WORDS = (
    (re.compile(r"\b(bf16|bfloat16|fp8|int4|uint8|int32|int64|bool)\b", re.IGNORECASE), "other"),
    (re.compile(r"\bint8\b", re.IGNORECASE), "int8"),
    (re.compile(r"\b(fp16|half)\b", re.IGNORECASE), "fp16"),
    (re.compile(r"\b(fp32|float)\b", re.IGNORECASE), "fp32"),
)
_METADATA_NODE = re.compile(r"\[ONNX Layer: ([^\]\x1e]+)\]")
_NAME_WRAPPERS = re.compile(r"PWN\(|\{ForeignNode\[|\]\}")
_NAME_SEPARATORS = re.compile(r" \+ | \|\| |, |\.\.\.")
_UNNAMED = re.compile(r"^\(Unnamed Layer\* \d+\)")


@dataclass(frozen=True)
class EngineLayer:
    """One layer of a built engine.

    Attributes:
        name: TensorRT's layer name (fused ONNX node names joined with " + ").
        layer_type: ``LayerType`` (``CaskConvolution``, ``Reformat``, ``kgen``, ...).
        precision: ``int8``, ``fp16``, ``fp32`` or ``other``.
        is_reformat: a format/precision conversion TensorRT inserted between layers.
        onnx_nodes: the ONNX node names fused into this layer; empty for reformat layers.
        parameter_type: ``ParameterType`` (``Convolution``, ``Pooling``, ...), ``None`` when absent.
    """

    name: str
    layer_type: str
    precision: str
    is_reformat: bool
    onnx_nodes: tuple[str, ...]
    parameter_type: str | None = None

    @property
    def is_conv(self) -> bool:
        """Convolutions and deconvolutions (the layers that partial quantization chooses between INT8 and float)."""
        return "convolution" in (self.parameter_type or "").lower()


# ------------------------------------------------------------------------------------------------ parsing
def _load_json(path: str | Path, what: str, hint: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist; {hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{what} {path} is not readable JSON ({type(exc).__name__}: {exc}); {hint}") from None


def precision_from_type(text: str | None) -> str:
    """``int8``/``fp16``/``fp32``/``other`` from a weights type (``Int8``) or a ``Format/Datatype`` text."""
    if not text:
        return "other"
    mapped = _WEIGHT_TYPES.get(text.strip().lower())
    if mapped:
        return mapped
    for pattern, precision in _FORMAT_WORDS:
        if pattern.search(text):
            return precision
    return "other"


def onnx_nodes_from_name(name: str) -> list[str]:
    """The ONNX node names in a TensorRT layer name.

    ``"/a/Conv + PWN(PWN(/a/act/Sigmoid), /a/act/Mul) || /b/Conv"`` gives ``["/a/Conv", "/a/act/Sigmoid",
    "/a/act/Mul", "/b/Conv"]``; ``(Unnamed Layer* N) [Shuffle]`` pieces, which are no ONNX node, are dropped.
    """
    nodes = []
    for piece in _NAME_SEPARATORS.split(_NAME_WRAPPERS.sub("", name)):
        piece = piece.strip().rstrip(")").strip()
        if piece and not _UNNAMED.match(piece):
            nodes.append(piece)
    return nodes


def _is_reformat(name: str, layer_type: str) -> bool:
    return layer_type.lower() == "reformat" or "reformat" in name.lower()


def _layer_precision(layer: Mapping[str, Any]) -> str:
    weights = layer.get("Weights")
    if isinstance(weights, Mapping) and weights.get("Type"):
        return precision_from_type(str(weights["Type"]))
    inputs = layer.get("Inputs")
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], Mapping):
        return precision_from_type(inputs[0].get("Format/Datatype"))
    return "other"


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def parse_layer(layer: Mapping[str, Any]) -> EngineLayer:
    """One ``Layers`` entry of a detailed layer-information JSON as an ``EngineLayer``."""
    name = str(layer.get("Name", ""))
    layer_type = str(layer.get("LayerType", ""))
    reformat = _is_reformat(name, layer_type)
    nodes: tuple[str, ...] = ()
    if not reformat:  # a reformat's name quotes the layer it feeds; attributing that layer's nodes to it would be wrong
        metadata = layer.get("Metadata")
        from_metadata = _METADATA_NODE.findall(metadata) if isinstance(metadata, str) else []
        nodes = _unique([*onnx_nodes_from_name(name), *(n.strip() for n in from_metadata)])
    parameter_type = layer.get("ParameterType")
    return EngineLayer(name=name, layer_type=layer_type, precision=_layer_precision(layer), is_reformat=reformat,
                       onnx_nodes=nodes, parameter_type=str(parameter_type) if parameter_type is not None else None)


def parse_layer_info(data: Any, source: str = "layer info") -> list[EngineLayer]:
    """Parse the loaded JSON of ``trtexec --exportLayerInfo`` (see the module docstring).

    Raises:
        InputError: ``data`` is not a detailed layer-information document.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("Layers"), list):
        raise InputError(f"{source} is not TensorRT layer information (a JSON object with a 'Layers' list, as "
                         f"trtexec --exportLayerInfo writes); {REBUILD_HINT}")
    entries = data["Layers"]
    if entries and all(isinstance(entry, str) for entry in entries):
        raise InputError(f"{source} holds layer names only (the engine was built without "
                         f"--profilingVerbosity=detailed), so it has no precisions; {REBUILD_HINT}")
    bad = [i for i, entry in enumerate(entries) if not isinstance(entry, Mapping) or "Name" not in entry]
    if bad:
        raise InputError(f"{source}: Layers[{bad[0]}] is not a layer object with a 'Name' ({len(bad)} such entries); "
                         f"{REBUILD_HINT}")
    layers = [parse_layer(entry) for entry in entries]
    _logger.debug("%s: %d layers", source, len(layers))
    return layers


def read_layer_info(path: str | Path) -> list[EngineLayer]:
    """Read a layer-information JSON written by ``trtexec --exportLayerInfo=FILE --profilingVerbosity=detailed``.

    Raises:
        InputError: the file is missing, not JSON, or not detailed layer information.
    """
    data = _load_json(path, "layer info", REBUILD_HINT)
    return parse_layer_info(data, source=str(path))


# ------------------------------------------------------------------------------------------------ intended precisions
def _normalise_intended(precision: Any) -> str | None:
    text = str(precision).strip().lower()
    if text == "int8":
        return "int8"
    if text in ("float", "fp16", "fp32", "half"):
        return "float"
    return None


def parse_intended(data: Any, source: str = "export info") -> list[dict[str, Any]]:
    """The ``layers`` list of an export sidecar JSON, normalised.

    Each entry has ``name``, ``onnx_node`` (``None`` when the export found no node for the layer), optionally
    ``onnx_nodes`` (every node of a module called more than once), ``op`` and ``precision`` (``int8`` or ``float``;
    ``fp16``/``fp32`` read as ``float``). Returned rows have ``name``, ``onnx_nodes`` (a list, maybe empty), ``op``
    and ``precision``.

    Raises:
        InputError: no ``layers`` list, or an entry that is no object or has an unknown precision.
    """
    entries = data.get("layers") if isinstance(data, Mapping) else data
    if not isinstance(entries, list):
        raise InputError(f"{source} has no 'layers' list; pass the JSON that export_onnx.py writes next to the ONNX "
                         f"(model.json for model.onnx)")
    intended = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not (entry.get("name") or entry.get("onnx_node")):
            raise InputError(f"{source}: layers[{i}] is not a layer record with a 'name'; re-export the model with "
                             f"export_onnx.py")
        name = str(entry.get("name") or entry["onnx_node"])
        precision = _normalise_intended(entry.get("precision"))
        if precision is None:
            raise InputError(f"{source}: layers[{i}] ({name}) has precision {entry.get('precision')!r}; expected one "
                             f"of {', '.join(INTENDED_PRECISIONS)}")
        nodes = entry.get("onnx_nodes") or ([entry["onnx_node"]] if entry.get("onnx_node") else [])
        row = {"name": name, "onnx_nodes": [str(node) for node in nodes], "op": str(entry.get("op") or ""),
               "precision": precision}
        if entry.get("input_scale_node"):
            row["input_scale_node"] = str(entry["input_scale_node"])
        intended.append(row)
    return intended


def read_export_info(path: str | Path) -> list[dict[str, str]]:
    """Read the intended per-layer precisions from the sidecar JSON export_onnx.py writes next to the ONNX.

    Raises:
        InputError: the file is missing, not JSON, or has no valid ``layers`` list.
    """
    data = _load_json(path, "export info", "pass the JSON that export_onnx.py writes next to the ONNX")
    return parse_intended(data, source=str(path))


# ------------------------------------------------------------------------------------------------ comparison
def summarize(layers: Sequence[EngineLayer]) -> dict[str, Any]:
    """Counts of the engine's own: layers, convolutions per precision, reformat layers."""
    conv = [layer for layer in layers if layer.is_conv]
    summary: dict[str, Any] = {"engine_layers": len(layers), "conv_layers": len(conv)}
    for precision in PRECISIONS:
        summary[f"conv_{precision}"] = sum(layer.precision == precision for layer in conv)
    summary["reformat_layers"] = sum(layer.is_reformat for layer in layers)
    return summary


def _index_by_node(layers: Sequence[EngineLayer]) -> dict[str, EngineLayer]:
    """ONNX node name -> the engine layer that runs it; a layer with weights wins over one that only mentions it."""
    index: dict[str, EngineLayer] = {}
    for layer in layers:
        for node in layer.onnx_nodes:
            if node not in index or (layer.is_conv and not index[node].is_conv):
                index[node] = layer
    return index


def _status(intended: str, engine: str) -> str:
    if intended == "int8":
        return "ok" if engine == "int8" else "mismatch"
    return "mismatch" if engine == "int8" else "ok"


def _compare_row(row: Mapping[str, Any], index: Mapping[str, EngineLayer]) -> dict[str, Any]:
    found = [index[node] for node in row["onnx_nodes"] if node in index]
    out = {"name": row["name"], "onnx_node": row["onnx_nodes"][0] if row["onnx_nodes"] else None,
           "intended": row["precision"], "engine": None, "engine_layer": None, "status": "not_found"}
    if found:
        statuses = [_status(row["precision"], layer.precision) for layer in found]
        culprit = found[statuses.index("mismatch")] if "mismatch" in statuses else found[0]
        out.update({"engine": "/".join(_unique(layer.precision for layer in found)), "engine_layer": culprit.name,
                    "status": "mismatch" if "mismatch" in statuses else "ok"})
    if row.get("input_scale_node"):
        out["input_scale"] = _input_scale_status(row["input_scale_node"], index)
    return out


def _input_scale_status(node: str, index: Mapping[str, EngineLayer]) -> str:
    """Where the engine runs an equalization multiply: ``fused`` into a layer with weights (the producing conv's
    epilogue), ``separate`` (a pointwise layer of its own: an extra pass over the tensor) or ``not_found``."""
    layer = index.get(node)
    if layer is None:
        return "not_found"
    return "fused" if layer.is_conv else "separate"


def compare_with_intended(layers: Sequence[EngineLayer], intended: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                          ) -> dict[str, Any]:
    """Check each intended layer against the engine layer(s) that run its ONNX node(s).

    Args:
        layers: from ``read_layer_info``.
        intended: the export sidecar (a dict with ``layers``) or its ``layers`` list.

    Returns:
        ``summarize(layers)`` plus ``intended_layers``, ``matched``, ``mismatch_count``, ``not_found_count``,
        ``layers`` (one row per intended layer: ``name``, ``onnx_node``, ``intended``, ``engine`` precision (``None``
        when not found; ``"int8/fp16"`` when a module called twice runs at two), ``engine_layer``, ``status``
        ok|mismatch|not_found), ``mismatches`` (the mismatched rows: intended int8 running fp16/fp32, or intended
        float running int8) and ``not_found`` (names of layers no engine layer runs, by their ONNX node names).
    """
    index = _index_by_node(layers)
    table = [_compare_row(row, index) for row in parse_intended(intended)]
    mismatches = [row for row in table if row["status"] == "mismatch"]
    not_found = [row["name"] for row in table if row["status"] == "not_found"]
    result = summarize(layers)
    result.update({"intended_layers": len(table), "matched": len(table) - len(not_found),
                   "mismatch_count": len(mismatches), "not_found_count": len(not_found),
                   "layers": table, "mismatches": mismatches, "not_found": not_found})
    scaled = [row for row in table if "input_scale" in row]
    if scaled:
        result["input_scale"] = {status: [row["name"] for row in scaled if row["input_scale"] == status]
                                 for status in ("fused", "separate", "not_found")}
    return result


def format_report(result: Mapping[str, Any]) -> str:
    """A human-readable table (when intended layers were compared) and summary lines."""
    lines = []
    table = result.get("layers") or []
    if table:
        width = max(len("layer"), *(len(row["name"]) for row in table))
        lines.append(f"{'layer':<{width}}  {'intended':<8}  {'engine':<9}  status")
        for row in table:
            lines.append(f"{row['name']:<{width}}  {row['intended']:<8}  {row['engine'] or '-':<9}  {row['status']}")
        lines.append("")
    lines.append(f"engine: {result['engine_layers']} layers, {result['conv_layers']} convolutions: "
                 f"{result['conv_int8']} INT8, {result['conv_fp16']} FP16, {result['conv_fp32']} FP32"
                 + (f", {result['conv_other']} other" if result.get("conv_other") else "")
                 + f"; {result['reformat_layers']} reformat layers")
    if "intended_layers" in result:
        lines.append(f"intended: {result['intended_layers']} layers, {result['matched']} found in the engine, "
                     f"{result['mismatch_count']} at another precision, {result['not_found_count']} not found")
        for row in result["mismatches"]:
            lines.append(f"  mismatch: {row['name']} intended {row['intended']}, runs {row['engine']} "
                         f"in '{row['engine_layer']}'")
        if result["not_found"]:
            lines.append(f"  not found (renamed or inside a Myelin region): {', '.join(result['not_found'])}")
    scale = result.get("input_scale")
    if scale:
        lines.append(f"equalization multiplies: {len(scale['fused'])} fused into a conv, {len(scale['separate'])} "
                     f"run as a layer of their own (an extra pass over the tensor), {len(scale['not_found'])} not "
                     "found")
        for name in scale["separate"]:
            lines.append(f"  unfused multiply before {name}")
    return "\n".join(lines)
