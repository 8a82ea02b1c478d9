"""This toolkit beside the tools a user would pick instead (NNCF, NVIDIA ModelOpt): one model, one set of
calibration images, one search set and budget, one evaluation, one table.

For one checkpoint (default: ../shared's real YOLOv6Lite-S) and real sets (default: ../shared's coco-real and
coco-unlabelled), every row is a quantized model of the same FP32 network, calibrated on the same first
--calib-images unlabelled images (square letterbox, as our calibration reads them), evaluated by eval_coco.py's
evaluation on the same val images on square canvases (the Q/DQ ONNX have a fixed input size), with its mAP@.5:.95
drop and 95 % paired-bootstrap interval against the float model run the same way (ONNX rows against the FP32 ONNX
on ONNX Runtime, PyTorch rows against the float PyTorch model), its INT8 convolutions and its wall time:

- ours: p99.99 calibration with depthwise input equalization and bias correction (full INT8), then our search
  (re-ranked by sqnr, --target-drop on the train set) and its verified Q/DQ ONNX;
- nncf-ptq: nncf.quantize with its defaults on the FP32 ONNX;
- nncf-ac: nncf.quantize_with_accuracy_control, the same budget (--target-drop, absolute) on the same search set;
- modelopt-max / modelopt-entropy (and -conv: --op_types_to_quantize Conv): ModelOpt's ONNX PTQ, FP32 float regions;
- auto-quantize: ModelOpt's PyTorch mtq.auto_quantize (INT8 or float per layer, gradient score on a label-free
  detection loss) at the effective bits of ours' INT8 fraction and at each --auto-quantize-bits.

Peers are optional (requirements-peers.txt): a missing one is named in one line and the others still run. Finished
rows are kept in --output-dir/rows_so_far.json and reused when rerun with the same settings.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# benchmarks/ is not a package: make the repository root importable when run as a script.
_REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (_REPO_ROOT, _REPO_ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
import real_coco_benchmark as rcb  # noqa: E402
import torch  # noqa: E402

from models import load_model  # noqa: E402
from utils.cli import ArgumentParser, args_dict, positive_int, run_cli, write_json  # noqa: E402
from utils.data.coco import CocoDetection, model_stride  # noqa: E402
from utils.deploy.onnx_export import export_verified, verification_batch  # noqa: E402
from utils.deploy.onnx_graph import qdq_summary  # noqa: E402
from utils.errors import InputError  # noqa: E402
from utils.fileio import ensure_folder  # noqa: E402
from utils.inference.bootstrap import DropBootstrap, format_drop, rounded_drop  # noqa: E402
from utils.inference.evaluate import evaluate, evaluate_predictions  # noqa: E402
from utils.inference.runners import OnnxRuntimeRunner, Runner, TorchRunner, class_names_of  # noqa: E402
from utils.quant import peers  # noqa: E402
from utils.training.losses import DetectionLoss  # noqa: E402

_logger = logging.getLogger("peers")

# peer row -> the package it needs (utils.quant.peers.PEER_MODULES)
PEER_ROWS = {"nncf-ptq": "nncf", "nncf-ac": "nncf", "modelopt-max": "modelopt-onnx",
             "modelopt-entropy": "modelopt-onnx", "modelopt-max-conv": "modelopt-onnx",
             "modelopt-entropy-conv": "modelopt-onnx", "auto-quantize": "modelopt-torch"}
FLOAT_ONNX, FLOAT_TORCH = "float FP32 ONNX (ORT)", "float (PyTorch)"
OURS_FULL, OURS_SEARCH = "ours full INT8 (p99.99 + eq depthwise + bias corr.)", "ours: search"  # ours' best rows
OURS_RECIPE = ["--calibrators", "percentile-99.99", "--partial-calibrator", "percentile-99.99", "--method-calibrator",
               "percentile-99.99", "--equalize", "depthwise", "--bias-correction", "--ours-from", "eq", "--no-seed",
               "--no-qat", "--no-proxy-quality"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    rcb.add_real_set_arguments(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--peers", nargs="+", choices=list(PEER_ROWS), default=list(PEER_ROWS), metavar="P",
                     help=f"peer rows ({', '.join(PEER_ROWS)}; default: all)")
    run.add_argument("--no-ours", action="store_true", help="skip our rows (calibration, search and its ONNX)")
    run.add_argument("--target-drop", type=float, default=0.005, metavar="D",
                     help="the search budget of ours and of NNCF's accuracy control (mAP50:95 drop on the train set)")
    run.add_argument("--nncf-ranking-images", type=positive_int, default=32, metavar="N",
                     help="NNCF accuracy control's ranking subset (its ranking_subset_size). It ranks by one-image "
                          "mAPs, one per image per quantizer group, and ranks again after a revert that made things "
                          "worse: NNCF's own default (as many as --calib-images, 128) took 17 min per ranking on 2 "
                          "cores and did not fit an hour; 32 finished in 22 min (default: 32)")
    run.add_argument("--auto-quantize-bits", nargs="*", type=float, default=[8.25, 8.5, 9.0], metavar="B",
                     help="auto_quantize rows at these effective bits too (8: all INT8; 16: all float), beside the "
                          "one at ours' INT8 fraction")
    rcb.add_output_arguments(run, "runs/peers", "exported models, predictions and finished rows")
    return parser


def check_args(args: argparse.Namespace) -> None:
    rcb.check_real_sets(args)
    rcb.check_target_drop(args)
    bad = [b for b in args.auto_quantize_bits if not 8 <= b <= peers.FLOAT_BITS]
    if bad:
        raise InputError(f"--auto-quantize-bits must be between 8 (all INT8) and {peers.FLOAT_BITS} (all float), "
                         f"got {bad[0]}")


class Table:
    """The rows so far, saved after each one; a row finished by an earlier run with the same settings is reused."""

    def __init__(self, out: Path, settings: dict[str, Any]):
        self.path, self.settings = out / "rows_so_far.json", settings
        try:
            self.previous = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.previous = {}
        self.rows: dict[str, dict[str, Any]] = {}

    def run(self, name: str, build: Callable[[], dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """The row ``name``: ``build()``, or the earlier run's when its settings (and ``extra``, what only this row
        depends on) were the same and its predictions are still there."""
        old, settings = self.previous.get(name, {}), {**self.settings, **extra}
        if old.get("settings") == settings and Path(old.get("predictions") or "-").is_file():
            _logger.info("%s: reusing the finished row", name)
            self.rows[name] = old
        else:
            self.rows[name] = {**build(), "settings": settings}
        write_json(self.path, {**self.previous, **self.rows})
        return self.rows[name]


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in args_dict(args).items()
            if k not in ("peers", "no_ours", "nncf_ranking_images", "auto_quantize_bits", "json", "no_progress",
                         "verbose", "output_dir")}


def measure(args: argparse.Namespace, runner: Runner, val: CocoDetection, predictions: Path) -> dict[str, Any]:
    """mAP of ``runner`` on ``val``, its predictions kept for the drop's interval."""
    start = time.perf_counter()
    metrics = evaluate(runner, val, args.batch_size, args.workers, progress=not args.no_progress,
                       save_json=predictions)
    return {"mAP50_95": round(float(metrics["mAP50_95"]), 4), "mAP50": round(float(metrics["mAP50"]), 4),
            "predictions": str(predictions), "eval_s": round(time.perf_counter() - start, 1)}


