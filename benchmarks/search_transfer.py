"""Does the drop a --target-drop search sees hold on images it never saw? The seed's search and ours, each searched
on the first N train images (--search-sizes) with each stopping rule (--stop-rules: the point drop, or the upper
end of its 95 % interval), reported on the val images: the search-set drop with its interval, the val drop it
predicted for the val set, the val drop measured (with its own interval) and whether it fell inside the prediction
and within the target.

Shares --output-dir with real_coco_benchmark.py: the calibrations and the seed's per-layer mAP ranking (on all train
images, resumable) are computed once for both; every search keeps its folder under <output-dir>/transfer and is
reused by a rerun with the same arguments.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (_REPO_ROOT, _REPO_ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import real_coco_benchmark as rcb  # noqa: E402

from utils.cli import args_dict, positive_int, run_cli, write_json  # noqa: E402
from utils.data.coco import CocoDetection  # noqa: E402
from utils.errors import InputError  # noqa: E402
from utils.fallback.measure import STOP_RULES  # noqa: E402

_logger = logging.getLogger("search_transfer")
METHODS = ("seed", "ours")


def get_args_parser() -> argparse.ArgumentParser:
    parser = rcb.get_args_parser()
    parser.description = __doc__
    study = parser.add_argument_group("search transfer")
    study.add_argument("--search-sizes", nargs="+", type=positive_int, default=[100, 200, 343], metavar="N",
                       help="search on the first N train images (N >= the train set: all of them)")
    study.add_argument("--stop-rules", nargs="+", choices=STOP_RULES,
                       default=list(STOP_RULES), metavar="R", help="partial_quant.py --stop-on")
    study.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="M",
                       help="seed: map ranking + search from --seed-from; ours: re-ranking search from the "
                            "equalized --method-calibrator calibration")
    # the equalized calibration both searches start from (real_coco_benchmark's defaults stay its own)
    parser.set_defaults(calibrators=[], partial_calibrator="percentile-99.99", method_calibrator="percentile-99.99",
                        bias_correction=True, seed_from="eq", output_dir="runs/real_benchmark")
    return parser


def check_args(args: argparse.Namespace) -> None:
    rcb.check_args(args)
    if "ours" in args.methods and rcb.equalized(args) is None:
        raise InputError("ours searches from the equalized calibration: pass --equalize depthwise|all|auto")


def search(args: argparse.Namespace, out: Path, method: str, size: int, rule: str, train_images: int,
           ranking: str | None) -> dict[str, Any]:
    """One search (reused when finished with the same arguments): its partial_quant.json. On the whole train set
    with real_coco_benchmark.py's --stop-on it is that benchmark's own search, in its folder, so either script
    reuses the other's."""
    argv = rcb.seed_search_argv(args, out, ranking, rule) if method == "seed" else \
        rcb.our_search_argv(args, out, True, rule)
    folder = out / "transfer" / f"{method}_{min(size, train_images)}_{rule}_drop{args.target_drop:g}"
    if size < train_images:
        argv += ["--search-max-images", str(size)]
    elif rule == args.stop_on:
        folder = out / ("partial" if method == "seed" else "ours_eq")
    return rcb.run_partial(folder, argv)


def transfer_row(report: dict[str, Any], target: float) -> dict[str, Any]:
    """What the search saw and predicted, beside what val measured."""
    search = report["search"]
    predicted, val = search["predicted_report_interval"], report["intervals"]["partial"]["mAP50_95"]
    return {"search_images": search["num_images"], "int8_layers": report["int8_layers"],
            "total_layers": report["total_layers"], "search_drop": search["drop_interval"],
            "predicted_val": predicted, "val_drop": val,
            "val_inside_prediction": predicted["low"] <= val["drop"] <= predicted["high"],
            "val_within_target": val["drop"] <= target, "evaluations": search.get("evaluations"),
            "search_s": report["seconds"]}


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'search':<22} {'INT8':>8} {'search drop [95 %]':>26} {'predicted val':>18} "
             f"{'val drop [95 %]':>26} {'inside':>7} {'<=target':>9} {'evals':>6} {'s':>6}"]
    for name, r in rows.items():
        predicted = f"[{r['predicted_val']['low']:.4f}, {r['predicted_val']['high']:.4f}]"
        lines.append(f"{name:<22} {r['int8_layers']:>4}/{r['total_layers']:<3} "
                     f"{rcb.format_drop(r['search_drop']):>26} {predicted:>18} "
                     f"{rcb.format_drop(r['val_drop']):>26} {'yes' if r['val_inside_prediction'] else 'NO':>7} "
                     f"{'yes' if r['val_within_target'] else 'NO':>9} {r['evaluations'] or '-':>6} "
                     f"{r['search_s']:>6.0f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    device, out = rcb.start_run(args)
    val = CocoDetection(args.val_data, args.val_images, img_size=args.img_size)  # checks the sets before the slow part
    train_images = len(CocoDetection(args.train_data, args.train_images, img_size=args.img_size))
    rcb.full_int8_rows(args, val, device, out)  # the saved calibrations (no --calibrators rows: none evaluated)
    ranking = rcb.rank(args, out)["path"] if "seed" in args.methods else None
    rows = {}
    for method in args.methods:
        for size in sorted(set(args.search_sizes)):
            for rule in args.stop_rules:
                name = f"{method} {min(size, train_images)} {rule} {args.target_drop:g}"
                rows[name] = transfer_row(search(args, out, method, size, rule, train_images, ranking),
                                          args.target_drop)
                _logger.info("%s: %s", name, rows[name])
                write_json(out / "transfer" / "rows_so_far.json", rows)
    print(format_table(rows), flush=True)
    if args.json:
        write_json(args.json, {"rows": rows, "args": args_dict(args)})
    return rows


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
