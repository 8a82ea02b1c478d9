"""Per-layer sensitivity: time of the map probe and of each label-free proxy, and how well each proxy ranks like map.

Calibrates once, runs every method over the same layers (utils.sensitivity), then reports per method the seconds per
layer, the total analysis time (set-up, baselines and layers), the speed-up over map, and Spearman's rho, top-5 and
top-10 overlap of the proxy's ranking against map's. Rows such as ``sqnr[box]`` rank by one part of a proxy (same
run, same cost). Goal: a proxy >= 20x faster than map with rho >= 0.8 and top-5 overlap >= 4/5.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# benchmarks/ is not a package: make the repository root importable when run as a script.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402

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
from utils.data.calibration import calibration_loader, proxy_batches  # noqa: E402
from utils.data.coco import CocoDetection, add_letterbox_argument, model_stride  # noqa: E402
from utils.data.synthetic import ensure_synthetic_coco  # noqa: E402
from utils.errors import InputError  # noqa: E402
from utils.quant.calibration import calibrated_model  # noqa: E402
from utils.sensitivity import analyse  # noqa: E402
from utils.sensitivity.agreement import sensitivity_scores, spearman, top_k_overlap  # noqa: E402
from utils.sensitivity.metrics import METHODS, key_column, sensitivity_order  # noqa: E402
from utils.sensitivity.probes import MapProbe, ProxyProbe, select_layers  # noqa: E402
from utils.sensitivity.store import MemoryProgress  # noqa: E402

_logger = logging.getLogger("sensitivity_benchmark")
GOAL = {"speedup": 20.0, "spearman": 0.8, "top5_overlap": 4}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    model = parser.add_argument_group("model")
    model.add_argument("--weights", default="assets/yolov6n_synthetic.pt", metavar="FILE", help="checkpoint")
    add_device_argument(model)
    model.add_argument("--num-bits", type=positive_int, default=8, metavar="N",
                       help="quantization bits (8: INT8; fewer makes per-layer effects stand out of map's noise)")
    model.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="torch CPU threads (default: torch's choice)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None, metavar="JSON",
                      help="COCO annotations for map (default: the synthetic set, see --synthetic-dir)")
    data.add_argument("--images", default=None, metavar="DIR", help="images of --data")
    data.add_argument("--data-root", default=None, metavar="DIR",
                      help="calibration (and proxy) images (default: the synthetic set's train images)")
    data.add_argument("--synthetic-dir", default="runs/synthetic_benchmark", metavar="DIR",
                      help="without --data/--images/--data-root: the synthetic set (200 val images, seed 0, as in "
                           "make demo) is generated here once and reused")
    data.add_argument("--img-size", type=img_size, default=320, metavar="N", help="letterbox size")
    add_letterbox_argument(data, extra_help=" (map's images; the proxies compare outputs on square ones)")
    data.add_argument("--max-images", type=positive_int, default=None, metavar="N",
                      help="map on the first N evaluation images (default: all)")
    data.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="images per batch")
    data.add_argument("--batch-number", type=positive_int, default=4, metavar="N", help="calibration batches")
    data.add_argument("--proxy-images", type=positive_int, default=32, metavar="N", help="images the proxies use")
    data.add_argument("--workers", type=non_negative_int, default=2, metavar="N", help="data-loading processes")
    run = parser.add_argument_group("run")
    run.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="M",
                     help=f"methods to time, map first ({', '.join(METHODS)})")
    run.add_argument("--layers", nargs="+", default=None, metavar="PATTERN", help="only these layers (globs)")
    run.add_argument("--map-reliability", action="store_true",
                     help="also run map on the even and on the odd evaluation images: their rank agreement is the "
                          "most any proxy can reach against a map this noisy")
    run.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON here")
    run.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def _probe(method: str, qmodel: torch.nn.Module, layers: list[str], args: argparse.Namespace,
           device: torch.device) -> Any:
    if method == "map":
        dataset = CocoDetection(args.data, args.images, img_size=args.img_size, max_images=args.max_images,
                                letterbox=args.letterbox, stride=model_stride(qmodel))
        return MapProbe(qmodel, dataset, args.batch_size, args.workers, device)
    batches, _ = proxy_batches(args.data_root, args.img_size, args.proxy_images, args.batch_size,
                               args.workers)
    probe = ProxyProbe(qmodel, batches, method, device, layers=layers)
    probe.prepare()
    return probe


def time_method(method: str, qmodel: torch.nn.Module, layers: list[str], args: argparse.Namespace,
                device: torch.device) -> dict[str, Any]:
    """Run one method over ``layers``: timings and each value column per layer."""
    start = time.perf_counter()
    probe = _probe(method, qmodel, layers, args, device)
    progress = MemoryProgress()
    records = analyse(probe, layers, progress, method=method)
    total = time.perf_counter() - start
    layer_seconds = sum(r["seconds"] for r in records.values())
    columns = {col: [records[n]["values"][col] for n in layers] for col in records[layers[0]]["values"]}
    return {"seconds_per_layer": layer_seconds / len(layers), "total_seconds": total, "columns": columns}


def _half_annotations(ann_file: str, parity: int, folder: Path, max_images: int | None) -> Path:
    """A copy of the COCO file with every other image (of the first ``max_images``, sorted by id)."""
    data = json.loads(Path(ann_file).read_text())
    ids = sorted(img["id"] for img in data["images"])[:max_images]
    keep = set(ids[parity::2])
    half = {**data, "images": [i for i in data["images"] if i["id"] in keep],
            "annotations": [a for a in data.get("annotations", []) if a["image_id"] in keep]}
    path = folder / f"half{parity}.json"
    path.write_text(json.dumps(half))
    return path


def map_reliability(qmodel: torch.nn.Module, layers: list[str], args: argparse.Namespace,
                    device: torch.device) -> dict[str, Any]:
    """Rank agreement of map on the even images with map on the odd images (split-half reliability)."""
    halves = []
    with tempfile.TemporaryDirectory() as folder:
        for parity in (0, 1):
            half_args = argparse.Namespace(**{**vars(args), "data": str(_half_annotations(
                args.data, parity, Path(folder), args.max_images)), "max_images": None})
            result = time_method("map", qmodel, layers, half_args, device)
            halves.append(result["columns"]["mAP50_95"])
    row = agreement(halves[0], halves[1], "map", layers)
    rho = row["spearman"]
    # Spearman-Brown: the reliability of map on both halves together
    row["full_set_reliability"] = 2 * rho / (1 + rho) if rho > -1 else -1.0
    row["proxy_rho_ceiling"] = max(0.0, row["full_set_reliability"]) ** 0.5
    return row


def agreement(reference: list[float], values: list[float], method: str, layers: list[str]) -> dict[str, Any]:
    """Spearman rho and top-k overlaps of ``values`` (of ``method``) against map's mAP50:95."""
    ref_scores, scores = sensitivity_scores(reference, "map"), sensitivity_scores(values, method)
    ref_order = [layers[i] for i in sensitivity_order(reference, "map")]
    order = [layers[i] for i in sensitivity_order(values, method)]
    return {"spearman": spearman(ref_scores, scores), "top5_overlap": top_k_overlap(ref_order, order, 5),
            "top10_overlap": top_k_overlap(ref_order, order, 10), "top5": order[:5]}


