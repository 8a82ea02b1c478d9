"""Full INT8 with and without input equalization / bias correction: which settings, measured on the train set (the
choice) and the val set (the report).

For one checkpoint and real labelled sets, each setting of the grid (calibrator, --equalize kind, alpha, range
percentile, bias correction) is calibrated on the first --calib-images train images and evaluated fully INT8 on
the train set (where the toolkit's defaults are chosen) and on the val set (reported, never chosen on). Prints the
table (best on train marked) and writes it as JSON; finished settings are kept in --output-dir and reused on a
rerun with the same arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

# benchmarks/ is not a package: make the repository root (and this folder, for the shared set arguments) importable.
_REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (_REPO_ROOT, _REPO_ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from real_coco_benchmark import add_output_arguments, add_real_set_arguments, check_real_sets, start_run  # noqa: E402

from models import load_model  # noqa: E402
from utils.cli import ArgumentParser, args_dict, positive_int, run_cli, write_json  # noqa: E402
from utils.data.calibration import calibration_loader  # noqa: E402
from utils.data.coco import CocoDetection, model_stride  # noqa: E402
from utils.inference.evaluate import evaluate  # noqa: E402
from utils.inference.runners import TorchRunner  # noqa: E402
from utils.quant import calibration  # noqa: E402
from utils.quant.equalize import TransformSettings  # noqa: E402

_logger = logging.getLogger("equalization_benchmark")
# name -> (calibrator, calibrator percentile, equalize, alpha, range percentile, bias correction)
GRID = {
    "p99.9": ("percentile", 99.9, "none", 1.0, 99.99, False),
    "p99.99": ("percentile", 99.99, "none", 1.0, 99.99, False),
    "p99.99 dw": ("percentile", 99.99, "depthwise", 1.0, 99.99, False),
    "p99.99 dw max-range": ("percentile", 99.99, "depthwise", 1.0, 100.0, False),
    "p99.99 dw p99.9-range": ("percentile", 99.99, "depthwise", 1.0, 99.9, False),
    "p99.99 dw a0.5": ("percentile", 99.99, "depthwise", 0.5, 99.99, False),
    "p99.99 dw bc": ("percentile", 99.99, "depthwise", 1.0, 99.99, True),
    "p99.99 dw max-range bc": ("percentile", 99.99, "depthwise", 1.0, 100.0, True),
    "p99.9 bc": ("percentile", 99.9, "none", 1.0, 99.99, True),
    "p99.99 all a1 bc": ("percentile", 99.99, "all", 1.0, 99.99, True),
    "p99.99 all a0.5": ("percentile", 99.99, "all", 0.5, 99.99, False),
    "p99.99 all a1": ("percentile", 99.99, "all", 1.0, 99.99, False),
    "p99.99 auto a0.5": ("percentile", 99.99, "auto", 0.5, 99.99, False),
    "p99.999 dw": ("percentile", 99.999, "depthwise", 1.0, 99.99, False),
    "max dw": ("max", None, "depthwise", 1.0, 99.99, False),
    "auto dw": ("auto", None, "depthwise", 1.0, 99.99, False),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    add_real_set_arguments(parser)
    parser.add_argument("--max-images", type=positive_int, default=None, metavar="N",
                        help="evaluate the first N images of each set (default: all)")
    run = parser.add_argument_group("run")
    run.add_argument("--settings", nargs="+", choices=list(GRID), default=list(GRID), metavar="S",
                     help=f"grid rows to run ({'; '.join(GRID)})")
    run.add_argument("--entropy-stride", type=positive_int, default=4, metavar="K",
                     help="auto calibration's entropy candidate: every K-th bin")
    add_output_arguments(run, "runs/equalization_benchmark", "finished rows")
    return parser


def _settings_key(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """What a row depends on: a finished row with the same key is reused."""
    return {"grid": list(GRID[name]), "weights": str(args.weights), "calib_folder": str(args.unlabelled_images),
            "img_size": args.img_size, "batch_size": args.batch_size, "calib_images": args.calib_images,
            "max_images": args.max_images, "entropy_stride": args.entropy_stride,
            "sets": [str(args.train_data), str(args.val_data)], "letterbox": args.letterbox}


def run_setting(args: argparse.Namespace, name: str, sets: dict[str, CocoDetection],
                device: torch.device) -> dict[str, Any]:
    method, percentile, setting, alpha, range_percentile, bias = GRID[name]
    batch_number = max(1, args.calib_images // args.batch_size)
    loader = calibration_loader(args.unlabelled_images, args.img_size, args.batch_size, batch_number, args.workers)
    start = time.perf_counter()
    qmodel, record = calibration.calibrated_model(
        load_model(args.weights), loader=loader, batch_number=batch_number, calib_method=method,
        percentile=percentile or 99.99, device=device, entropy_stride=args.entropy_stride if method == "auto" else 1,
        transform=TransformSettings(setting, alpha, range_percentile, bias))
    row: dict[str, Any] = {"calibration_s": round(time.perf_counter() - start, 1),
                           "transform": record.get("transform", {})}
    for split, dataset in sets.items():
        metrics = evaluate(TorchRunner(qmodel, device), dataset, args.batch_size, args.workers,
                           progress=not args.no_progress)
        row[split] = {"mAP50_95": round(float(metrics["mAP50_95"]), 4), "mAP50": round(float(metrics["mAP50"]), 4)}
    return row


def format_table(rows: dict[str, dict[str, Any]], best: str | None) -> str:
    lines = [f"{'setting':<24} {'train mAP':>10} {'train drop':>11} {'val mAP':>8} {'val drop':>9} {'calib s':>8}"]
    for name, r in rows.items():
        mark = "  <- best on train" if name == best else ""
        lines.append(f"{name:<24} {r['train']['mAP50_95']:>10.4f} {r.get('train_drop', 0):>11.4f} "
                     f"{r['val']['mAP50_95']:>8.4f} {r.get('val_drop', 0):>9.4f} "
                     f"{r.get('calibration_s', 0):>8.1f}{mark}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_real_sets(args)
    device, out = start_run(args)
    stride = model_stride(load_model(args.weights))
    sets = {split: CocoDetection(getattr(args, f"{split}_data"), getattr(args, f"{split}_images"),
                                 img_size=args.img_size, max_images=args.max_images, letterbox=args.letterbox,
                                 stride=stride) for split in ("train", "val")}
    finished_path = out / "rows_so_far.json"
    finished = json.loads(finished_path.read_text()) if finished_path.is_file() else {}
    float_key = {"weights": str(args.weights), "img_size": args.img_size, "max_images": args.max_images,
                 "sets": [str(args.train_data), str(args.val_data)], "letterbox": args.letterbox}
    if finished.get("float", {}).get("key") == float_key:
        rows = {"float": finished["float"]}
    else:
        model = load_model(args.weights)
        rows = {"float": {"key": float_key, **{split: {k: round(float(v), 4) for k, v in evaluate(
            TorchRunner(model, device), dataset, args.batch_size, args.workers, progress=not args.no_progress).items()
            if k in ("mAP50_95", "mAP50")} for split, dataset in sets.items()}}}
    for name in args.settings:
        key = _settings_key(args, name)
        if finished.get(name, {}).get("key") == key:
            rows[name] = finished[name]
            continue
        _logger.info("setting %s", name)
        rows[name] = {"key": key, **run_setting(args, name, sets, device)}
        write_json(finished_path, {**finished, **rows})
    for row in rows.values():
        for split in ("train", "val"):
            row[f"{split}_drop"] = round(rows["float"][split]["mAP50_95"] - row[split]["mAP50_95"], 4)
    settings = [n for n in rows if n != "float"]
    best = max(settings, key=lambda n: rows[n]["train"]["mAP50_95"]) if settings else None
    print(format_table(rows, best), flush=True)
    table = {name: {k: v for k, v in row.items() if k != "key"} for name, row in rows.items()}
    if args.json:
        write_json(args.json, {"rows": table, "best_on_train": best, "grid": {n: GRID[n] for n in settings},
                               "args": args_dict(args)})
    return {"best_on_train": best, **{f"{n} val": r["val"]["mAP50_95"] for n, r in table.items()}}


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
