"""Check the CUDA paths against the CPU: calibration, one sensitivity ranking and COCO evaluation of one checkpoint
on each device of --devices (default cpu and cuda:0), with timings.

Checks (each printed PASS/FAIL, all in --json): every quantizer's amax within --amax-rtol (relative) across the
devices, the same top-10 of the ranking (as an ordered list, and as a set), float and full-INT8 mAP50:95 within
--map-tol. Runs sensitivity_analyse.py (calibration + the --method proxy ranking, single direction) and the
evaluation of the calibrated model on each device, in that order; exit status 1 when a check fails.

benchmarks/gpu_check.sh prepares a bare GPU machine (wheels, data carried beside the repository) and runs this.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(_REPO_ROOT))

import torch  # noqa: E402

import sensitivity_analyse  # noqa: E402
from models import load_model  # noqa: E402
from utils.cli import (  # noqa: E402
    ArgumentParser,
    args_dict,
    device_spec,
    img_size,
    non_negative_int,
    positive_int,
    resolve_device,
    run_cli,
    write_json,
)
from utils.data.coco import CocoDetection, add_letterbox_argument, model_stride  # noqa: E402
from utils.inference.evaluate import evaluate  # noqa: E402
from utils.inference.runners import TorchRunner  # noqa: E402
from utils.quant import calibration  # noqa: E402
from utils.quant import quantizers as quant  # noqa: E402
from utils.sensitivity.metrics import PROXY_METHODS  # noqa: E402

_logger = logging.getLogger("gpu_check")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--weights", required=True, metavar="FILE", help="checkpoint (e.g. the real YOLOv6Lite-S)")
    parser.add_argument("--val-data", required=True, metavar="JSON", help="COCO annotations for the evaluation")
    parser.add_argument("--val-images", required=True, metavar="DIR", help="images of --val-data")
    parser.add_argument("--calib-images", required=True, metavar="DIR", help="calibration / proxy images")
    parser.add_argument("--devices", nargs=2, type=device_spec, default=["cpu", "cuda:0"], metavar="DEV",
                        help="the reference device and the one checked against it")
    parser.add_argument("--img-size", type=img_size, default=320, metavar="N", help="letterbox size")
    add_letterbox_argument(parser)
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="images per batch")
    parser.add_argument("--batch-number", type=positive_int, default=4, metavar="N", help="calibration batches")
    parser.add_argument("--calib-method", choices=quant.METHODS, default="percentile",
                        help="calibration (percentile 99.99: histogram path; max: the exact one)")
    parser.add_argument("--method", choices=PROXY_METHODS, default="sqnr", help="the ranking's proxy")
    parser.add_argument("--proxy-images", type=positive_int, default=32, metavar="N", help="proxy images")
    parser.add_argument("--layers", nargs="+", default=None, metavar="PATTERN", help="rank only these (globs)")
    parser.add_argument("--workers", type=non_negative_int, default=2, metavar="N", help="data-loading processes")
    parser.add_argument("--amax-rtol", type=float, default=1e-5, metavar="R", help="amax tolerance (relative)")
    parser.add_argument("--map-tol", type=float, default=0.002, metavar="T", help="mAP50:95 tolerance")
    parser.add_argument("--output-dir", default="runs/gpu_check", metavar="DIR", help="per-device runs")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_device(args: argparse.Namespace, device_name: str, folder: Path) -> dict[str, Any]:
    """Calibration + ranking (one sensitivity_analyse.py run) and the float / INT8 evaluation on one device."""
    device = resolve_device(device_name)
    argv = ["--weights", str(args.weights), "--data-root", str(args.calib_images), "--img-size", str(args.img_size),
            "--batch-size", str(args.batch_size), "--batch-number", str(args.batch_number), "--calib-method",
            args.calib_method, "--method", args.method, "--proxy-images", str(args.proxy_images), "--workers",
            str(args.workers), "--device", device_name, "--output", str(folder), "--overwrite"]
    argv += (["--layers", *args.layers] if args.layers else []) + (["--no-progress"] if args.no_progress else [])
    start = time.perf_counter()
    ranking = sensitivity_analyse.main(sensitivity_analyse.get_args_parser().parse_args(argv))
    _sync(device)
    rank_s = time.perf_counter() - start
    report = json.loads(Path(ranking["json"]).read_text())
    order = [row["name"] for row in sorted(report["layers"], key=lambda r: r["rank"])]
    float_model = load_model(args.weights, device=device)
    val = CocoDetection(args.val_data, args.val_images, img_size=args.img_size, letterbox=args.letterbox,
                        stride=model_stride(float_model))
    maps, eval_s = {}, {}
    calibrated = calibration.load_calibrated(folder / "calibrated.pt", device)
    for name, model in (("float", float_model), ("int8", calibrated)):
        start = time.perf_counter()
        maps[name] = float(evaluate(TorchRunner(model, device), val, args.batch_size, args.workers,
                                    progress=not args.no_progress)["mAP50_95"])
        _sync(device)
        eval_s[name] = round(time.perf_counter() - start, 2)
    amax = calibration.quantizer_state(calibrated)  # FP32 on the CPU
    return {"device": device_name, "order": order, "maps": maps, "amax": amax,
            "seconds": {"calibration_and_ranking": round(rank_s, 2), **{f"eval_{k}": v for k, v in eval_s.items()}}}


def compare(ref: dict[str, Any], test: dict[str, Any], amax_rtol: float, map_tol: float) -> dict[str, Any]:
    """The checks of ``test`` against ``ref``: amax, top-10 (ordered and as a set), float and INT8 mAP."""
    worst = max(float(((test["amax"][k] - v).abs() / v.abs().clamp(min=1e-12)).max()) for k, v in ref["amax"].items())
    top_ref, top_test = ref["order"][:10], test["order"][:10]
    checks = {"amax_max_rel_diff": {"value": worst, "pass": worst <= amax_rtol},
              "top10_same_order": {"value": top_ref == top_test, "pass": top_ref == top_test},
              "top10_overlap": {"value": len(set(top_ref) & set(top_test)), "pass": set(top_ref) == set(top_test)}}
    for name in ("float", "int8"):
        diff = abs(test["maps"][name] - ref["maps"][name])
        checks[f"map_{name}_abs_diff"] = {"value": round(diff, 5), "pass": diff <= map_tol}
    return checks


def main(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output_dir)
    runs = [run_device(args, name, out / f"run{i}_{name.replace(':', '')}") for i, name in enumerate(args.devices)]
    checks = compare(runs[0], runs[1], args.amax_rtol, args.map_tol)
    for run in runs:
        print(f"{run['device']:<8} float {run['maps']['float']:.4f}  int8 {run['maps']['int8']:.4f}  "
              + "  ".join(f"{k} {v:.1f} s" for k, v in run["seconds"].items()))
    for name, check in checks.items():
        print(f"{'PASS' if check['pass'] else 'FAIL'}  {name}: {check['value']}")
    result = {"runs": [{k: v for k, v in r.items() if k != "amax"} for r in runs], "checks": checks,
              "passed": all(c["pass"] for c in checks.values()), "args": args_dict(args)}
    if args.json:
        write_json(args.json, result)
    if not result["passed"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
