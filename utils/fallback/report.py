"""The partial-quantization report: search steps, the mAP table printed at the end, the JSON summary."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from utils.fallback.rules import PartialModel
from utils.inference.bootstrap import ImageMatches, format_drop, paired_bootstrap, rounded_drop


def format_steps(steps: Sequence[dict[str, Any]]) -> str:
    """One line per search step, for the log and the report."""
    lines = [f"{'step':>4} {'action':<11} {'mAP50:95':>9} {'drop':>8} {'float':>5}  layer"]
    for i, s in enumerate(steps):
        lines.append(f"{i:>4} {s['action']:<11} {s['map']:>9.4f} {s['drop']:>8.4f} {s['float_layers']:>5}  "
                     f"{s['layer'] or '-'}")
    return "\n".join(lines)


def summary(fp_map: float | None, ptq_map: float | None, partial_map: float | None, model: PartialModel,
            choice: dict[str, Any], calibration: dict[str, Any], args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The partial-quantization report (mAP50:95 in PyTorch; fake quantization for PTQ and partial; None: not
    measured, when no evaluation set was given)."""
    int8, total = model.counts()
    measured = None not in (fp_map, ptq_map, partial_map)
    return {"fp_map": fp_map, "ptq_map": ptq_map, "partial_map": partial_map,
            "ptq_drop": fp_map - ptq_map if measured else None,
            "partial_drop": fp_map - partial_map if measured else None, "int8_layers": int8, "total_layers": total,
            "float_layers": list(model.float_set), "rule": choice["rule"], "steps": choice.get("steps", []),
            "sharing": model.sharing, "calibration": calibration, "args": args or {}}


def drop_intervals(matches: Mapping[str, ImageMatches], letterbox: Mapping[str, str],
                   seed: int = 0) -> dict[str, Any]:
    """Each report-set row's drop with its 95 % paired-bootstrap interval over the report images, from the float row
    (``fp``, ``fp_<geometry>``) measured on the same canvases (``letterbox``: each row's geometry)."""
    floats = {letterbox[row]: row for row in matches if row == "fp" or row.startswith("fp_")}
    out = {}
    for row, other in matches.items():
        if row not in floats.values() and letterbox[row] in floats:
            result = paired_bootstrap(matches[floats[letterbox[row]]], other, seed=seed)
            out[row] = {metric: rounded_drop(result, metric) for metric in ("mAP50_95", "mAP50")}
            out[row].update(resamples=result["resamples"], level=result["level"])
    return out


def _interval(report: dict[str, Any], row: str) -> str:
    d = (report.get("intervals") or {}).get(row, {}).get("mAP50_95")
    return f"  [{d['low']:.4f}, {d['high']:.4f}]" if d else ""


def describe_calibration(record: dict[str, Any]) -> str:
    """One line: calibrator and what was done around it (equalization, bias correction)."""
    method = record.get("method", "?")
    text = f"{method} {record['percentile']:g}" if "percentile" in record else str(method)
    eq = (record.get("transform") or {}).get("equalize")
    if eq and eq.get("layers"):
        text += (f", inputs of {eq['layers']} {'/'.join(eq['kinds'])} convs equalized (alpha {eq['alpha']:g}, "
                 f"range p{eq['percentile']:g}; {eq['folded']} folded into their producer, {eq['multiplies']} "
                 f"as a multiply)")
    if (record.get("transform") or {}).get("bias_correction"):
        text += f", bias corrected on {record['transform']['bias_correction']['layers']} layers"
    return text + (f" ({record['source']})" if record.get("source") not in (None, "calibrated") else "")


def format_summary(report: dict[str, Any]) -> str:
    """The table printed at the end of partial_quant.py."""
    fp = report["fp_map"]
    lines = []
    search = report.get("search")
    if report.get("steps"):
        where = "the report set" if not search or search["same_as_report"] else \
            f"the search set, {search['images']} ({search['num_images']} images)"
        lines += [f"search steps (mAP50:95 on {where})", format_steps(report["steps"]), ""]
    if search and search["same_as_report"]:
        lines.append("note: the search measured on the report set, so the partial mAP below is optimistic")
    if fp is None:
        lines.append(f"mAP not measured (no --data/--images): python eval_coco.py --weights {report['checkpoint']} "
                     "--data <annotations.json> --images <folder> measures the partial model")
    else:
        lines += [f"{'model':<26} {'mAP50:95':>9} {'drop':>8}  95 % interval of the drop (paired bootstrap)",
                  f"{'float (PyTorch)':<26} {fp:>9.4f} {0:>8.4f}",
                  f"{'full PTQ (fake-quant)':<26} {report['ptq_map']:>9.4f} {fp - report['ptq_map']:>8.4f}"
                  f"{_interval(report, 'ptq')}",
                  f"{'partial (fake-quant)':<26} {report['partial_map']:>9.4f} {fp - report['partial_map']:>8.4f}"
                  f"{_interval(report, 'partial')}"]
    if "fp_square_map" in report:  # the ONNX runs square canvases: its drop is from the float model run so
        lines.append(f"{'float (PyTorch, square)':<26} {report['fp_square_map']:>9.4f} {0:>8.4f}")
    if "onnx_map" in report:
        reference = report.get("fp_square_map", fp)
        lines.append(f"{'partial Q/DQ ONNX (ORT)':<26} {report['onnx_map']:>9.4f} "
                     f"{reference - report['onnx_map']:>8.4f}{_interval(report, 'onnx')}")
    if report.get("letterbox"):
        lines.append(f"mAP on {report['letterbox']} canvases"
                     + (" (the ONNX on square: its input size is fixed)" if "fp_square_map" in report else ""))
    if search and "drop_interval" in search:
        lines.append(f"search set drop {format_drop(search['drop_interval'])} ({search['num_images']} images, "
                     f"stop on {search.get('stop_on', 'point')}); predicted on the report set: "
                     f"[{search['predicted_report_interval']['low']:.4f}, "
                     f"{search['predicted_report_interval']['high']:.4f}]")
    lines.append(f"INT8 layers {report['int8_layers']}/{report['total_layers']} ({report['rule']}); float: "
                 f"{', '.join(report['float_layers']) or 'none'}")
    lines.append(f"calibration: {describe_calibration(report.get('calibration') or {})}")
    if "onnx" in report:
        lines.append(f"ONNX: {report['onnx']} (max |ORT - PyTorch| {report['onnx_max_abs_diff']:.3g})")
        lines.append(f"build the TensorRT engine on a GPU machine: {report['build']}")
        for version, line in report.get("trtexec", {}).items():
            lines.append(f"  or with trtexec ({version}): {line}")
    return "\n".join(lines)
