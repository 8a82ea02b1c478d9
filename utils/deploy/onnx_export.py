"""ONNX export (opset 13, input ``images`` [B,3,H,W], output ``outputs`` [B,N,5+nc]) and ONNX Runtime checks."""
from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from utils.errors import InputError
from utils.fileio import atomic_output
from utils.inference.runners import CLASS_NAMES_KEY

_logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "images", "outputs"
DEFAULT_OPSET = 13
CONFIDENT_SCORE = 0.25  # predictions that matter after NMS at deployment thresholds


def _simplify(path: Path) -> None:
    import onnx
    import onnxsim

    simplified, ok = onnxsim.simplify(onnx.load(str(path)))
    if ok:
        onnx.save(simplified, str(path))
    else:
        _logger.warning("onnxsim could not validate the simplified model; keeping the unsimplified export")


def export_onnx(model: torch.nn.Module, path: str | Path, img_size: int | tuple[int, int] = 640,
                batch_size: int = 1, dynamic_batch: bool = False, opset: int = DEFAULT_OPSET,
                simplify: bool = True) -> Path:
    """Export ``model`` (eval mode, on its own device) to ONNX; the file appears only when complete.

    ``dynamic_batch`` makes the batch axis symbolic; otherwise it is fixed to ``batch_size``.
    """
    import onnx

    path = Path(path)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    device = next(model.parameters()).device
    dummy = torch.zeros(batch_size, 3, h, w, device=device)
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with atomic_output(path, suffix=".tmp.onnx") as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python values are expected here
        torch.onnx.export(model.eval(), (dummy,), str(tmp), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
                          do_constant_folding=True)
        if simplify:
            _simplify(tmp)
        onnx.checker.check_model(str(tmp))
    _logger.info("exported %s (opset %d, %s batch)", path, opset, "dynamic" if dynamic_batch else batch_size)
    return path


@torch.no_grad()
def onnx_output_diff(onnx_path: str | Path, model: torch.nn.Module, images: torch.Tensor,
                     conf: float = CONFIDENT_SCORE) -> dict[str, float]:
    """|ONNX Runtime - PyTorch| on ``images``: largest on ``box`` (pixels), ``score`` and ``max`` over all outputs,
    ``mean``, and the largest over confident predictions (PyTorch score >= ``conf``): ``box_confident`` (px),
    ``box_rel_confident`` (fraction of the box's larger side), ``score_confident`` (``confident``: how many)."""
    from utils.inference.runners import OnnxRuntimeRunner

    expected = model.eval()(images.to(next(model.parameters()).device)).float().cpu()
    actual = OnnxRuntimeRunner(onnx_path, optimization="basic")(images)  # the graph as exported, see ORT_LEVELS
    if actual.shape != expected.shape:
        raise InputError(f"{onnx_path}: output shape {tuple(actual.shape)} differs from PyTorch's "
                         f"{tuple(expected.shape)}; re-export the model")
    diff = (actual - expected).abs()
    confident = expected[..., 5:].amax(-1) * expected[..., 4] >= conf
    picked = diff[confident] if confident.any() else diff.new_zeros(1, diff.shape[-1])
    sizes = expected[confident][:, 2:4].amax(-1, keepdim=True).clamp(min=1.0) if confident.any() else 1.0
    return {"box": float(diff[..., :4].max()), "score": float(diff[..., 4:].max()), "max": float(diff.max()),
            "mean": float(diff.mean()), "confident": int(confident.sum()),
            "box_confident": float(picked[:, :4].max()), "score_confident": float(picked[:, 4:].max()),
            "box_rel_confident": float((picked[:, :4] / sizes).max())}


# ------------------------------------------------------------------------------------- verified export + record
# Tolerances of the ONNX Runtime check, (box, score). FP32: px, every prediction. Q/DQ: on confident predictions,
# box error as a fraction of the box's larger side. Bit-exact agreement is impossible for Q/DQ: x / scale (ONNX) and
# x * (1 / scale) (PyTorch) round differently at ties and convolutions sum in another order, so single INT8 levels
# flip and the flips cascade through ~70 quantized layers. Bundled model (2 val images, 54 confident predictions):
# PyTorch's two fake-quant formulas differ by 2.0% / 0.034 score, ONNX Runtime vs fake-quant by 3.1% / 0.084, float
# vs fake-quant by 6.3% / 0.13. Real errors (scales on the wrong axis, wrong amax) are far larger; a missing or
# extra Q/DQ pair is caught by the structural check instead.
TOLERANCES = {"fp32": (0.05, 1e-4), "qdq": (0.15, 0.25)}
FP16_TOLERANCES = {"fp32": (1.0, 1e-2), "qdq": (0.15, 0.25)}