def onnx_row(args: argparse.Namespace, path: Path, val: CocoDetection, out: Path, seconds: float,
             class_names_from: Path) -> dict[str, Any]:
    """An ONNX model's row: its INT8 convs (weights fed by a DequantizeLinear), mAP on ONNX Runtime (basic
    optimisation, as our ONNX rows: no INT8 kernels' extra rounding), the tool's ``seconds``."""
    import onnx

    model = onnx.load(str(path))
    if not class_names_of({p.key: p.value for p in model.metadata_props}):  # evaluation matches classes by name
        source = onnx.load(str(class_names_from), load_external_data=False)
        onnx.helper.set_model_props(model, {p.key: p.value for p in source.metadata_props})
        onnx.save(model, str(path))
    counts = qdq_summary(model)
    row = {"int8_layers": counts["quantized_conv"], "total_layers": counts["quantized_conv"] + counts["float_conv"],
           "qdq_pairs": counts["quantize_linear"], "runtime": "onnxruntime", "onnx": str(path),
           "seconds": round(seconds, 1)}
    return {**row, **measure(args, OnnxRuntimeRunner(path, optimization="basic"), val, out / f"{path.stem}.json")}


def float_rows(args: argparse.Namespace, table: Table, model: torch.nn.Module, val: CocoDetection, out: Path,
               device: torch.device) -> Path:
    """The float model on ONNX Runtime (the FP32 ONNX every ONNX peer starts from) and in PyTorch; the ONNX path."""
    fp32 = out / "fp32.onnx"

    def build_onnx() -> dict[str, Any]:
        start = time.perf_counter()
        export_verified(model, fp32, verification_batch(args.val_images, args.img_size, 2), img_size=args.img_size,
                        dynamic_batch=True)
        return onnx_row(args, fp32, val, out, time.perf_counter() - start, fp32)

    table.run(FLOAT_ONNX, build_onnx)
    table.run(FLOAT_TORCH, lambda: {"runtime": "pytorch", **measure(args, TorchRunner(model, device), val,
                                                                     out / "float_pytorch.json")})
    return fp32


