"""Export a YOLOv6 model to ONNX (FP32, or Q/DQ INT8 from a calibrated/partial checkpoint), verified on ONNX Runtime.

Input ``images`` [B,3,H,W], output ``outputs`` [B,N,5+nc] as YOLOv6 exports them, opset 13, onnxsim on by default
(Q/DQ kept). A calibrated checkpoint (sensitivity_analyse.py's calibrated.pt, partial_quant.py's partial.pt) gives a
Q/DQ model: per-tensor activation scales, per-channel weight scales on axis 0 (Conv: output channels;
ConvTranspose: input channels, the axis TensorRT's INT8 deconvolution requires).
Writes the .onnx and a .json record beside it (layers INT8/float with their ONNX nodes, for tools/engine_report.py).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from models import load_model
from utils.cli import ArgumentParser, img_size, positive_int, run_cli, unit_interval, write_json
from utils.deploy.onnx_export import (
    DEFAULT_OPSET,
    TOLERANCES,
    build_hint,
    export_verified,
    trtexec_lines,
    verification_batch,
)
from utils.errors import InputError
from utils.fileio import check_output_file
from utils.quant import calibration
from utils.quant import quantizers as quant

_logger = logging.getLogger("export_onnx")
MODES = ("auto", "fp32", "qdq")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--weights", required=True, metavar="FILE",
                        help="YOLOv6 release .pt, our checkpoint, or a calibrated/partial checkpoint")
    parser.add_argument("--output", default=None, metavar="FILE", help="ONNX file (default: weights with .onnx)")
    parser.add_argument("--mode", choices=MODES, default="auto",
                        help="qdq: INT8 Q/DQ (needs a calibrated checkpoint); fp32: the float model; auto: qdq for "
                             "calibrated checkpoints, else fp32")
    parser.add_argument("--img-size", type=img_size, default=640, metavar="N", help="square input size")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="fixed batch size")
    batch.add_argument("--dynamic-batch", action="store_true", help="symbolic batch axis")
    parser.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, metavar="N", help="ONNX opset")
    parser.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    parser.add_argument("--fp16-graph", action="store_true",
                        help="type the float regions FP16 (opset 19 Q/DQ) for TensorRT --stronglyTyped builds")
    e2e = parser.add_argument_group("end-to-end NMS (TensorRT EfficientNMS_TRT plugin; ONNX Runtime cannot run it)")
    e2e.add_argument("--end2end", action="store_true",
                     help="outputs num_dets, det_boxes, det_scores, det_classes instead of raw predictions")
    e2e.add_argument("--max-det", type=positive_int, default=100, metavar="N", help="boxes kept per image")
    e2e.add_argument("--iou-thres", type=unit_interval, default=0.45, metavar="T", help="NMS IoU threshold")
    e2e.add_argument("--conf-thres", type=unit_interval, default=0.25, metavar="T", help="score threshold")
    check = parser.add_argument_group("verification (ONNX Runtime vs PyTorch; fake quantization for Q/DQ)")
    check.add_argument("--verify-images", default=None, metavar="DIR",
                       help="check on these images (default: a seeded random batch)")
    check.add_argument("--box-tolerance", type=float, default=None, metavar="PX",
                       help="largest allowed |ONNX - PyTorch| on box coordinates (default: FP32 0.05 px on every "
                            "prediction; Q/DQ 0.15 of the box size on predictions scoring >= 0.25, see README)")
    check.add_argument("--score-tolerance", type=float, default=None, metavar="T",
                       help="largest allowed |ONNX - PyTorch| on scores (default: FP32 1e-4, Q/DQ 0.25)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def load_export_model(weights: str, mode: str) -> torch.nn.Module:
    """The deployed model to export: quantized (calibrated checkpoints) or float, as ``mode`` asks."""
    calibrated = calibration.is_calibrated_file(weights)
    if mode == "qdq" and not calibrated:
        raise InputError(f"--mode qdq needs a calibrated checkpoint, but {weights} has no quantizer amax: calibrate "
                         "with partial_quant.py (or sensitivity_analyse.py) and export its .pt")
    if not calibrated:
        return load_model(weights, deploy=True)
    model = calibration.load_calibrated(weights)
    if mode == "fp32":
        quant.disable_all(model)
    elif quant.count_quantized(model)[0] == 0:
        raise InputError(f"{weights} has every layer in float, so a Q/DQ export would have no Q/DQ nodes: pass "
                         "--mode fp32, or quantize some layers with partial_quant.py")
    return model


def record_precision(model: torch.nn.Module) -> str:
    return "qdq" if quant.count_quantized(model)[0] else "fp32"


def tolerances(args: argparse.Namespace, precision: str) -> tuple[float, float]:
    """--box-tolerance / --score-tolerance, each defaulting to the precision's own."""
    box, score = TOLERANCES[precision]
    return (box if args.box_tolerance is None else args.box_tolerance,
            score if args.score_tolerance is None else args.score_tolerance)


def main(args: argparse.Namespace) -> dict[str, Any]:
    output = check_output_file(args.output or Path(args.weights).with_suffix(".onnx"), args.overwrite)
    record_path = check_output_file(output.with_suffix(".json"), True)
    model = load_export_model(args.weights, args.mode)
    images = verification_batch(args.verify_images, args.img_size, 2 if args.dynamic_batch else args.batch_size)
    end2end = {"max_det": args.max_det, "iou_threshold": args.iou_thres,
               "score_threshold": args.conf_thres} if args.end2end else None
    record = export_verified(model, output, images, img_size=args.img_size, batch_size=args.batch_size,
                             dynamic_batch=args.dynamic_batch, opset=args.opset, simplify=not args.no_simplify,
                             tolerances=tolerances(args, record_precision(model)),
                             fp16_graph=args.fp16_graph, end2end=end2end)
    record.update(weights=str(args.weights), build=build_hint(output),
                  trtexec=trtexec_lines(output, record))
    write_json(record_path, record)
    print(f"{output}: {record['precision']}, {record['int8_layers']}/{record['total_layers']} layers INT8, "
          f"max |ONNX Runtime - PyTorch| {record['max_abs_diff']['box']:.3g} px / {record['max_abs_diff']['score']:.3g}"
          f" score\nbuild a TensorRT engine on a GPU machine: {record['build']}")
    for version, line in record["trtexec"].items():
        print(f"  or with trtexec ({version}): {line}")
    return {k: v for k, v in record.items() if k not in ("layers", "qdq")}


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