def _module_path(node_name: str) -> str:
    """The module path of a node named by the exporter's scopes: ``/backbone/ERBlock_2/ERBlock_2.0/conv/Conv`` ->
    ``backbone.ERBlock_2.0.conv`` (a Sequential child's scope repeats its parent's name with ``.index``)."""
    parts: list[str] = []
    for segment in node_name.strip("/").split("/")[:-1]:
        if parts and segment.startswith(parts[-1] + "."):
            parts[-1] = segment
        else:
            parts.append(segment)
    return ".".join(parts)


def onnx_layer_nodes(onnx_model: Any, layer_names: Sequence[str]) -> dict[str, list[str]]:
    """The ONNX Conv / ConvTranspose / MaxPool nodes of each quantizable layer (a module called twice has two)."""
    known, nodes = set(layer_names), {name: [] for name in layer_names}
    for node in onnx_model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MaxPool"):
            continue
        path = _module_path(node.name)
        if path not in known:  # a repeated call is scoped ``m_1``, ``m_2``
            path = re.sub(r"_\d+$", "", path)
        if path in known:
            nodes[path].append(node.name)
    return nodes


def layer_records(model: torch.nn.Module, onnx_model: Any) -> list[dict[str, Any]]:
    """Per layer that could run INT8: name, ONNX op and node(s), intended precision (``int8`` / ``float``)."""
    from utils.deploy.onnx_graph import input_scale_muls
    from utils.quant import quantizers as quant

    info = quant.layer_info(model)
    nodes = onnx_layer_nodes(onnx_model, [i["name"] for i in info])
    ops = {n.name: n.op_type for n in onnx_model.graph.node}
    muls = input_scale_muls(onnx_model.graph)
    records = []
    for item in info:
        found = nodes[item["name"]]
        record = {"name": item["name"], "op": ops[found[0]] if found else None,
                  "onnx_node": found[0] if found else None, "onnx_nodes": found,
                  "precision": "int8" if item["quantized"] else "float"}
        if found and found[0] in muls:  # equalized: its input is multiplied per channel before the Q/DQ pair
            record["input_scale_node"] = muls[found[0]]
        records.append(record)
    missing = [r["name"] for r in records if r["onnx_node"] is None]
    if missing:
        _logger.warning("%d layer(s) have no ONNX node of their name (e.g. %s)", len(missing), missing[0])
    return records


def check_diff(diff: dict[str, float], precision: str, tolerances: tuple[float, float], what: str) -> None:
    """Raise InputError when ``diff`` (``onnx_output_diff``) exceeds ``tolerances`` (box px, score)."""
    box_key, score_key = ("box", "score") if precision == "fp32" else ("box_rel_confident", "score_confident")
    box_tolerance, score_tolerance = tolerances
    if diff[box_key] > box_tolerance or diff[score_key] > score_tolerance:
        scope = " by {:.3g} px" if precision == "fp32" else \
            f" on confident predictions (score >= {CONFIDENT_SCORE}) by {{:.3g}} of the box size"
        raise InputError(f"{what} differs from PyTorch{scope.format(diff[box_key])} / {diff[score_key]:.3g} "
                         f"score (tolerances {box_tolerance} / {score_tolerance}); nothing was written")


def check_qdq_structure(record: dict[str, Any]) -> None:
    """Every INT8 layer has its Q/DQ-fed node and every float layer a float one: the graph is the intended one."""
    qdq, layers = record["qdq"], record["layers"]
    int8_convs = sum(r["precision"] == "int8" and r["op"] in ("Conv", "ConvTranspose") for r in layers)
    found = qdq["quantized_conv"] + qdq["quantized_conv_transpose"]
    if found != int8_convs or any(r["onnx_node"] is None for r in layers):
        raise InputError(f"the ONNX has {found} quantized Conv/ConvTranspose nodes but {int8_convs} layers should run "
                         "INT8; the export does not match the model (please report this with the checkpoint)")