def summarise(results: dict[str, dict[str, Any]], layers: list[str]) -> dict[str, dict[str, Any]]:
    """One row per method (and per proxy part), with agreement against map where map was run."""
    rows: dict[str, dict[str, Any]] = {}
    reference = results.get("map", {}).get("columns", {}).get("mAP50_95")
    for method, res in results.items():
        key = key_column(method)
        variants = [(method, key)] + [(f"{method}[{c[len(key) + 1:]}]", c) for c in res["columns"]
                                      if c.startswith(key + "_")]
        for label, col in variants:
            row = {"seconds_per_layer": round(res["seconds_per_layer"], 4),
                   "total_seconds": round(res["total_seconds"], 2)}
            if reference is not None:
                row.update(agreement(reference, res["columns"][col], method, layers))
                row["spearman"] = round(row["spearman"], 4)
                if "map" in results:
                    row["speedup"] = round(results["map"]["seconds_per_layer"] / res["seconds_per_layer"], 1)
            rows[label] = row
    return rows


def format_rows(rows: dict[str, dict[str, Any]], layers: int) -> str:
    lines = [f"{'method':<16} {'s/layer':>9} {'total s':>9} {'speed-up':>9} {'spearman':>9} {'top5':>5} {'top10':>6}"]
    nan = float("nan")
    for label, r in rows.items():
        lines.append(f"{label:<16} {r.get('seconds_per_layer', nan):>9.4f} {r.get('total_seconds', nan):>9.1f} "
                     f"{r.get('speedup', nan):>8.1f}x {r.get('spearman', nan):>9.3f} "
                     f"{str(r.get('top5_overlap', '-')) + '/5':>5} {str(r.get('top10_overlap', '-')) + '/10':>6}")
        if "full_set_reliability" in r:
            lines.append(f"{'':<16} map's own split-half rho {r['spearman']:.3f} -> full-set reliability "
                         f"{r['full_set_reliability']:.3f} (Spearman-Brown): even a perfect proxy would reach "
                         f"only rho ~ {r['proxy_rho_ceiling']:.3f} against map")
    lines.append(f"({layers} layers; goal: >= {GOAL['speedup']:.0f}x, rho >= {GOAL['spearman']}, "
                 f"top-5 >= {GOAL['top5_overlap']}/5)")
    return "\n".join(lines)


