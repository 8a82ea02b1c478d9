"""COCO mAP of a YOLOv6 model (official .pt, our checkpoint, .onnx on ONNX Runtime or a TensorRT engine) on a
COCO-format dataset."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from utils.cli import (
    ArgumentParser,
    add_device_argument,
    args_dict,
    img_size,
    non_negative_int,
    positive_int,
    resolve_device,
    run_cli,
    unit_interval,
    write_json,
)
from utils.data.coco import CocoDetection, add_letterbox_argument, model_stride
from utils.errors import InputError
from utils.inference.bootstrap import RESAMPLES, format_drop, paired_bootstrap
from utils.inference.evaluate import evaluate, evaluate_predictions
from utils.inference.runners import ENGINE_SUFFIXES, ORT_LEVELS, TorchRunner, create_runner
from utils.quant.calibration import is_calibrated_file, load_calibrated

_logger = logging.getLogger("eval_coco")
DEFAULT_IMG_SIZE = 640


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    model = parser.add_argument_group("model")
    model.add_argument("--weights", required=True, metavar="FILE",
                       help="YOLOv6 release .pt, a checkpoint of this toolkit, an .onnx model, a predictions .json "
                            "(written by --save-json), or a TensorRT "
                            ".engine/.trt/.plan (needs --device cuda:N and requirements-trt.txt). A calibrated "
                            "checkpoint (calibrated.pt, partial.pt, qat.pt) runs as fake-quantized INT8 with its float "
                            "layers, equalization and bias correction (--float: its float function)")
    add_device_argument(model)
    model.add_argument("--ort-optimization", choices=ORT_LEVELS, default="all",
                       help="ONNX models: ONNX Runtime's graph optimisation (basic: Q/DQ run where the export put "
                            "them; all: ORT's default, which removes or moves some Q/DQ pairs and fuses activations "
                            "into convolutions, another INT8 rounding)")
    model.add_argument("--float", action="store_true",
                       help="a calibrated checkpoint: evaluate its float function (every quantizer off)")
    model.add_argument("--half", action="store_true", help="run a PyTorch model in FP16 (CUDA only; an engine "
                       "runs in the precision it was built with)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="JSON", help="COCO annotation file (instances_*.json)")
    data.add_argument("--images", required=True, metavar="DIR", help="folder with the images the JSON names")
    data.add_argument("--img-size", type=img_size, default=None, metavar="N",
                      help=f"letterbox size, a multiple of 32 (default: the ONNX model's or engine's fixed size, "
                           f"else {DEFAULT_IMG_SIZE})")
    add_letterbox_argument(data, default=None, extra_help=". Default: rect for PyTorch checkpoints, square for "
                                                          "fixed-size ONNX models and engines")
    data.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="images per batch")
    data.add_argument("--workers", type=non_negative_int, default=2, metavar="N", help="data-loading processes")
    data.add_argument("--max-images", type=positive_int, default=None, metavar="N",
                      help="evaluate the first N images only (default: all)")
    post = parser.add_argument_group("post-processing (YOLOv6's evaluation defaults)")
    post.add_argument("--conf", type=unit_interval, default=0.03, metavar="T", help="score threshold")
    post.add_argument("--iou", type=unit_interval, default=0.65, metavar="T", help="NMS IoU threshold")
    post.add_argument("--max-det", type=positive_int, default=300, metavar="N", help="detections kept per image")
    cmp = parser.add_argument_group("comparison")
    cmp.add_argument("--baseline", default=None, metavar="FILE",
                     help="another model, or a predictions .json written by --save-json: print the drop of --weights "
                          "against it on the same images with its 95%% interval (paired bootstrap over images)")
    cmp.add_argument("--resamples", type=positive_int, default=RESAMPLES, metavar="N",
                     help="bootstrap resamples of the images (seeded by --seed)")
    cmp.add_argument("--seed", type=non_negative_int, default=0, metavar="N", help="bootstrap seed")
    out = parser.add_argument_group("output")
    out.add_argument("--save-json", default=None, metavar="FILE", help="write COCO-format predictions here")
    out.add_argument("--results", default=None, metavar="FILE", help="write the metrics (and args) as JSON here")
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    out.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def choose_img_size(requested: int | None, fixed_hw: tuple[int, int] | None) -> int:
    """The letterbox size: what the user asked for, which must agree with a model of fixed input size."""
    if fixed_hw is None:
        return requested or DEFAULT_IMG_SIZE
    if fixed_hw[0] != fixed_hw[1]:
        raise InputError(f"the model takes {fixed_hw[0]}x{fixed_hw[1]} inputs; only square inputs are supported: "
                         "re-export (and rebuild) it with a square --img-size")
    if requested is not None and requested != fixed_hw[0]:
        raise InputError(f"the model was exported for {fixed_hw[0]}x{fixed_hw[1]} inputs but --img-size is "
                         f"{requested}; pass --img-size {fixed_hw[0]} or re-export (and rebuild) the model for "
                         f"{requested}")
    return fixed_hw[0]


def choose_letterbox(requested: str | None, fixed_hw: tuple[int, int] | None) -> str:
    """rect (YOLOv6's evaluation) where the model takes any input size, square where its input size is fixed."""
    if requested == "rect" and fixed_hw is not None:
        raise InputError(f"the model takes fixed {fixed_hw[0]}x{fixed_hw[1]} inputs, so it cannot run YOLOv6's "
                         "rectangular canvases: pass --letterbox square (or evaluate the PyTorch checkpoint)")
    return requested or ("square" if fixed_hw is not None else "rect")


def make_runner(args: argparse.Namespace, device: Any) -> Any:
    """A calibrated checkpoint runs fake-quantized (its quantizers as saved, or all off with --float): loaded as a
    plain checkpoint it would run float weights without its equalization multiplies. Anything else: create_runner."""
    if Path(args.weights).suffix.lower() not in (".onnx", *ENGINE_SUFFIXES) and is_calibrated_file(args.weights):
        from utils.quant.quantizers import disable_all

        model = load_calibrated(args.weights)
        if args.float:
            disable_all(model)
        runner = TorchRunner(model, device, args.half)
        runner.name = "pytorch " + ("float" if args.float else "fake-quant int8")
        return runner
    if args.float:
        raise InputError(f"--float applies to calibrated checkpoints; {args.weights} is not one: drop --float")
    return create_runner(args.weights, device, args.half, args.ort_optimization)


def is_predictions_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".json"


def measure(args: argparse.Namespace, weights: str, matches: bool) -> dict[str, Any]:
    """The metrics of one model (or saved predictions file) on the --data images, with how they were measured."""
    if is_predictions_file(weights):
        dataset = CocoDetection(args.data, args.images, img_size=args.img_size or DEFAULT_IMG_SIZE,
                                max_images=args.max_images)
        metrics = evaluate_predictions(weights, dataset)
        return {"weights": str(weights), "backend": "saved predictions", **metrics}
    model_args = argparse.Namespace(**{**vars(args), "weights": weights,
                                       "float": args.float and weights == args.weights})
    # an engine checks its device itself: it needs CUDA, where resolve_device's advice would be --device cpu
    engine = Path(weights).suffix.lower() in ENGINE_SUFFIXES
    runner = make_runner(model_args, args.device if engine else resolve_device(args.device))
    size = choose_img_size(args.img_size, runner.input_hw)
    letterbox = choose_letterbox(args.letterbox, runner.input_hw)
    dataset = CocoDetection(args.data, args.images, img_size=size, max_images=args.max_images, letterbox=letterbox,
                            stride=model_stride(getattr(runner, "model", None)))
    _logger.info("evaluating %s [%s] on %d images at %d px (%s letterbox)", weights, runner.name, len(dataset),
                 size, letterbox)
    save_json = args.save_json if weights == args.weights else None
    metrics = evaluate(runner, dataset, batch_size=args.batch_size, workers=args.workers, conf=args.conf,
                       iou=args.iou, max_det=args.max_det, progress=not args.no_progress, save_json=save_json,
                       matches=matches)
    return {"weights": str(weights), "backend": runner.name, "img_size": size, "letterbox": letterbox, **metrics}


def compare(args: argparse.Namespace, model: dict[str, Any]) -> dict[str, Any]:
    """The drop of --weights against --baseline on the same images, with its paired-bootstrap interval."""
    baseline = measure(args, args.baseline, matches=True)
    result = paired_bootstrap(baseline.pop("matches"), model["matches"], resamples=args.resamples, seed=args.seed)
    print(f"drop vs {args.baseline} ({baseline['mAP50_95']:.4f} / {baseline['mAP50']:.4f}): "
          f"mAP@0.5:0.95 {format_drop(result['mAP50_95'])}  mAP@0.5 {format_drop(result['mAP50'])}  "
          f"({result['level']:.0%} interval, {result['resamples']} paired resamples of {result['images']} images)")
    baseline.pop("summary_text", None)
    return {**result, "baseline": {k: baseline[k] for k in ("weights", "backend", "mAP50_95", "mAP50")}}


def main(args: argparse.Namespace) -> dict[str, Any]:
    if is_predictions_file(args.weights) and (args.float or args.half):
        raise InputError(f"{args.weights} holds saved predictions: --float / --half apply to models; drop them")
    results = measure(args, args.weights, matches=args.baseline is not None)
    print(results.pop("summary_text"))
    geometry = f"{results['letterbox']} letterbox  " if "letterbox" in results else ""
    speed = f"{results['images_per_s']:.1f} img/s" if "images_per_s" in results else "saved predictions"
    print(f"mAP@0.5:0.95 {results['mAP50_95']:.4f}  mAP@0.5 {results['mAP50']:.4f}  images {results['images']}  "
          f"{geometry}{speed}")
    if args.baseline is not None:
        results["compare"] = compare(args, results)
    results.pop("matches", None)
    if args.results:
        write_json(args.results, {**results, "args": args_dict(args)})
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