def our_rows(args: argparse.Namespace, table: Table, val: CocoDetection, out: Path,
             device: torch.device) -> dict[str, Any] | None:
    """Our best recipe through real_coco_benchmark's stages (calibration, search, verified Q/DQ ONNX) in
    ``out/ours``; returns our search's report."""
    folder = ensure_folder(out / "ours")
    argv = ["--weights", str(args.weights), "--device", args.device, "--val-data", str(args.val_data),
            "--val-images", str(args.val_images), "--train-data", str(args.train_data), "--train-images",
            str(args.train_images), "--unlabelled-images", str(args.unlabelled_images), "--img-size",
            str(args.img_size), "--letterbox", args.letterbox, "--batch-size", str(args.batch_size), "--calib-images",
            str(args.calib_images), "--workers", str(args.workers), "--target-drop", str(args.target_drop),
            "--output-dir", str(folder), *OURS_RECIPE] + (["--no-progress"] if args.no_progress else [])
    ns = rcb.get_args_parser().parse_args(argv)
    rcb.check_args(ns)
    full = rcb.full_int8_rows(ns, val, device, folder)  # evaluated on the square val canvases, like every row
    eq_name = f"int8 percentile-99.99 + {rcb.eq_label(ns)}"
    labels = {"int8 percentile-99.99": "ours full INT8 (p99.99)",
              eq_name: OURS_FULL}
    for name, label in labels.items():
        row = full[name]
        table.run(label, lambda row=row: {"runtime": "pytorch", "mAP50_95": row["mAP50_95"], "mAP50": row["mAP50"],
                                          "predictions": row["predictions"], "int8_layers": None,
                                          "seconds": row["calibration_s"],
                                          "eval_s": round(row["seconds"] - row["calibration_s"], 1)})
    searched, partial = rcb.our_rows(ns, folder, full, eq=True)
    for label in labels.values():  # full INT8: every conv the search could quantize
        table.rows[label].update(int8_layers=partial["total_layers"], total_layers=partial["total_layers"])
    search_row = next(iter(searched.values()))

    def build_onnx() -> dict[str, Any]:
        start = time.perf_counter()
        _, record = rcb.export_partial_onnx(ns, folder / "ours_eq", partial)
        seconds = search_row["calibration_s"] + search_row["search_s"] + time.perf_counter() - start
        path = Path(record["onnx"])
        return {**onnx_row(args, path, val, out, seconds, path), "verified": record["verified"],
                "search_drop": search_row["search_drop"]}

    table.run(f"{OURS_SEARCH} (drop {args.target_drop} on train) Q/DQ ONNX", build_onnx)
    return partial


