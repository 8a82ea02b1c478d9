"""Partial INT8 quantization of a YOLOv6 model: keep the most sensitive layers in float, quantize the rest, export.

Reads a sensitivity ranking (sensitivity_analyse.py's .json/.txt or YOLOv6's text file) and picks the float layers:
--skip-layers N (the N most sensitive), --quant-boundary K (YOLOv6's rule: ranking sorted least -> most sensitive,
indices 0..K inclusive are quantized, i.e. K+1 layers) or --target-drop D (automatic: most sensitive first until the
mAP drop is <= D, then a revert pass). Input amax are shared where TensorRT needs one scale (Concat, MaxPool, convs
reading one tensor; traced from the model). Prints FP / full-PTQ / partial mAP, writes partial.pt, the Q/DQ ONNX
(verified on ONNX Runtime against PyTorch) and partial_quant.json in --output-dir.

--target-drop chooses layers by re-measuring mAP: give it its own labelled images (--search-data/--search-images,
e.g. training images) so that the mAP reported on --data/--images is not tuned to the report set. With --rerank PROXY
it needs no ranking file: after each layer goes float it re-ranks the remaining INT8 layers by the label-free proxy
(returning each to float on the current partial model, on --proxy-images images of --data-root) and measures mAP
only to find where the budget is met (1, 2, 4, ... float layers, then bisection), then runs the revert pass.
The search stops on the measured drop (--stop-on point) or on the upper end of its 95 % interval (upper), and
states the chosen model's search-set drop with its interval and the interval that predicts on the report set.
Every mAP is measured in YOLOv6's rect geometry (--letterbox).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch

from models import load_model
from utils.cli import (
    ArgumentParser,
    add_device_argument,
    args_dict,
    img_size,
    non_negative_int,
    positive_int,
    resolve_device,
    run_cli,
    write_json,
)
from utils.data.calibration import calibration_loader, proxy_batches
from utils.data.coco import CocoDetection, add_letterbox_argument, model_stride
from utils.deploy.onnx_export import build_hint, export_verified, trtexec_lines, verification_batch
from utils.errors import InputError
from utils.fallback.measure import DEFAULT_STOP, STOP_RULES, EvalSettings, Measurer
from utils.fallback.report import drop_intervals, format_summary, summary
from utils.fallback.rerank import GreedyOrder, search_rerank
from utils.fallback.rules import PartialModel, check_ranking, choose_float_layers
from utils.fileio import check_output_file
from utils.inference.evaluate import evaluate
from utils.inference.runners import OnnxRuntimeRunner
from utils.quant import calibration
from utils.quant import quantizers as quant
from utils.quant.calibration import calibrated_model
from utils.quant.equalize import TransformSettings, add_transform_arguments
from utils.sensitivity.metrics import PROXY_METHODS
from utils.sensitivity.probes import ProxyProbe
from utils.sensitivity.report import read_ranking

_logger = logging.getLogger("partial_quant")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    model = parser.add_argument_group("model")
    model.add_argument("--weights", required=True, metavar="FILE", help="YOLOv6 release .pt or our checkpoint")
    model.add_argument("--calib-weights", default=None, metavar="FILE",
                       help="calibrated checkpoint of these weights (e.g. sensitivity_analyse.py's calibrated.pt); "
                            "without it the model is calibrated here on --data-root")
    add_device_argument(model)
    model.add_argument("--seed", type=int, default=0, metavar="S", help="random seed")
    cal = parser.add_argument_group("calibration (first batch-size x batch-number images of --data-root, sorted)")
    cal.add_argument("--data-root", default=None, metavar="DIR", help="calibration image folder")
    cal.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="images per batch")
    cal.add_argument("--batch-number", type=positive_int, default=4, metavar="N", help="calibration batches")
    cal.add_argument("--calib-method", choices=quant.METHODS, default=None,
                     help="amax calibration (default: max; auto: each quantizer's best of max / percentile / entropy "
                          "/ mse, chosen by the head output's error against float)")
    cal.add_argument("--percentile", type=float, default=99.99, metavar="P", help="for --calib-method percentile")
    cal.add_argument("--entropy-stride", type=positive_int, default=1, metavar="K",
                     help="entropy / auto: try every K-th histogram bin as the entropy amax (1: every bin, as YOLOv6; "
                          "4: calibrates about 4x faster, auto's choice barely changes)")
    add_transform_arguments(cal)
    cal.add_argument("--img-size", type=img_size, default=640, metavar="N", help="letterbox size")
    cal.add_argument("--workers", type=non_negative_int, default=2, metavar="N", help="data-loading processes")
    ev = parser.add_argument_group("evaluation (COCO mAP50:95; optional with --skip-layers / --quant-boundary)")
    ev.add_argument("--data", default=None, metavar="JSON",
                    help="COCO annotations (without them the partial model and its ONNX are written, mAP unmeasured)")
    ev.add_argument("--images", default=None, metavar="DIR", help="images of --data")
    ev.add_argument("--max-images", type=positive_int, default=None, metavar="N", help="first N images only")
    add_letterbox_argument(ev, extra_help=" (the search set's too; --eval-onnx runs the fixed-size ONNX and a float "
                                          "reference for its drop on square canvases)")
    fb = parser.add_argument_group("float fallback (exactly one of --skip-layers, --quant-boundary, --target-drop)")
    fb.add_argument("--sensitivity-file", default=None, metavar="FILE",
                    help="ranking (.json or .txt); not used with --rerank")
    rule = fb.add_mutually_exclusive_group(required=True)
    rule.add_argument("--skip-layers", type=non_negative_int, metavar="N", help="the N most sensitive stay float")
    rule.add_argument("--quant-boundary", type=non_negative_int, metavar="K",
                      help="YOLOv6's rule: indices 0..K (K+1 layers) of the least-to-most sensitive list are INT8")
    rule.add_argument("--target-drop", type=float, metavar="D", help="largest allowed mAP50:95 drop, e.g. 0.003")
    fb.add_argument("--stop-on", choices=STOP_RULES, default=DEFAULT_STOP,
                    help="--target-drop: what must be <= D on the search set: point, the measured drop; upper, the "
                         "upper end of its 95 %% paired-bootstrap interval over the search images (stricter, at the "
                         "cost of INT8 layers: on the real Lite-S it changed nothing on 343 images at D 0.005 and "
                         "sent 40+ layers float on 100; README, 'Does the search's drop hold on val?'). Either way "
                         "the summary states the drop's interval and the interval it predicts on --data")
    fb.add_argument("--max-float-layers", type=non_negative_int, default=None, metavar="N",
                    help="--target-drop: at most N float layers (default: the whole ranking)")
    fb.add_argument("--no-revert", action="store_true", help="--target-drop: skip the revert pass")
    fb.add_argument("--rerank", choices=PROXY_METHODS, default=None,
                    help="--target-drop: re-rank the INT8 layers by this proxy after every float layer (no ranking "
                         "file; needs --data-root for the proxy's images)")
    fb.add_argument("--rerank-pool", type=positive_int, default=24, metavar="N",
                    help="--rerank: layers re-scored per step (the N best by their last score)")
    fb.add_argument("--proxy-images", type=positive_int, default=32, metavar="N",
                    help="--rerank: calibration images the proxy compares outputs on")
    fb.add_argument("--search-data", default=None, metavar="JSON",
                    help="--target-drop: COCO annotations the search measures on (default: --data, which makes the "
                         "reported mAP optimistic)")
    fb.add_argument("--search-images", default=None, metavar="DIR", help="images of --search-data")
    fb.add_argument("--search-max-images", type=positive_int, default=None, metavar="N",
                    help="--target-drop: search on the first N images of the search set only")
    ex = parser.add_argument_group("export")
    ex.add_argument("--export-batch-size", type=positive_int, default=None, metavar="N",
                    help="fixed batch of the ONNX (default: dynamic batch)")
    ex.add_argument("--no-export", action="store_true", help="stop after partial.pt")
    ex.add_argument("--fp16-graph", action="store_true", help="float regions typed FP16 (TensorRT --stronglyTyped)")
    ex.add_argument("--eval-onnx", action="store_true",
                    help="also measure the ONNX's mAP on ONNX Runtime, Q/DQ run as the graph says (basic "
                         "optimisation; slow on CPU: Q/DQ runs emulated)")
    parser.add_argument("--output-dir", default=None, metavar="DIR", help="default: runs/partial/<weights stem>")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def output_paths(args: argparse.Namespace) -> dict[str, Path]:
    """Every file this run writes, checked before the slow part (exists -> --overwrite; folder writable)."""
    out = Path(args.output_dir or Path("runs", "partial", Path(args.weights).stem))
    suffix = f"bs{args.export_batch_size}" if args.export_batch_size else "dynamic"
    paths = {"checkpoint": out / "partial.pt", "report": out / "partial_quant.json"}
    if not args.no_export:
        paths["onnx"] = out / f"{Path(args.weights).stem}_partial_{suffix}.onnx"
        paths["onnx_record"] = paths["onnx"].with_suffix(".json")
    return {kind: check_output_file(path, args.overwrite, "--output-dir") for kind, path in paths.items()}


def check_args(args: argparse.Namespace) -> None:
    if (args.data is None) != (args.images is None):
        raise InputError("pass --data and --images together (annotations and their image folder)")
    if args.data is None and args.target_drop is not None:
        raise InputError("--target-drop measures mAP after every change: pass --data JSON and --images DIR (and "
                         "--search-data/--search-images to search on other labelled images)")
    if args.data is None and args.eval_onnx:
        raise InputError("--eval-onnx measures mAP: pass --data JSON and --images DIR, or drop --eval-onnx")
    if args.data is None and args.max_images is not None:
        raise InputError("--max-images limits the evaluation: pass --data JSON and --images DIR, or drop it")
    if args.target_drop is not None and not 0 <= args.target_drop <= 1:
        raise InputError(f"--target-drop must be between 0 and 1 (mAP is a fraction), got {args.target_drop}")
    if args.max_float_layers is not None and args.target_drop is None:
        raise InputError("--max-float-layers applies to --target-drop only")
    if not args.calib_weights and not args.data_root:
        raise InputError("pass --data-root DIR with calibration images, or --calib-weights FILE")
    if (args.search_data is None) != (args.search_images is None):
        raise InputError("pass --search-data and --search-images together (annotations and their image folder)")
    if args.target_drop is None and (args.search_data or args.search_max_images):
        raise InputError("--search-data / --search-max-images apply to --target-drop only")
    if args.rerank and args.target_drop is None:
        raise InputError("--rerank applies to --target-drop only")
    if args.rerank and args.sensitivity_file:
        raise InputError("--rerank ranks the layers itself: drop --sensitivity-file")
    if args.rerank and not args.data_root:
        raise InputError("--rerank compares outputs on calibration images: pass --data-root DIR")
    if not args.rerank and not args.sensitivity_file:
        raise InputError("pass --sensitivity-file FILE (a ranking from sensitivity_analyse.py), or --target-drop "
                         "with --rerank PROXY")


def report_set(args: argparse.Namespace, stride: int, letterbox: str | None = None) -> CocoDetection | None:
    """The --data images every reported mAP is measured on (None without --data), in --letterbox geometry."""
    if args.data is None:
        return None
    return CocoDetection(args.data, args.images, img_size=args.img_size, max_images=args.max_images,
                         letterbox=letterbox or args.letterbox, stride=stride)


def search_set(args: argparse.Namespace, report_set: CocoDetection) -> CocoDetection:
    """The labelled images the --target-drop search measures on: its own set, or (with a warning) the report set."""
    stride = report_set.stride
    if args.search_data is not None:
        return CocoDetection(args.search_data, args.search_images, img_size=args.img_size,
                             max_images=args.search_max_images, letterbox=args.letterbox, stride=stride)
    if args.target_drop is not None:
        _logger.warning("--target-drop searches on the report set (--data): the partial mAP it reports is optimistic; "
                        "pass --search-data/--search-images (e.g. labelled training images) to keep them apart")
    if args.search_max_images is not None:
        return CocoDetection(args.data, args.images, img_size=args.img_size, max_images=args.search_max_images,
                             letterbox=args.letterbox, stride=stride)
    return report_set


def search_record(args: argparse.Namespace, dataset: CocoDetection, same: bool, maps: dict[str, float]) -> dict:
    """Where the search measured, and what it saw there (partial_quant.json's "search")."""
    return {"data": str(args.search_data or args.data), "images": str(args.search_images or args.images),
            "num_images": len(dataset), "same_as_report": same, **maps}


def calibrated(args: argparse.Namespace, model: torch.nn.Module,
               device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    loader = None if args.calib_weights else calibration_loader(
        args.data_root, args.img_size, args.batch_size, args.batch_number, args.workers)
    return calibrated_model(model, calib_weights=args.calib_weights,
                            loader=loader, batch_number=args.batch_number, calib_method=args.calib_method,
                            percentile=args.percentile, device=device,
                            entropy_stride=args.entropy_stride, transform=TransformSettings.from_args(args))


def rerank_choice(args: argparse.Namespace, model: PartialModel, qmodel: torch.nn.Module, device: torch.device,
                  measure: Any, fp_map: float, log_step: Any) -> dict[str, Any]:
    """--target-drop with --rerank: the proxy-greedy float set (utils.fallback.rerank)."""
    batches, _ = proxy_batches(args.data_root, args.img_size, args.proxy_images, args.batch_size, args.workers)
    probe = ProxyProbe(qmodel, batches, args.rerank, device, direction="revert", apply_float=model.set_float,
                       coupled=model.coupled(), progress=not args.no_progress)
    order = GreedyOrder(probe, model.layers, args.rerank_pool,
                        on_step=lambda s: _logger.info("re-ranked %3d: %s (%s gain %.4f, %d probes)",
                                                       s["float_layers"], s["layer"], args.rerank, s["proxy"],
                                                       s["probes"]))
    result = search_rerank(order, measure, fp_map, args.target_drop, max_float=args.max_float_layers,
                           revert=not args.no_revert, on_step=log_step)
    _logger.info("re-ranking search: %d mAP evaluations, %d proxy probes", result["evaluations"], result["probes"])
    return {"rule": f"target-drop {args.target_drop} (re-ranked by {args.rerank})", **result}


def export_partial(args: argparse.Namespace, qmodel: torch.nn.Module, paths: dict[str, Path]) -> dict[str, Any]:
    """The verified Q/DQ ONNX and its record; returns the report's export fields."""
    batch = args.export_batch_size
    images = verification_batch(args.images or args.data_root, args.img_size, batch or 2)
    record = export_verified(qmodel, paths["onnx"], images, img_size=args.img_size, batch_size=batch or 1,
                             dynamic_batch=batch is None, fp16_graph=args.fp16_graph)
    record.update(weights=str(paths["checkpoint"]), build=build_hint(paths["onnx"]),
                  trtexec=trtexec_lines(paths["onnx"], record))
    write_json(paths["onnx_record"], record)
    return {"onnx": str(paths["onnx"]), "onnx_max_abs_diff": record["max_abs_diff"]["max"],
            "onnx_diff": record["max_abs_diff"], "build": record["build"], "trtexec": record["trtexec"]}


def write_unmeasured(args: argparse.Namespace, paths: dict[str, Path], qmodel: torch.nn.Module,
                     model: PartialModel, calib: dict[str, Any], order: list[str], start: float) -> dict[str, Any]:
    """No --data: the rule's float set, partial.pt and the verified ONNX, with mAP recorded as not measured."""
    choice = choose_float_layers(model, order, skip_layers=args.skip_layers, quant_boundary=args.quant_boundary)
    model.set_float(choice["float_layers"])
    calibration.save_calibrated(paths["checkpoint"], qmodel,
                                meta={"weights": str(args.weights), "rule": choice["rule"]})
    report = summary(None, None, None, model, choice, calib, args_dict(args))
    report["map_measured"] = False
    if not args.no_export:
        report.update(export_partial(args, qmodel, paths))
    report.update(checkpoint=str(paths["checkpoint"]), seconds=round(time.perf_counter() - start, 2))
    write_json(paths["report"], report)
    print(format_summary(report))
    return {k: v for k, v in report.items() if k not in ("steps", "sharing", "args")}


def main(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    check_args(args)
    paths = output_paths(args)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    float_model = load_model(args.weights, deploy=True)
    reporting = report_set(args, model_stride(float_model))
    searching = None if reporting is None else search_set(args, reporting)
    qmodel, calib = calibrated(args, float_model, device)
    model = PartialModel(qmodel)
    order: list[str] = []
    if not args.rerank:
        order = read_ranking(args.sensitivity_file)
        check_ranking(order, model.layers, str(args.sensitivity_file))
    if reporting is None:  # --skip-layers / --quant-boundary need no evaluation
        return write_unmeasured(args, paths, qmodel, model, calib, order, start)
    measure = Measurer(model, qmodel, device, searching,
                       EvalSettings(args.batch_size, args.workers, not args.no_progress, args.seed, args.stop_on))
    fp_map, ptq_map = measure.row("fp", list(model.layers), reporting), measure.row("ptq", [], reporting)
    _logger.info("FP mAP50:95 %.4f, full PTQ %.4f (drop %.4f) [%s letterbox]", fp_map, ptq_map, fp_map - ptq_map,
                 args.letterbox)
    same = searching is reporting
    search_maps = {"fp_map": fp_map, "ptq_map": ptq_map}
    if args.target_drop is not None and not same:
        search_maps = {"fp_map": measure.search_float(), "ptq_map": measure.search_ptq()}
        _logger.info("search set: FP mAP50:95 %.4f, full PTQ %.4f", search_maps["fp_map"], search_maps["ptq_map"])
    log_step = lambda s: _logger.info("%-11s %-55s mAP50:95 %.4f drop %.4f (%d float)",  # noqa: E731
                                      s["action"], s["layer"] or "-", s["map"], s["drop"], s["float_layers"])
    if args.rerank:
        choice = rerank_choice(args, model, qmodel, device, measure, search_maps["fp_map"], log_step)
    else:
        choice = choose_float_layers(
            model, order, skip_layers=args.skip_layers, quant_boundary=args.quant_boundary,
            target_drop=args.target_drop, measure=measure, fp_map=search_maps["fp_map"],
            max_float=args.max_float_layers, revert=not args.no_revert, on_step=log_step)
    search_interval = None
    if args.target_drop is not None:
        search_interval = measure.search_interval(choice["float_layers"], len(reporting))
        search_maps["partial_map"] = search_maps["fp_map"] - search_interval["drop_interval"]["drop"]
    partial_map = measure.row("partial", choice["float_layers"], reporting)
    calibration.save_calibrated(paths["checkpoint"], qmodel,
                                meta={"weights": str(args.weights), "rule": choice["rule"]})
    report = summary(fp_map, ptq_map, partial_map, model, choice, calib, args_dict(args))
    report["letterbox"] = args.letterbox
    if args.target_drop is not None:
        report["search"] = search_record(args, searching, same, search_maps)
        report["search"].update({k: choice[k] for k in ("evaluations", "probes", "sequence") if k in choice},
                                stop_on=args.stop_on, **search_interval)
    if not args.no_export:
        report.update(export_partial(args, qmodel, paths))
        if args.eval_onnx:
            report.update(evaluate_onnx(args, paths["onnx"], measure, reporting))
    report["map50"] = measure.map50
    report["intervals"] = drop_intervals(measure.matches, measure.letterbox, args.seed)
    report.update(checkpoint=str(paths["checkpoint"]), seconds=round(time.perf_counter() - start, 2))
    write_json(paths["report"], report)
    print(format_summary(report))
    return {k: v for k, v in report.items() if k not in ("steps", "sharing", "args", "search")}


def evaluate_onnx(args: argparse.Namespace, onnx: Path, measure: Measurer, reporting: CocoDetection) -> dict:
    """The ONNX's mAP on ONNX Runtime, Q/DQ as the graph says. Its input size is fixed, so it runs square canvases;
    in rect geometry the float model is measured square too ("fp_square"), the reference of the ONNX's drop."""
    square = reporting if reporting.letterbox == "square" else report_set(args, reporting.stride, "square")
    metrics = evaluate(OnnxRuntimeRunner(onnx, optimization="basic"), square, args.batch_size, args.workers,
                       progress=not args.no_progress, matches=True)
    measure.record("onnx", metrics, square.letterbox)
    out = {"onnx_map": metrics["mAP50_95"], "onnx_letterbox": "square"}
    if square is not reporting:
        out["fp_square_map"] = measure.row("fp_square", list(measure.model.layers), square)
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
