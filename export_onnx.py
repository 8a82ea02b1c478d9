"""Export a YOLOv6 checkpoint (official .pt or ours) to ONNX and check it against PyTorch on ONNX Runtime."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from models import load_model
from utils.cli import ArgumentParser, img_size, positive_int, run_cli, write_json
from utils.data import ImageFolderDataset, collate_detection
from utils.errors import InputError
from utils.onnx_export import DEFAULT_OPSET, export_onnx, onnx_output_diff

_logger = logging.getLogger("export_onnx")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--weights", required=True, metavar="FILE", help="YOLOv6 release .pt or our checkpoint")
    parser.add_argument("--output", default=None, metavar="FILE", help="ONNX file (default: weights with .onnx)")
    parser.add_argument("--img-size", type=img_size, default=640, metavar="N", help="square input size")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="fixed batch size")
    batch.add_argument("--dynamic-batch", action="store_true", help="symbolic batch axis")
    parser.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, metavar="N", help="ONNX opset")
    parser.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    parser.add_argument("--verify-images", default=None, metavar="DIR",
                        help="check ONNX Runtime against PyTorch on these images (default: a seeded random batch)")
    parser.add_argument("--box-tolerance", type=float, default=0.05, metavar="PX",
                        help="largest allowed |ONNX - PyTorch| on box coordinates, in pixels")
    parser.add_argument("--score-tolerance", type=float, default=1e-4, metavar="T",
                        help="largest allowed |ONNX - PyTorch| on scores")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def verification_batch(folder: str | None, size: int, batch: int) -> torch.Tensor:
    """Real letterboxed images from ``folder``, else a seeded random batch."""
    if folder is None:
        return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    dataset = ImageFolderDataset(folder, img_size=size, max_images=batch)
    return collate_detection([dataset[i] for i in range(len(dataset))])["image"]


def main(args: argparse.Namespace) -> dict[str, Any]:
    output = Path(args.output or Path(args.weights).with_suffix(".onnx"))
    if output.exists() and not args.overwrite:
        raise InputError(f"{output} exists; pass --overwrite to replace it or choose another --output")
    model = load_model(args.weights, deploy=True)
    export_onnx(model, output, args.img_size, batch_size=args.batch_size, dynamic_batch=args.dynamic_batch,
                opset=args.opset, simplify=not args.no_simplify)
    images = verification_batch(args.verify_images, args.img_size, 2 if args.dynamic_batch else args.batch_size)
    diff = onnx_output_diff(output, model, images)
    _logger.info("ONNX Runtime vs PyTorch on %d image(s): max abs diff %.3g px on boxes, %.3g on scores",
                 len(images), diff["box"], diff["score"])
    if diff["box"] > args.box_tolerance or diff["score"] > args.score_tolerance:
        output.unlink()
        raise InputError(f"ONNX output differs from PyTorch by {diff['box']:.3g} px / {diff['score']:.3g} score "
                         f"(tolerances {args.box_tolerance} / {args.score_tolerance}); the export was removed")
    results = {"onnx": str(output), "img_size": args.img_size, "max_abs_diff": diff}
    write_json(output.with_suffix(".json"), results)
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