def resolve_data(args: argparse.Namespace) -> None:
    """Fill in the synthetic set's paths when no data was named; otherwise every path the methods need."""
    if args.data is None and args.images is None and args.data_root is None:
        synthetic = ensure_synthetic_coco(args.synthetic_dir, max(args.batch_size * args.batch_number,
                                                                  args.proxy_images), 200, args.img_size, seed=0)
        args.data, args.images = synthetic["val"]["ann_file"], synthetic["val"]["img_dir"]
        args.data_root = synthetic["train"]["img_dir"]
        return
    if args.data_root is None:
        raise InputError("--data-root is required with --data/--images: pass the calibration image folder")
    if "map" in args.methods and (args.data is None or args.images is None):
        raise InputError("the map method needs --data and --images (a labelled COCO set); or leave out --methods map")


def main(args: argparse.Namespace) -> dict[str, Any]:
    resolve_data(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    loader = calibration_loader(args.data_root, args.img_size, args.batch_size, args.batch_number, args.workers)
    qmodel, calib = calibrated_model(load_model(args.weights), loader=loader, batch_number=args.batch_number,
                                     device=device, num_bits=args.num_bits)
    layers = select_layers(qmodel, args.layers)
    methods = sorted(set(args.methods), key=METHODS.index)
    results = {m: time_method(m, qmodel, layers, args, device) for m in methods}
    rows = summarise(results, layers)
    print(format_rows(rows, len(layers)), flush=True)
    if args.map_reliability:
        rows["map[even vs odd]"] = {k: (round(v, 4) if isinstance(v, float) else v)
                                    for k, v in map_reliability(qmodel, layers, args, device).items()}
        print(format_rows({"map[even vs odd]": rows["map[even vs odd]"]}, len(layers)))
    if args.json:
        per_layer = {m: res["columns"] for m, res in results.items()}
        write_json(args.json, {**rows, "layers": len(layers), "layer_names": layers, "per_layer": per_layer,
                               "calibration": calib, "args": args_dict(args)})
    return {f"{label}_{k}": v for label, row in rows.items() for k, v in row.items() if k != "top5"}


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