def nncf_rows(args: argparse.Namespace, table: Table, fp32: Path, images: np.ndarray, val: CocoDetection,
              out: Path, accuracy_control: bool = False) -> None:
    """NNCF's PTQ row, or (``accuracy_control``) its accuracy-control row: the longest, so run last."""
    import onnx

    def build_ptq() -> dict[str, Any]:
        start = time.perf_counter()
        onnx.save(peers.nncf_ptq(onnx.load(str(fp32)), images), str(out / "nncf_ptq.onnx"))
        return onnx_row(args, out / "nncf_ptq.onnx", val, out, time.perf_counter() - start, fp32)

    def build_ac() -> dict[str, Any]:
        model = onnx.load(str(fp32))
        names = class_names_of({p.key: p.value for p in model.metadata_props})
        search = CocoDetection(args.train_data, args.train_images, img_size=args.img_size)  # square: the ONNX's
        start = time.perf_counter()
        quantized = peers.nncf_accuracy_control(model, images, peers.OnnxMapValidation(search, names, args.batch_size),
                                                args.target_drop, args.nncf_ranking_images)
        onnx.save(quantized, str(out / "nncf_ac.onnx"))
        return onnx_row(args, out / "nncf_ac.onnx", val, out, time.perf_counter() - start, fp32)

    if "nncf-ptq" in args.peers and not accuracy_control:
        table.run("NNCF quantize (defaults)", build_ptq)
    if "nncf-ac" in args.peers and accuracy_control:
        table.run(f"NNCF accuracy control (max drop {args.target_drop} on train)", build_ac,
                  ranking_images=args.nncf_ranking_images)


def modelopt_onnx_rows(args: argparse.Namespace, table: Table, fp32: Path, images: np.ndarray, val: CocoDetection,
                       out: Path) -> None:
    for method in ("max", "entropy"):
        for suffix, op_types in (("", None), ("-conv", ["Conv"])):
            if f"modelopt-{method}{suffix}" not in args.peers:
                continue
            path = out / f"modelopt_{method}{suffix.replace('-', '_')}.onnx"

            def build(method: str = method, op_types: list[str] | None = op_types, path: Path = path) -> dict:
                start = time.perf_counter()
                peers.modelopt_onnx_ptq(fp32, images, path, method, op_types)
                return onnx_row(args, path, val, out, time.perf_counter() - start, fp32)

            table.run(f"ModelOpt ONNX PTQ {method}" + (" (Conv only)" if op_types else " (defaults)"), build)


def auto_quantize_rows(args: argparse.Namespace, table: Table, model: torch.nn.Module, images: np.ndarray,
                       val: CocoDetection, out: Path, device: torch.device, ours: dict[str, Any] | None) -> None:
    batches = [torch.from_numpy(images[i:i + 16]) for i in range(0, len(images), 16)]
    head = model.detect
    loss = DetectionLoss(head.nc, head.stride, head.reg_max, head.use_dfl)
    targets = [] if ours is None else [(peers.effective_bits(model, ours["float_layers"]), " = ours' INT8 fraction")]
    targets = sorted(targets + [(bits, "") for bits in args.auto_quantize_bits])
    for bits, note in targets:
        def build(bits: float = bits) -> dict[str, Any]:
            start = time.perf_counter()
            quantized, counts = peers.modelopt_auto_quantize(model, batches, bits, loss)
            seconds = time.perf_counter() - start
            name = f"auto_quantize_{bits:.2f}".replace(".", "_")
            return {**counts, "runtime": "pytorch",
                    "effective_bits": round(bits, 3), "seconds": round(seconds, 1),
                    **measure(args, TorchRunner(quantized.to(device), device), val, out / f"{name}.json")}

        table.run(f"ModelOpt auto_quantize ({bits:.2f} effective bits{note})", build)


