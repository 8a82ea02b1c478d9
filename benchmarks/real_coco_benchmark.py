"""The seed's method and ours side by side on real data: float, full INT8 per calibrator, partial quantization both
ways, their Q/DQ ONNX, and how well each label-free proxy agrees with per-layer mAP in each direction.

For one checkpoint and real labelled sets (ranking and search on the train set, every reported mAP on the val set):

1. float mAP;
2. full INT8 mAP for each calibrator (max, percentile 99.9 / 99.99 / 99.999, entropy, mse, and auto: each
   quantizer's best of them), calibrated on the first --calib-images train images; and each again with input
   equalization (--equalize, optionally --bias-correction: utils.quant.equalize);
3. the seed's partial quantization (YOLOv6's tools/partial_quantization): rank every layer by the mAP of the model
   with that layer alone quantized (sensitivity_analyse.py --method map on the train set), then partial_quant.py
   --target-drop on the train set (float layers added most sensitive first, then the revert pass), calibrated with
   --partial-calibrator; and the same ranking with as many float layers as ours kept (--skip-layers);
4. ours: --method-calibrator calibration (auto), then partial_quant.py --target-drop --rerank PROXY on the train
   set (no ranking stage: the search re-ranks by the proxy on the current partial model); and the same search from
   the equalized calibration;
5. each partial model's Q/DQ ONNX, verified against PyTorch and evaluated on ONNX Runtime (a failed verification
   is reported in its row, and the ONNX is still evaluated);
6. quantization-aware fine-tuning (unless --no-qat): train.py --qat (self-distillation on the train images, no
   labels) of the full INT8 model (--method-calibrator) and of our partial model, plain and equalized
   (--qat-from), with their Q/DQ ONNX on ONNX Runtime;
7. proxy quality (unless --no-proxy-quality): every layer ranked by map and by each proxy, in both directions
   (single: quantize the layer alone; revert: return it alone to float from full INT8), on the seed's calibration;
   Spearman's rho and top-10 overlap of each proxy against map, map's split-half reliability (its ranking on the
   even against the odd train images) and the seconds per layer;

with the wall time of every stage. Prints the tables and writes them as JSON. Long stages keep their progress under
--output-dir: rerunning the same command resumes the per-layer rankings, and reuses a finished partial search or
fine-tuning whose arguments and input calibration are unchanged.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# benchmarks/ is not a package: make the repository root importable when run as a script.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import torch  # noqa: E402

import partial_quant  # noqa: E402
import sensitivity_analyse  # noqa: E402
import train  # noqa: E402
from models import load_model  # noqa: E402
from utils.cli import (  # noqa: E402
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
from utils.data.calibration import calibration_loader  # noqa: E402
from utils.data.coco import CocoDetection, add_letterbox_argument, model_stride  # noqa: E402
from utils.deploy.onnx_export import export_verified, verification_batch  # noqa: E402
from utils.errors import InputError  # noqa: E402
from utils.fallback.measure import DEFAULT_STOP, STOP_RULES  # noqa: E402
from utils.fileio import ensure_folder  # noqa: E402
from utils.inference.bootstrap import DropBootstrap, format_drop, rounded_drop  # noqa: E402
from utils.inference.evaluate import evaluate, evaluate_predictions  # noqa: E402
from utils.inference.runners import OnnxRuntimeRunner, TorchRunner  # noqa: E402
from utils.quant import calibration  # noqa: E402
from utils.quant.equalize import CHOICES as EQUALIZE_CHOICES  # noqa: E402
from utils.quant.equalize import RANGE_PERCENTILE, TransformSettings  # noqa: E402
from utils.sensitivity.agreement import sensitivity_scores, spearman, top_k_overlap  # noqa: E402
from utils.sensitivity.metrics import DIRECTIONS, PROXY_METHODS, key_column  # noqa: E402

_logger = logging.getLogger("real_coco_benchmark")
SHARED = _REPO_ROOT.parent / "shared" / "fixtures"
DEFAULTS = {"weights": SHARED / "yolov6lite-coco" / "yolov6lite_s_coco_fused.pt",
            "val_data": SHARED / "coco-real" / "instances_val.json", "val_images": SHARED / "coco-real" / "val",
            "train_data": SHARED / "coco-real" / "instances_train.json", "train_images": SHARED / "coco-real" / "train",
            "unlabelled_images": SHARED / "coco-unlabelled" / "images"}
# name -> (calibration method, percentile)
CALIBRATORS = {"max": ("max", None), "percentile-99.9": ("percentile", 99.9),
               "percentile-99.99": ("percentile", 99.99), "percentile-99.999": ("percentile", 99.999),
               "entropy": ("entropy", None), "mse": ("mse", None), "auto": ("auto", None)}


QAT_STARTS = ("full", "ours", "full-eq", "ours-eq")  # full INT8 / our partial model, plain or equalized


def _default(key: str) -> str | None:
    """The ../shared fixture path where it exists (this repository's CI and developers), else None (required)."""
    return str(DEFAULTS[key]) if DEFAULTS[key].exists() else None


def add_real_set_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint, device, report / choice sets and calibration arguments of the real-data benchmarks."""
    model = parser.add_argument_group("model")
    model.add_argument("--weights", default=_default("weights"), metavar="FILE",
                       help="YOLOv6 checkpoint (default: ../shared's real YOLOv6Lite-S when present)")
    add_device_argument(model)
    data = parser.add_argument_group("data (defaults: ../shared/fixtures/coco-real when present)")
    data.add_argument("--val-data", default=_default("val_data"), metavar="JSON", help="report set annotations")
    data.add_argument("--val-images", default=_default("val_images"), metavar="DIR", help="report set images")
    data.add_argument("--train-data", default=_default("train_data"), metavar="JSON",
                      help="ranking / search set annotations")
    data.add_argument("--train-images", default=_default("train_images"), metavar="DIR",
                      help="ranking / search / calibration images")
    data.add_argument("--unlabelled-images", default=_default("unlabelled_images"), metavar="DIR",
                      help="images of the label-free stages: calibration, proxies, fine-tuning (default: "
                           "../shared's coco-unlabelled when present, else --train-images)")
    data.add_argument("--img-size", type=img_size, default=320, metavar="N", help="letterbox size")
    add_letterbox_argument(data, extra_help=" (Q/DQ ONNX rows run square: their input size is fixed; their drop is "
                                            "from the float model on square canvases)")
    data.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="images per batch")
    data.add_argument("--calib-images", type=positive_int, default=128, metavar="N",
                      help="calibrate on the first N --unlabelled-images (a multiple of --batch-size is used whole)")
    data.add_argument("--workers", type=non_negative_int, default=2, metavar="N", help="data-loading processes")


def check_real_sets(args: argparse.Namespace) -> None:
    args.unlabelled_images = args.unlabelled_images or args.train_images
    missing = [f"--{k.replace('_', '-')}" for k in ("weights", "val_data", "val_images", "train_data",
                                                     "train_images") if getattr(args, k) is None]
    if missing:
        raise InputError(f"pass {', '.join(missing)}: ../shared/fixtures is not beside this repository, so there "
                         "are no default real sets")


def add_output_arguments(group: argparse._ArgumentGroup, default_dir: str, what: str) -> None:
    """--output-dir (``what`` it keeps; rerun to resume), --json, --no-progress and --verbose of a benchmark."""
    group.add_argument("--output-dir", default=default_dir, metavar="DIR", help=f"{what} (rerun to resume)")
    group.add_argument("--json", default=None, metavar="FILE", help="write the table as JSON here")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--verbose", action="store_true", help="debug logging")


def check_target_drop(args: argparse.Namespace) -> None:
    if not 0 <= args.target_drop <= 1:
        raise InputError(f"--target-drop must be between 0 and 1 (mAP is a fraction), got {args.target_drop}")


def start_run(args: argparse.Namespace) -> tuple[torch.device, Path]:
    """The device and the (created) output folder of a benchmark run, seeded so that runs repeat."""
    device = resolve_device(args.device)
    torch.manual_seed(0)
    out = Path(args.output_dir)
    ensure_folder(out)
    return device, out


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    add_real_set_arguments(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--calibrators", nargs="+", choices=list(CALIBRATORS), default=list(CALIBRATORS), metavar="C",
                     help=f"full-INT8 rows ({', '.join(CALIBRATORS)})")
    run.add_argument("--partial-calibrator", choices=list(CALIBRATORS), default="entropy",
                     help="calibration of the seed's partial quantization")
    run.add_argument("--target-drop", type=float, default=0.005, metavar="D",
                     help="the partial quantization budget of both methods (mAP50:95 drop on the train set)")
    run.add_argument("--seed-from", choices=("plain", "eq"), default="plain",
                     help="the seed's ranking and search start from the plain or the equalized --partial-calibrator "
                          "calibration")
    run.add_argument("--stop-on", choices=STOP_RULES, default=DEFAULT_STOP,
                     help="both searches' rule (see partial_quant.py --stop-on)")
    run.add_argument("--method-calibrator", choices=list(CALIBRATORS), default="auto",
                     help="calibration of our partial quantization")
    run.add_argument("--auto-entropy-stride", type=positive_int, default=4, metavar="K",
                     help="the auto calibrator's entropy candidate tries every K-th histogram bin (1: every bin; "
                          "see partial_quant.py --entropy-stride)")
    run.add_argument("--rerank", choices=PROXY_METHODS, default="sqnr", help="our search's re-ranking proxy")
    run.add_argument("--rerank-pool", type=positive_int, default=24, metavar="N", help="see partial_quant.py")
    run.add_argument("--proxy-images", type=positive_int, default=32, metavar="N",
                     help="train images every proxy compares outputs on")
    run.add_argument("--equalize", choices=EQUALIZE_CHOICES, default="depthwise",
                     help="the equalized rows' --equalize (none: no equalized rows): every --calibrators row again "
                          "with it, ours from the equalized --method-calibrator calibration, QAT from it")
    run.add_argument("--equalize-alpha", type=float, default=1.0, metavar="A", help="see partial_quant.py")
    run.add_argument("--equalize-percentile", type=float, default=RANGE_PERCENTILE, metavar="P",
                     help="see partial_quant.py")
    run.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=False,
                     help="the equalized rows also correct biases")
    run.add_argument("--no-seed", action="store_true",
                     help="skip the seed's ranking and search (over an hour on 2 cores) and its rows")
    run.add_argument("--ours-from", nargs="+", choices=("plain", "eq"), default=["plain", "eq"], metavar="S",
                     help="our search from the plain and/or the equalized --method-calibrator calibration")
    run.add_argument("--qat-from", nargs="+", choices=QAT_STARTS, default=list(QAT_STARTS), metavar="S",
                     help=f"fine-tuning rows: from which models ({', '.join(QAT_STARTS)}; eq ones need --equalize)")
    run.add_argument("--qat-epochs", type=positive_int, default=20, metavar="N", help="fine-tuning epochs")
    run.add_argument("--qat-lr", type=float, default=1e-4, metavar="LR", help="fine-tuning learning rate (AdamW)")
    run.add_argument("--qat-learn-amax", action=argparse.BooleanOptionalAction, default=True,
                     help="fine-tuning also learns the input amax")
    run.add_argument("--no-qat", action="store_true", help="skip the fine-tuning rows")
    run.add_argument("--no-proxy-quality", action="store_true",
                     help="skip the proxy-vs-map tables (the map ranking in the revert direction takes ~30 min)")
    run.add_argument("--layers", nargs="+", default=None, metavar="PATTERN",
                     help="rank only these layers (globs; default: all): for quick checks")
    run.add_argument("--no-onnx", action="store_true", help="skip the Q/DQ ONNX export and its evaluation")
    add_output_arguments(run, "runs/real_benchmark", "calibrations, ranking progress, partial model and ONNX")
    return parser


def check_args(args: argparse.Namespace) -> None:
    check_real_sets(args)
    check_target_drop(args)
    equalized(args)  # bad --equalize-alpha / --equalize-percentile: one line before anything runs


def _maps(metrics: dict[str, Any]) -> dict[str, float]:
    return {"mAP50_95": round(float(metrics["mAP50_95"]), 4), "mAP50": round(float(metrics["mAP50"]), 4)}


def _calibration_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a full-INT8 row depends on: a finished row with the same settings is reused on a rerun."""
    return {"weights": str(args.weights), "calib_folder": str(args.unlabelled_images), "val_data": str(args.val_data),
            "img_size": args.img_size, "batch_size": args.batch_size, "calib_images": args.calib_images,
            "letterbox": args.letterbox}


def _finished_rows(out: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads((out / "rows_so_far.json").read_text())
    except (OSError, ValueError):
        return {}


def equalized(args: argparse.Namespace) -> TransformSettings | None:
    """The equalized rows' transform (None: no equalized rows)."""
    if args.equalize == "none" and not args.bias_correction:
        return None
    return TransformSettings(args.equalize, args.equalize_alpha, args.equalize_percentile,
                                         args.bias_correction)


def eq_label(args: argparse.Namespace) -> str:
    parts = [] if args.equalize == "none" else [f"eq {args.equalize}" + (f" a{args.equalize_alpha:g}"
                                                                       if args.equalize_alpha != 1 else "")]
    return " + ".join(parts + (["bias corr."] if args.bias_correction else []))


def _calibration_variants(args: argparse.Namespace) -> list[tuple[str, str, TransformSettings | None]]:
    """(row name, calibrator, transform) of every full-INT8 row and saved calibration, plain rows first."""
    names = list(dict.fromkeys(args.calibrators + [args.partial_calibrator, args.method_calibrator]))
    variants = [(f"int8 {name}", name, None) for name in names]
    transform = equalized(args)
    if transform is not None:
        eq_names = list(dict.fromkeys(args.calibrators + [args.method_calibrator] +
                                      ([args.partial_calibrator] if args.seed_from == "eq" else [])))
        variants += [(f"int8 {name} + {eq_label(args)}", name, transform) for name in eq_names]
    return variants


def calibrated_path(out: Path, name: str, eq: bool = False) -> Path:
    return out / f"calibrated_{name}{'_eq' if eq else ''}.pt"


def seed_calibration(args: argparse.Namespace, out: Path) -> Path:
    """The calibration the seed's ranking and search start from (--partial-calibrator, --seed-from)."""
    return calibrated_path(out, args.partial_calibrator, args.seed_from == "eq")


def ranking_folder(args: argparse.Namespace, out: Path) -> Path:
    return out / ("ranking_eq" if args.seed_from == "eq" else "ranking")


def full_int8_rows(args: argparse.Namespace, val: CocoDetection, device: torch.device,
                   out: Path) -> dict[str, dict[str, Any]]:
    """Every calibrator's full-INT8 mAP on val, plain and equalized; the calibrations that later stages start from
    are saved. Rows finished by an earlier run with the same settings (and their saved calibration) are reused."""
    batch_number = max(1, args.calib_images // args.batch_size)
    loader = calibration_loader(args.unlabelled_images, args.img_size, args.batch_size, batch_number, args.workers)
    rows, finished, settings = {}, _finished_rows(out), _calibration_settings(args)
    for row_name, name, transform in _calibration_variants(args):
        method, percentile = CALIBRATORS[name]
        stride = args.auto_entropy_stride if method == "auto" else 1
        row_settings = {**settings, "entropy_stride": stride} if stride != 1 else settings
        if transform is not None:
            row_settings = {**row_settings, "transform": dataclasses.asdict(transform)}
        saved = calibrated_path(out, name, transform is not None)
        previous = finished.get(row_name, {})
        needed = name == args.method_calibrator or \
            (name == args.partial_calibrator and (transform is not None) == (args.seed_from == "eq"))
        if previous.get("settings") == row_settings and (not needed or saved.is_file()) and \
                (name not in args.calibrators or "mAP50_95" in previous):
            _logger.info("%s: reusing the finished row", row_name)
            rows[row_name] = previous
            continue
        start = time.perf_counter()
        qmodel, record = calibration.calibrated_model(load_model(args.weights), loader=loader,
                                                      batch_number=batch_number, calib_method=method,
                                                      percentile=percentile or 99.99, device=device,
                                                      entropy_stride=stride, transform=transform)
        calib_seconds = time.perf_counter() - start
        if needed:
            calibration.save_calibrated(saved, qmodel, meta={"weights": str(args.weights)})
        row: dict[str, Any] = {"calibration_s": round(calib_seconds, 1), "settings": row_settings}
        if "auto" in record:
            row["auto"] = {"selected": record["auto"]["selected"], "counts": record["auto"]["counts"]}
        if "transform" in record:
            row["transform"] = record["transform"]
        if name in args.calibrators:
            predictions = predictions_file(out, row_name)
            metrics = evaluate(TorchRunner(qmodel, device), val, args.batch_size, args.workers,
                               progress=not args.no_progress, save_json=predictions)
            row.update(_maps(metrics), predictions=str(predictions), letterbox=val.letterbox)
            _logger.info("%s: mAP50:95 %.4f", row_name, metrics["mAP50_95"])
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows[row_name] = row
        write_json(out / "rows_so_far.json", {**finished, **rows})
    return rows


def _common(args: argparse.Namespace) -> list[str]:
    argv = ["--weights", str(args.weights), "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
            "--workers", str(args.workers), "--device", args.device, "--letterbox", args.letterbox]
    return argv + (["--no-progress"] if args.no_progress else [])


def rank(args: argparse.Namespace, out: Path, method: str = "map", direction: str = "single") -> dict[str, Any]:
    """sensitivity_analyse.py on the train set with the seed's calibration (resumable): its JSON report."""
    argv = [*_common(args), "--calib-weights", str(seed_calibration(args, out)), "--method", method,
            "--direction", direction, "--output", str(ranking_folder(args, out)), "--resume"]
    if method == "map":
        argv += ["--data", str(args.train_data), "--images", str(args.train_images)]
    else:
        argv += ["--data-root", str(args.unlabelled_images), "--proxy-images", str(args.proxy_images)]
    argv += ["--layers", *args.layers] if args.layers else []
    result = sensitivity_analyse.main(sensitivity_analyse.get_args_parser().parse_args(argv))
    report = json.loads(Path(result["json"]).read_text())
    report["path"] = result["json"]
    return report


def _amax_hash(calibrated: str | Path) -> str | None:
    """The amax hash of a calibrated checkpoint (None when it cannot be read)."""
    try:
        return calibration.amax_sha256(calibration.load_calibrated(calibrated))
    except (OSError, InputError):
        return None


def _run_or_reuse(folder: Path, argv: list[str], report_name: str, calibrated: str | Path,
                  recorded_hash: Callable[[dict[str, Any]], str | None],
                  run: Callable[[list[str]], Any]) -> dict[str, Any]:
    """``run(argv)`` into ``folder`` and its JSON report ``report_name``, unless a finished run had the same
    arguments and the amax it started from (``recorded_hash`` of its report) are still those of ``calibrated`` (a
    recalibration rewrites the file under the same name); a search or fine-tuning can take most of an hour."""
    record, report = folder / "benchmark_argv.json", folder / report_name
    if record.is_file() and report.is_file() and json.loads(record.read_text()) == argv:
        now = _amax_hash(calibrated)
        if now is not None and recorded_hash(json.loads(report.read_text())) == now:
            _logger.info("reusing %s (same arguments)", report)
            return json.loads(report.read_text())
    run(argv)
    write_json(record, argv)
    return json.loads(report.read_text())


def run_partial(folder: Path, argv: list[str]) -> dict[str, Any]:
    """partial_quant.py with ``argv`` into ``folder`` (its partial_quant.json), or its finished run reused."""
    argv = [*argv, "--output-dir", str(folder), "--overwrite", "--no-export"]  # exported by partial_onnx_row
    return _run_or_reuse(folder, argv, "partial_quant.json", argv[argv.index("--calib-weights") + 1],
                         lambda report: report.get("calibration", {}).get("amax_sha256"),
                         lambda a: partial_quant.main(partial_quant.get_args_parser().parse_args(a)))


def _search_sets(args: argparse.Namespace, stop_on: str | None = None) -> list[str]:
    return ["--data", str(args.val_data), "--images", str(args.val_images), "--search-data", str(args.train_data),
            "--search-images", str(args.train_images), "--stop-on", stop_on or args.stop_on]


def export_partial_onnx(args: argparse.Namespace, folder: Path, partial: dict[str, Any]) -> tuple[Any, dict]:
    """The partial model (``partial["checkpoint"]``) and its Q/DQ ONNX in ``folder``, verified against PyTorch. When
    the verification fails at its default tolerances the ONNX is written anyway (tolerances lifted) so its mAP is
    still measured, and the record says so: the failure is a result, not a reason to lose the table."""
    qmodel = calibration.load_calibrated(partial["checkpoint"])
    images = verification_batch(args.val_images, args.img_size, 2)
    path = folder / "partial_qdq.onnx"
    try:
        record = {**export_verified(qmodel, path, images, img_size=args.img_size, dynamic_batch=True),
                  "verified": True}
    except InputError as exc:
        _logger.warning("ONNX verification failed (%s): exported unchecked to measure its mAP", exc)
        record = {**export_verified(qmodel, path, images, img_size=args.img_size, dynamic_batch=True,
                                    tolerances=(float("inf"), float("inf"))),
                  "verified": False, "verification_error": str(exc)}
    return qmodel, record


def partial_onnx_row(args: argparse.Namespace, folder: Path, val: CocoDetection, partial: dict[str, Any],
                     device: torch.device) -> dict:
    """The partial model's Q/DQ ONNX (``export_partial_onnx``) and its mAP on ONNX Runtime on ``val`` (square
    canvases: the ONNX's input size is fixed), beside the PyTorch model's on the same canvases."""
    qmodel, record = export_partial_onnx(args, folder, partial)
    pytorch = float(evaluate(TorchRunner(qmodel, device), val, args.batch_size, args.workers,
                             progress=not args.no_progress)["mAP50_95"])
    path = Path(record["onnx"])
    row: dict[str, Any] = {"int8_layers": partial["int8_layers"], "total_layers": partial["total_layers"],
                           "verified": record["verified"]}
    if not record["verified"]:
        row["verification_error"] = record["verification_error"]
    start = time.perf_counter()
    metrics = evaluate(OnnxRuntimeRunner(path, optimization="basic"), val, args.batch_size, args.workers,
                       progress=not args.no_progress, save_json=folder / "onnx_predictions.json")
    row.update(_maps(metrics), onnx=str(path), predictions=str(folder / "onnx_predictions.json"),
               letterbox=val.letterbox, max_abs_diff=record["max_abs_diff"],
               pytorch_mAP50_95=round(pytorch, 4), minus_pytorch=round(float(metrics["mAP50_95"]) - pytorch, 4),
               seconds=round(time.perf_counter() - start, 1))
    kernels = evaluate(OnnxRuntimeRunner(path, optimization="all"), val, args.batch_size, args.workers,
                       progress=not args.no_progress)  # ORT's default level: another rounding, for comparison
    row.update(ort_int8_kernels_mAP50_95=round(float(kernels["mAP50_95"]), 4),
               ort_int8_kernels_minus_pytorch=round(float(kernels["mAP50_95"]) - pytorch, 4))
    return row


def _partial_row(partial: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"mAP50_95": round(partial["partial_map"], 4), "mAP50": round(partial["map50"]["partial"], 4),
            "int8_layers": partial["int8_layers"], "total_layers": partial["total_layers"],
            "float_layers": partial["float_layers"], "search_drop": round(partial["search"]["fp_map"]
                                                                          - partial["search"]["partial_map"], 4)
            if "partial_map" in partial.get("search", {}) else None,
            **({"drop_interval": partial["intervals"]["partial"]["mAP50_95"]} if "intervals" in partial else {}),
            **extra}


def seed_search_argv(args: argparse.Namespace, out: Path, ranking: str | Path, stop_on: str | None = None) -> list[str]:
    """partial_quant.py's arguments for the seed's search: its ranking, --target-drop on the train set."""
    return [*_common(args), "--calib-weights", str(seed_calibration(args, out)), "--sensitivity-file", str(ranking),
            "--target-drop", str(args.target_drop), *_search_sets(args, stop_on)]


def our_search_argv(args: argparse.Namespace, out: Path, eq: bool, stop_on: str | None = None) -> list[str]:
    """partial_quant.py's arguments for ours: --rerank by the proxy on the unlabelled images, --target-drop on the
    train set, from the --method-calibrator calibration (``eq``: the equalized one)."""
    return [*_common(args), "--calib-weights", str(calibrated_path(out, args.method_calibrator, eq)), "--data-root",
            str(args.unlabelled_images), "--rerank", args.rerank, "--rerank-pool", str(args.rerank_pool),
            "--proxy-images", str(args.proxy_images), "--target-drop", str(args.target_drop),
            *_search_sets(args, stop_on)]


def seed_rows(args: argparse.Namespace, out: Path) -> tuple[dict[str, dict], dict[str, Any]]:
    """The seed's ranking (timed) and search; returns its rows and its partial report."""
    start = time.perf_counter()
    ranking = rank(args, out)
    ranking_seconds = sum(row.get("seconds") or 0.0 for row in ranking["layers"])
    ranking_wall = time.perf_counter() - start
    partial = run_partial(out / "partial", seed_search_argv(args, out, ranking["path"]))
    eq = f" + {eq_label(args)}" if args.seed_from == "eq" else ""
    name = f"seed partial ({args.partial_calibrator}{eq}, drop {args.target_drop}, stop on {args.stop_on})"
    rows = {name: _partial_row(partial, ranking_s=round(max(ranking_seconds, ranking_wall), 1),
                               search_s=partial["seconds"], evaluations=len(partial["steps"]))}
    _logger.info("seed partial: %s", rows[name])
    return rows, partial


def our_rows(args: argparse.Namespace, out: Path, rows: dict[str, dict],
             eq: bool = False) -> tuple[dict[str, dict], dict[str, Any]]:
    """Ours: the re-ranking search from the --method-calibrator calibration (``eq``: the equalized one)."""
    partial = run_partial(out / ("ours_eq" if eq else "ours"), our_search_argv(args, out, eq))
    calibrated_row = f"int8 {args.method_calibrator}" + (f" + {eq_label(args)}" if eq else "")
    calib_s = rows[calibrated_row]["calibration_s"]
    name = f"ours ({args.method_calibrator}{' + ' + eq_label(args) if eq else ''}, re-ranked by {args.rerank}, " \
           f"drop {args.target_drop}, stop on {args.stop_on})"
    search = partial["search"]
    row = _partial_row(partial, calibration_s=calib_s, search_s=partial["seconds"],
                       total_min=round((calib_s + partial["seconds"]) / 60, 1),
                       evaluations=search.get("evaluations"), probes=search.get("probes"))
    return {name: row}, partial


def same_count_row(args: argparse.Namespace, out: Path, n_float: int) -> dict[str, dict]:
    """The seed's ranking with as many float layers as ours kept (--skip-layers N)."""
    ranking = ranking_folder(args, out) / "sensitivity_map.json"
    partial = run_partial(out / f"seed_skip{n_float}", [*_common(args), "--calib-weights",
                                                       str(seed_calibration(args, out)),
                                                       "--sensitivity-file", str(ranking), "--skip-layers",
                                                       str(n_float), "--data", str(args.val_data), "--images",
                                                       str(args.val_images)])
    return {f"seed ranking, {n_float} most sensitive float": _partial_row(partial, search_s=partial["seconds"])}


def run_qat(args: argparse.Namespace, folder: Path, weights: Path) -> dict[str, Any]:
    """train.py --qat of the calibrated / partial checkpoint ``weights`` into ``folder`` (its qat.json); a finished
    run with the same arguments from the same amax is reused."""
    argv = ["--qat", "--weights", str(weights), "--images", str(args.unlabelled_images), "--val-data",
            str(args.val_data), "--val-images", str(args.val_images), "--img-size", str(args.img_size),
            "--letterbox", args.letterbox, "--batch-size", "16",
            "--workers", str(args.workers), "--device", args.device, "--epochs", str(args.qat_epochs), "--lr0",
            str(args.qat_lr), "--output-dir", str(folder), "--overwrite", "--eval-interval", str(args.qat_epochs)]
    argv += (["--learn-amax"] if args.qat_learn_amax else []) + (["--no-progress"] if args.no_progress else [])
    return _run_or_reuse(folder, argv, "qat.json", weights, lambda report: report.get("from_amax_sha256"),
                         lambda a: train.main(train.get_args_parser().parse_args(a)))


def qat_rows(args: argparse.Namespace, out: Path, val: CocoDetection, partials: dict[str, dict[str, Any]],
             device: torch.device) -> dict:
    """Fine-tuned models (--qat-from: full INT8 and ours, plain or equalized), each with its Q/DQ ONNX on ONNX
    Runtime."""
    rows = {}
    eq = f" + {eq_label(args)}"
    starts = {"full": ("full INT8", out / "qat_full", calibrated_path(out, args.method_calibrator)),
              "ours": ("ours", out / "qat_ours", partials.get("ours")),
              "full-eq": (f"full INT8{eq}", out / "qat_full_eq", calibrated_path(out, args.method_calibrator, True)),
              "ours-eq": (f"ours{eq}", out / "qat_ours_eq", partials.get("ours-eq"))}
    for start in args.qat_from:
        name, folder, weights = starts[start]
        if weights is None or (start.endswith("-eq") and equalized(args) is None):
            continue
        qat = run_qat(args, folder, Path(weights))
        epochs = f"{args.qat_epochs} epoch{'s' if args.qat_epochs > 1 else ''}"
        label = f"QAT {name} ({epochs}{', learned amax' if args.qat_learn_amax else ''})"
        rows[label] = {**qat["after"]["map"], "int8_layers": qat["int8_layers"], "total_layers": qat["total_layers"],
                       "before": qat["before"]["start"]["mAP50_95"], "qat_s": round(qat["minutes"] * 60, 1),
                       "loss_before": float(f"{qat['before']['loss']:.4g}"),
                       "loss_after": float(f"{qat['after']['loss']:.4g}"),
                       "drop_interval": qat["after"]["drop_interval"], "images": qat["images"]}
        if not args.no_onnx:
            report = {"checkpoint": qat["checkpoint"], "int8_layers": qat["int8_layers"],
                      "total_layers": qat["total_layers"]}
            rows[f"{label} Q/DQ ONNX (ORT)"] = partial_onnx_row(args, folder, val, report, device)
    return rows


def _values(report: dict[str, Any], column: str) -> list[float] | None:
    rows = report["layers"]
    return [row[column] for row in rows] if all(column in row for row in rows) else None


def _order(report: dict[str, Any]) -> list[str]:
    return [row["name"] for row in sorted(report["layers"], key=lambda r: r["rank"])]


def _per_layer_s(report: dict[str, Any]) -> float:
    seconds = [row["seconds"] for row in report["layers"] if row.get("seconds") is not None]
    return sum(seconds) / len(seconds) if seconds else float("nan")


def proxy_quality(args: argparse.Namespace, out: Path) -> dict[str, dict[str, Any]]:
    """Per direction: map's split-half reliability and every proxy's agreement with map, with seconds per layer."""
    table: dict[str, dict[str, Any]] = {}
    for direction in DIRECTIONS:
        ref = rank(args, out, "map", direction)
        ref_scores = sensitivity_scores(_values(ref, "mAP50_95"), "map", direction)
        halves = _values(ref, "mAP50_95_half_a"), _values(ref, "mAP50_95_half_b")
        reliability = None if None in halves else round(spearman(*(sensitivity_scores(h, "map", direction)
                                                                   for h in halves)), 3)
        map_s = _per_layer_s(ref)
        table[f"map {direction}"] = {"s_per_layer": round(map_s, 3), "split_half_rho": reliability}
        for proxy in PROXY_METHODS:
            report = rank(args, out, proxy, direction)
            scores = sensitivity_scores(_values(report, key_column(proxy)), proxy, direction)
            seconds = _per_layer_s(report)
            table[f"{proxy} {direction}"] = {
                "s_per_layer": round(seconds, 3), "speed_up": round(map_s / seconds, 1) if seconds > 0 else None,
                "spearman_vs_map": round(spearman(scores, ref_scores), 3),
                "top10_vs_map": top_k_overlap(_order(report), _order(ref), 10)}
    return table


def predictions_file(out: Path, row_name: str) -> Path:
    """Where a row's val predictions are kept (for its drop's interval against float)."""
    return out / "predictions" / (re.sub(r"[^A-Za-z0-9.+-]+", "_", row_name).strip("_") + ".json")


def float_row(letterbox: str, sets: dict[str, CocoDetection]) -> str:
    """The float row of a geometry (the reference of every drop measured on it): "float" for --letterbox's, the
    first of ``sets``; "float (square)" for the ONNX rows' square canvases beside rect ones."""
    return "float" if letterbox == next(iter(sets)) else f"float ({letterbox})"


def report_sets(args: argparse.Namespace, stride: int) -> dict[str, CocoDetection]:
    """The val images in --letterbox geometry (first), and on square canvases for the fixed-size ONNX rows."""
    sets = {args.letterbox: CocoDetection(args.val_data, args.val_images, img_size=args.img_size,
                                          letterbox=args.letterbox, stride=stride)}
    if not args.no_onnx and "square" not in sets:
        sets["square"] = CocoDetection(args.val_data, args.val_images, img_size=args.img_size)
    return sets


def float_rows(args: argparse.Namespace, model: torch.nn.Module, sets: dict[str, CocoDetection],
               device: torch.device, out: Path) -> dict[str, dict[str, Any]]:
    """The float model on every report geometry, its predictions kept (the reference of the drops' intervals)."""
    rows = {}
    for letterbox, dataset in sets.items():
        name = float_row(letterbox, sets)
        start, predictions = time.perf_counter(), predictions_file(out, name)
        metrics = evaluate(TorchRunner(model, device), dataset, args.batch_size, args.workers,
                           progress=not args.no_progress, save_json=predictions)
        rows[name] = {**_maps(metrics), "seconds": round(time.perf_counter() - start, 1),
                      "predictions": str(predictions), "letterbox": letterbox}
    return rows


def add_drop_intervals(rows: dict[str, dict[str, Any]], sets: dict[str, CocoDetection]) -> None:
    """Each row with saved predictions gets its mAP@.5:.95 drop from the float row of its geometry with the 95 %
    paired-bootstrap interval over the val images (rows from partial_quant.py and train.py bring theirs)."""
    references = {}
    for letterbox, dataset in sets.items():
        path = rows.get(float_row(letterbox, sets), {}).get("predictions")
        if path and Path(path).is_file():
            references[letterbox] = DropBootstrap(evaluate_predictions(path, dataset)["matches"])
    for name, row in rows.items():
        letterbox = row.get("letterbox", next(iter(sets)))
        if not name.startswith("float") and letterbox in references and Path(row.get("predictions") or "-").is_file():
            matches = evaluate_predictions(row["predictions"], sets[letterbox])["matches"]
            row["drop_interval"] = rounded_drop(references[letterbox].compare(matches))


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'model':<72} {'mAP50:95':>9} {'drop [95 % interval]':>26} {'mAP50':>7} {'INT8 layers':>12} "
             f"{'seconds':>8}"]
    for name, r in rows.items():
        if "mAP50_95" not in r:
            continue
        int8 = f"{r['int8_layers']}/{r['total_layers']}" if "int8_layers" in r else "-"
        drop = format_drop(r["drop_interval"]) if "drop_interval" in r else "-"
        lines.append(f"{name:<72} {r['mAP50_95']:>9.4f} {drop:>26} {r.get('mAP50', float('nan')):>7.4f} "
                     f"{int8:>12} {r.get('seconds', r.get('search_s', r.get('qat_s', float('nan')))):>8.1f}")
    return "\n".join(lines)


def format_quality(table: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'ranking':<16} {'s/layer':>8} {'speed-up':>9} {'rho vs map':>11} {'top-10':>7} "
             f"{'map split-half rho':>19}"]
    for name, r in table.items():
        rho = r.get("spearman_vs_map")
        lines.append(f"{name:<16} {r['s_per_layer']:>8.3f} {r.get('speed_up') or 1:>8}x "
                     f"{'-' if rho is None else f'{rho:.3f}':>11} {r.get('top10_vs_map', '-'):>7} "
                     f"{'' if 'split_half_rho' not in r else str(r['split_half_rho']):>19}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    device, out = start_run(args)
    model = load_model(args.weights)
    sets = report_sets(args, model_stride(model))
    val, square = sets[args.letterbox], sets.get("square")
    rows = float_rows(args, model, sets, device, out)
    rows.update(full_int8_rows(args, val, device, out))
    write_json(out / "rows_so_far.json", rows)  # the finished stages survive an interrupted ranking or search
    partials, our_partial = {}, None
    if "plain" in args.ours_from or not args.no_seed:  # the seed's same-count row needs ours' float count
        ours, our_partial = our_rows(args, out, rows)  # ours first: it is the shorter search
        rows.update(ours)
        partials["ours"] = our_partial["checkpoint"]
    if equalized(args) is not None and "eq" in args.ours_from:
        ours_eq, our_eq_partial = our_rows(args, out, rows, eq=True)
        rows.update(ours_eq)
        partials["ours-eq"] = our_eq_partial["checkpoint"]
    write_json(out / "rows_so_far.json", rows)
    if not args.no_seed:
        seed, seed_partial = seed_rows(args, out)
        rows.update(seed)
        rows.update(same_count_row(args, out, len(our_partial["float_layers"])))
        write_json(out / "rows_so_far.json", rows)
    if not args.no_onnx:
        if not args.no_seed:
            rows["seed partial Q/DQ ONNX (ORT)"] = partial_onnx_row(args, out / "partial", square, seed_partial, device)
        if our_partial is not None:
            rows["ours Q/DQ ONNX (ORT)"] = partial_onnx_row(args, out / "ours", square, our_partial, device)
        if "ours-eq" in partials:
            rows[f"ours + {eq_label(args)} Q/DQ ONNX (ORT)"] = partial_onnx_row(args, out / "ours_eq", square,
                                                                               our_eq_partial, device)
    write_json(out / "rows_so_far.json", rows)
    if not args.no_qat:
        rows.update(qat_rows(args, out, square, partials, device))
        write_json(out / "rows_so_far.json", rows)
    add_drop_intervals(rows, sets)
    quality = {} if args.no_proxy_quality else proxy_quality(args, out)
    print(format_table(rows), flush=True)
    if quality:
        print(format_quality(quality), flush=True)
    if args.json:
        write_json(args.json, {"rows": rows, "proxy_quality": quality, "args": args_dict(args)})
    return {f"{name} {k}": v for name, row in rows.items() for k, v in row.items() if isinstance(v, (int, float))}


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
