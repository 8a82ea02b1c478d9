"""Summarise a pipeline run (make demo): FP / full-PTQ / partial / ONNX mAP and layer counts in one JSON.

Reads partial_quant.py's report (with --eval-onnx) and the sensitivity report it used; ``--started-at`` (Unix time
the pipeline started, e.g. ``date +%s``) makes ``seconds`` cover the whole pipeline.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# tools/ is not a package: make the repository root importable when run as `python tools/demo_summary.py`.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from utils.cli import ArgumentParser, run_cli, write_json  # noqa: E402
from utils.errors import InputError  # noqa: E402

KEYS = ("fp_map", "ptq_map", "partial_map", "onnx_map", "onnx_max_abs_diff", "int8_layers", "total_layers",
        "float_layers")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--partial-report", required=True, metavar="JSON", help="partial_quant.json")
    parser.add_argument("--started-at", type=float, default=None, metavar="UNIX_TIME",
                        help="when the pipeline started (default: seconds of partial_quant.py only)")
    parser.add_argument("--output", required=True, metavar="JSON", help="summary file to write")
    return parser


def read_report(path: str | Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path} ({type(exc).__name__}); run partial_quant.py first") from None
    missing = [key for key in KEYS if key not in report]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: run partial_quant.py with --eval-onnx (and without "
                         "--no-export)")
    return report


def methods(report: dict[str, Any]) -> dict[str, Any]:
    """Which methods the run used: calibration (auto's choice too), layer ranking and fallback rule."""
    calib = report.get("calibration", {})
    used: dict[str, Any] = {"calibration": calib.get("method", "?"), "fallback": report["rule"]}
    if "auto" in calib:
        used["calibration_auto"] = calib["auto"].get("selected")
    ranking_file = (report.get("args") or {}).get("sensitivity_file")
    if (report.get("args") or {}).get("rerank"):
        used["ranking"] = f"re-ranked during the search by {report['args']['rerank']} (revert direction)"
    elif ranking_file:
        used["ranking"] = str(ranking_file)
        try:
            ranking = json.loads(Path(ranking_file).read_text())
            used["ranking"] = f"{ranking['method']} ({ranking.get('direction', 'single')}): {ranking_file}"
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a text ranking (ours or YOLOv6's): its path says enough
    return used


def main(args: argparse.Namespace) -> dict[str, Any]:
    report = read_report(args.partial_report)
    seconds = time.time() - args.started_at if args.started_at is not None else report["seconds"]
    summary = {key: report[key] for key in KEYS}
    summary.update(onnx_vs_pytorch_map=round(report["onnx_map"] - report["partial_map"], 4),
                   onnx_diff=report.get("onnx_diff"), rule=report["rule"],
                   onnx=report["onnx"], build=report["build"], seconds=round(seconds, 1),
                   methods=methods(report))
    write_json(args.output, summary)
    print(f"summary: {args.output} (pipeline {seconds / 60:.1f} min; "
          + "; ".join(f"{k}: {v}" for k, v in summary["methods"].items()) + ")")
    return summary


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
