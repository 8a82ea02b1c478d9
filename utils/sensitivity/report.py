"""Sensitivity reports: the ranking as YOLOv6's text format, JSON, CSV, a PNG chart and a table; reading rankings.

The text format is YOLOv6's ``quant_sensitivity_save`` (``<layer> <v1> <v2>`` per line); proxy files and revert
rankings start with a ``# metric:`` comment naming the column that ranks (and ``direction: revert`` for rankings
measured by returning one layer to float). ``read_ranking`` reads those and our JSON, most sensitive first.
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.cli import write_json
from utils.errors import InputError
from utils.fileio import atomic_output, atomic_write_text
from utils.sensitivity.metrics import (
    COLUMNS,
    DIRECTIONS,
    VALUE_FORMAT,
    higher_is_less_sensitive,
    key_column,
    ranking_name,
    sensitivity_order,
)

_HEADER_RE = re.compile(r"^#\s*metric:\s*(\w+)")
_DIRECTION_RE = re.compile(r"^#.*\bdirection:\s*(\w+)")


def build_report(header: dict[str, Any], records: dict[str, dict[str, Any]],
                 baselines: dict[str, dict[str, float]], args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rows in model order (name, type, shape, params, values, rank; rank 1 = most sensitive) + run metadata."""
    method, direction = header["method"], header.get("direction", "single")
    key = key_column(method)
    rows = []
    for info in header["layers"]:
        record = records[info["name"]]
        rows.append({"name": info["name"], "type": info.get("type"), "shape": info.get("weight_shape"),
                     "params": info.get("params"), **record["values"], "seconds": record.get("seconds")})
    for rank, i in enumerate(sensitivity_order([row[key] for row in rows], method, direction), 1):
        rows[i]["rank"] = rank
    return {"method": method, "direction": direction, "metric": key,
            "higher_is_less_sensitive": higher_is_less_sensitive(method, direction),
            "columns": list(COLUMNS[method]), "model": header["model"], "calibration": header["calibration"],
            "img_size": header["img_size"], "data": header["data"], "baselines": baselines, "layers": rows,
            "args": args or {}}


def format_sensitivity(rows: Sequence[dict[str, Any]], method: str, direction: str = "single") -> str:
    """The text ranking: ``<layer> <v1> <v2>`` per line in model order, as YOLOv6's quant_sensitivity_save writes
    (mAP50 / mAP50:95, 4 decimals, no header for ``map`` quantized one layer at a time); proxy files and revert
    rankings start with a ``# metric:`` comment."""
    first, second = COLUMNS[method]
    fmt = VALUE_FORMAT[method]
    lines = []
    if method != "map" or direction != "single":
        better = "higher" if higher_is_less_sensitive(method, direction) else "lower"
        lines.append(f"# metric: {second} ({better} = less sensitive; columns: layer {first} {second}; "
                     f"ranked by {second}; direction: {direction})")
    lines += [f"{row['name']} {fmt.format(row[first])} {fmt.format(row[second])}" for row in rows]
    return "\n".join(lines) + "\n"


def parse_sensitivity(text: str, source: str = "sensitivity file") -> tuple[list[tuple[str, float, float]], str]:
    """Rows (layer, value1, value2) in file order and the metric (``mAP50_95`` for header-less seed files)."""
    metric, rows = "mAP50_95", []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            match = _HEADER_RE.match(stripped)
            if match:
                metric = match[1]
            continue
        fields = stripped.split()
        try:
            if len(fields) != 3:
                raise ValueError
            rows.append((fields[0], float(fields[1]), float(fields[2])))
        except ValueError:
            raise InputError(f"{source} line {number}: expected '<layer> <value> <value>', got {stripped[:80]!r}"
                             ) from None
    return rows, metric


def ranking_direction(text: str) -> str:
    """The direction a text ranking was measured in: ``revert`` if its comment says so, else ``single``."""
    for line in text.splitlines():
        match = _DIRECTION_RE.match(line.strip())
        if match:
            return match[1]
    return "single"