def add_drop_intervals(rows: dict[str, dict[str, Any]], val: CocoDetection, seed: int = 0) -> None:
    """Each row's drop from the float model on its own runtime, and each peer row's mAP below ours on the same
    runtime (``ours_minus_it``: positive, ours is ahead), each with its 95 % paired-bootstrap interval over the val
    images: a difference inside its noise is not a result."""
    references = {FLOAT_ONNX: "onnxruntime", FLOAT_TORCH: "pytorch"}
    matches = {name: evaluate_predictions(row["predictions"], val)["matches"] for name, row in rows.items()
               if Path(row.get("predictions") or "-").is_file()}
    floats = {runtime: name for name, runtime in references.items() if name in matches}
    ours = {row["runtime"]: name for name, row in rows.items()
            if (name == OURS_FULL or name.startswith(OURS_SEARCH)) and name in matches}
    # one bootstrap per reference: its resamples are drawn once and reused by every row compared with it
    boots = {name: DropBootstrap(matches[name], seed=seed) for name in {*floats.values(), *ours.values()}}
    for name, row in rows.items():
        runtime = row.get("runtime")
        if name in references or name not in matches:
            continue
        if runtime in floats:
            row["drop_interval"] = rounded_drop(boots[floats[runtime]].compare(matches[name]))
            row["reference"] = floats[runtime]
        if runtime in ours and not name.startswith("ours"):
            row["ours_minus_it"] = rounded_drop(boots[ours[runtime]].compare(matches[name]))
            row["ours_row"] = ours[runtime]


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'model':<66} {'runtime':<11} {'mAP50:95':>8} {'drop [95 % interval]':>26} {'INT8 convs':>10} "
             f"{'wall s':>7} {'ours minus it [95 %]':>26}"]
    for name, r in rows.items():
        int8 = f"{r['int8_layers']}/{r['total_layers']}" if r.get("int8_layers") is not None else "all"
        drop = format_drop(r["drop_interval"]) if "drop_interval" in r else "-"
        lines.append(f"{name:<66} {r['runtime']:<11} {r['mAP50_95']:>8.4f} {drop:>26} "
                     f"{'-' if name in (FLOAT_ONNX, FLOAT_TORCH) else int8:>10} {r.get('seconds') or 0.0:>7.0f} "
                     f"{format_drop(r['ours_minus_it']) if 'ours_minus_it' in r else '-':>26}")
    total = sum((r.get("seconds") or 0.0) + (r.get("eval_s") or 0.0) for r in rows.values())
    lines.append(f"wall s: each tool's own time (calibration, search, export); all rows with their evaluations: "
                 f"{total / 60:.1f} min")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    missing = peers.missing_peers(sorted({PEER_ROWS[p] for p in args.peers}))
    for row in args.peers:
        if PEER_ROWS[row] in missing:
            print(f"skipping {row}: {missing[PEER_ROWS[row]]}", flush=True)
    args.peers = [p for p in args.peers if PEER_ROWS[p] not in missing]
    device, out = rcb.start_run(args)
    model = load_model(args.weights).to(device).eval()
    val = CocoDetection(args.val_data, args.val_images, img_size=args.img_size, stride=model_stride(model))
    table = Table(out, _settings(args))
    fp32 = float_rows(args, table, model, val, out, device)
    ours = None if args.no_ours else our_rows(args, table, val, out, device)
    images = peers.calibration_images(args.unlabelled_images, args.img_size, args.calib_images, args.workers)
    nncf_rows(args, table, fp32, images, val, out)
    modelopt_onnx_rows(args, table, fp32, images, val, out)
    if "auto-quantize" in args.peers:
        auto_quantize_rows(args, table, model, images, val, out, device, ours)
    nncf_rows(args, table, fp32, images, val, out, accuracy_control=True)
    rows = table.rows
    add_drop_intervals(rows, val)
    print(format_table(rows), flush=True)
    if args.json:
        write_json(args.json, {"rows": rows, "skipped": missing, "args": args_dict(args)})
    return {f"{name} {k}": v for name, row in rows.items() for k, v in row.items() if isinstance(v, (int, float))}


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