def export_verified(model: torch.nn.Module, path: str | Path, images: torch.Tensor, *, img_size: int = 640,
                    batch_size: int = 1, dynamic_batch: bool = False, opset: int = DEFAULT_OPSET,
                    simplify: bool = True, tolerances: tuple[float, float] | None = None, fp16_graph: bool = False,
                    end2end: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export ``model`` (float, or Q/DQ where any quantizer is on), check it on ONNX Runtime against PyTorch
    (fake quantization for Q/DQ) on ``images`` within ``tolerances`` (box px, score; default ``TOLERANCES``) and,
    for Q/DQ, that exactly the INT8 layers have quantized nodes; then optionally type the float regions FP16 and/or
    append TensorRT's EfficientNMS. The file appears only when every check passed.

    Returns:
        The export record: ``onnx``, ``precision`` (``qdq``/``fp32``), ``max_abs_diff``, ``int8_layers``,
        ``total_layers``, ``float_layers``, ``layers`` (per-layer ONNX nodes and intended precision), ``qdq``.

    Raises:
        InputError: ONNX Runtime disagrees with PyTorch beyond the tolerances.
    """
    import onnx

    from utils.deploy import onnx_graph
    from utils.quant import quantizers as quant

    path = Path(path)
    int8, total = quant.count_quantized(model)
    precision = "qdq" if int8 else "fp32"
    context = quant.fb_fake_quant() if int8 else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.is_dir() else None) as folder:
        raw = Path(folder) / "raw.onnx"
        with context:
            export_onnx(model, raw, img_size, batch_size=batch_size, dynamic_batch=dynamic_batch, opset=opset,
                        simplify=simplify)
        diff = onnx_output_diff(raw, model, images)
        check_diff(diff, precision, tolerances or TOLERANCES[precision], f"the {precision} ONNX on ONNX Runtime")
        graph = onnx.load(str(raw))
        record = {"onnx": str(path), "precision": precision, "img_size": img_size,
                  "batch": "dynamic" if dynamic_batch else batch_size, "opset": opset, "max_abs_diff": diff,
                  "verified_images": len(images), "int8_layers": int8, "total_layers": total,
                  "float_layers": quant.float_layers(model) if total else [],
                  "layers": layer_records(model, graph) if total else [], "qdq": onnx_graph.qdq_summary(graph),
                  "fp16_graph": fp16_graph, "end2end": end2end}
        if int8:
            check_qdq_structure(record)
        if fp16_graph:
            graph = onnx_graph.to_fp16_graph(graph)
            onnx.save(graph, str(raw))
            record["max_abs_diff_fp16"] = onnx_output_diff(raw, model, images)
            check_diff(record["max_abs_diff_fp16"], precision, FP16_TOLERANCES[precision],
                       "the FP16-typed ONNX on ONNX Runtime")
        if end2end is not None:
            graph = onnx_graph.add_efficient_nms(graph, **end2end)
        names = config.get("names") if isinstance(config := getattr(model, "config", None), dict) else None
        if names:  # evaluation maps classes to a dataset's categories by these names
            onnx.helper.set_model_props(graph, {CLASS_NAMES_KEY: json.dumps([str(n) for n in names])})
        with atomic_output(path, suffix=".tmp.onnx") as tmp:
            onnx.save(graph, str(tmp))
    _logger.info("%s ONNX %s: %d/%d layers INT8, max |ONNX Runtime - PyTorch| %.3g px boxes, %.3g scores", precision,
                 path, int8, total, diff["box"], diff["score"])
    return record


def verification_batch(folder: str | Path | None, size: int, batch: int) -> torch.Tensor:
    """Real letterboxed images from ``folder`` (the first ``batch``), else a seeded random batch."""
    from utils.data.coco import ImageFolderDataset, collate_detection

    if folder is None:
        return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    dataset = ImageFolderDataset(folder, img_size=size, max_images=batch)
    return collate_detection([dataset[i] for i in range(len(dataset))])["image"]


def build_hint(onnx_path: str | Path) -> str:
    """The command that builds a TensorRT engine from ``onnx_path`` on a GPU machine."""
    return f"./build_engine.sh {onnx_path}"


def trtexec_lines(onnx_path: str | Path, record: dict[str, Any], workspace_mib: int = 4096) -> dict[str, str]:
    """Ready-to-paste trtexec commands for the ONNX that ``export_verified`` wrote with ``record``, as
    build_engine.sh would run them (without its reports): TensorRT 8.4+ and 10 take the precisions as flags
    (``--int8 --fp16`` for Q/DQ; ``--workspace`` is gone in 10, ``--memPoolSize`` replaces it); TensorRT 11 builds
    strongly typed (precisions from the ONNX itself). A dynamic batch gets one optimisation profile at batch 1."""
    engine = Path(onnx_path).with_suffix(".engine")
    common = f"trtexec --onnx={onnx_path} --saveEngine={engine}"
    if record["batch"] == "dynamic":
        size = record["img_size"]
        h, w = (size, size) if isinstance(size, int) else size
        spec = f"{INPUT_NAME}:1x3x{h}x{w}"
        common += f" --minShapes={spec} --optShapes={spec} --maxShapes={spec}"
    flags = "--int8 --fp16" if record["precision"] == "qdq" else "--fp16"
    return {"TensorRT 8.4-10": f"{common} {flags} --memPoolSize=workspace:{workspace_mib}",
            "TensorRT 11": f"{common} --stronglyTyped --memPoolSize=workspace:{workspace_mib}"}