def read_sensitivity(path: str | Path) -> tuple[list[tuple[str, float, float]], str]:
    """Read a ranking file written by ``write_reports`` or by YOLOv6's partial_quantization tools."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"sensitivity file {path} not found; write one with sensitivity_analyse.py")
    return parse_sensitivity(path.read_text(), str(path))


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in row.items()})
    return buffer.getvalue()


def _plot(path: Path, report: dict[str, Any]) -> Path:
    """Horizontal bars of the ranking metric, most sensitive at the top (Agg, written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sorted(report["layers"], key=lambda r: r["rank"])
    key = report["metric"]
    fig = Figure(figsize=(10, max(3.0, 0.22 * len(rows) + 1.2)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(range(len(rows)), [r[key] for r in rows], color="tab:red")
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    better = "higher" if report["higher_is_less_sensitive"] else "lower"
    what = "only this layer back in float" if report.get("direction") == "revert" else "only this layer quantized"
    ax.set_xlabel(f"{key} with {what} ({better} = less sensitive)")
    for name, values in report["baselines"].items():
        if key in values:
            ax.axvline(values[key], ls="--", lw=1, color="k" if name == "fp" else "tab:blue", label=name)
    if report["baselines"]:
        ax.legend(loc="lower right")
    ax.set_title(f"quantization sensitivity ({ranking_name(report['method'], report.get('direction', 'single'))}),"
                 " most sensitive first")
    fig.tight_layout()
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, metadata={"Software": None})
    return path


def report_paths(output: str | Path, method: str, direction: str = "single") -> dict[str, Path]:
    stem = Path(output) / f"sensitivity_{ranking_name(method, direction)}"
    return {kind: stem.with_suffix(f".{kind}") for kind in ("txt", "json", "csv", "png")}


def write_reports(output: str | Path, report: dict[str, Any], plot: bool = True) -> dict[str, Path]:
    """Text ranking, JSON, CSV (and a PNG chart) under ``output``, each written atomically."""
    direction = report.get("direction", "single")
    paths = report_paths(output, report["method"], direction)
    atomic_write_text(paths["txt"], format_sensitivity(report["layers"], report["method"], direction))
    write_json(paths["json"], report)
    atomic_write_text(paths["csv"], _csv_text(report["layers"]))
    if plot:
        _plot(paths["png"], report)
    else:
        paths.pop("png")
    return paths


def format_table(report: dict[str, Any], top: int | None = None) -> str:
    """The layers most sensitive first, as a fixed-width table for humans."""
    method, (first, second) = report["method"], COLUMNS[report["method"]]
    fmt = VALUE_FORMAT[method]
    rows = sorted(report["layers"], key=lambda r: r["rank"])[:top]
    width = max([len("layer")] + [len(r["name"]) for r in rows])
    lines = [f"{'rank':>4}  {'layer':<{width}}  {first:>14}  {second:>14}  type"]
    lines += [f"{r['rank']:>4}  {r['name']:<{width}}  {fmt.format(r[first]):>14}  {fmt.format(r[second]):>14}  "
              f"{r['type']}" for r in rows]
    for name, values in report["baselines"].items():
        if first in values and second in values:
            lines.append(f"{'':>4}  {'[' + name + ']':<{width}}  {fmt.format(values[first]):>14}  "
                         f"{fmt.format(values[second]):>14}")
    return "\n".join(lines)


def _metric_method(metric: str, source: str) -> str:
    for method, columns in COLUMNS.items():
        if metric in columns:
            return method
    raise InputError(f"{source}: unknown metric {metric!r} in its '# metric:' line; write the file with "
                     "sensitivity_analyse.py")


def _ranking_from_json(path: Path) -> list[str]:
    try:
        report = json.loads(path.read_text())
        rows = sorted(report["layers"], key=lambda row: int(row["rank"]))
        return [str(row["name"]) for row in rows]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{path} is not a sensitivity report: pass the .json or .txt that sensitivity_analyse.py "
                         "wrote (or YOLOv6's text file)") from None


def read_ranking(path: str | Path) -> list[str]:
    """Layer names from most to least sensitive, from our JSON report or a text ranking (ours or YOLOv6's)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"sensitivity file {path} not found; write one with sensitivity_analyse.py")
    if path.suffix.lower() == ".json":
        order = _ranking_from_json(path)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"sensitivity file {path} is not text (a binary file?): pass the .txt or .json ranking "
                             "sensitivity_analyse.py wrote") from None
        rows, metric = parse_sensitivity(text, str(path))
        method = _metric_method(metric, str(path))
        column = COLUMNS[method].index(metric) + 1
        direction = ranking_direction(text)
        if direction not in DIRECTIONS:
            raise InputError(f"{path}: unknown direction {direction!r} in its '# metric:' line; write the file with "
                             "sensitivity_analyse.py")
        order = [rows[i][0] for i in sensitivity_order([row[column] for row in rows], method, direction)]
    if not order:
        raise InputError(f"sensitivity file {path} lists no layers; run sensitivity_analyse.py again")
    duplicates = sorted({name for name in order if order.count(name) > 1})
    if duplicates:
        raise InputError(f"sensitivity file {path} lists {duplicates[0]!r} more than once; pass a single ranking")
    return order
