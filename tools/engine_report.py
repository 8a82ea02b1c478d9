"""Per-layer precision report of a TensorRT engine, checked against the precisions the ONNX export intended.

Reads the layer information that build_engine.sh writes (trtexec --exportLayerInfo with
--profilingVerbosity=detailed) and, optionally, the JSON export_onnx.py writes next to the ONNX.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

# tools/ is not a package: make the repository root importable when run as `python tools/engine_report.py`.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from utils.cli import ArgumentParser, args_dict, run_cli, write_json  # noqa: E402
from utils.deploy.engine_info import (  # noqa: E402
    compare_with_intended,
    format_report,
    read_export_info,
    read_layer_info,
    summarize,
)
from utils.errors import InputError  # noqa: E402

_logger = logging.getLogger("engine_report")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--layer-info", required=True, metavar="FILE",
                        help="engine layer information (model.layers.json from build_engine.sh)")
    inputs.add_argument("--export-info", default=None, metavar="FILE",
                        help="sidecar JSON export_onnx.py wrote next to the ONNX (model.json); without it only the "
                             "engine's own precision counts are reported")
    output = parser.add_argument_group("output")
    output.add_argument("--json", default=None, metavar="FILE", help="write the report (and the arguments) as JSON")
    output.add_argument("--strict", action="store_true",
                        help="exit with code 2 when a layer runs at another precision than intended")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.strict and not args.export_info:
        raise InputError("--strict compares against the intended precisions: pass --export-info FILE as well")
    layers = read_layer_info(args.layer_info)
    if args.export_info:
        result = compare_with_intended(layers, read_export_info(args.export_info))
    else:
        result = summarize(layers)
    print(format_report(result))
    if args.json:
        write_json(args.json, {**result, "args": args_dict(args)})
        _logger.info("wrote %s", args.json)
    if args.strict and result["mismatch_count"]:
        names = ", ".join(row["name"] for row in result["mismatches"])
        raise InputError(f"{result['mismatch_count']} layer(s) run at another precision than intended: {names}")
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
