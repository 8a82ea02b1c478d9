"""Per-layer INT8 sensitivity of a YOLOv6 model, ranked most sensitive first.

--direction single quantizes each layer alone (all others float; YOLOv6's tools/partial_quantization); --direction
revert returns each layer alone to float from full INT8 (leave-one-out: sees what breaks a full-INT8 model).
--method map measures COCO mAP on --data/--images (also on two halves of them, for the ranking's split-half
reliability); sqnr / cosine / mse are label-free proxies on the calibration images (see
utils/sensitivity/metrics.py). Progress is saved after every layer:
--resume continues an interrupted run, --shard K/N splits the layers over N processes and --merge joins them.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from models import model_from_checkpoint, read_checkpoint, reparameterize
from utils.cli import (
    ArgumentParser,
    add_device_argument,
    args_dict,
    img_size,
    non_negative_int,
    positive_int,
    resolve_device,
    run_cli,
)
from utils.data.calibration import calibration_loader, images_sha256, proxy_batches
from utils.data.coco import CocoDetection, add_letterbox_argument, model_stride
from utils.errors import InputError
from utils.fileio import file_sha256
from utils.quant import calibration
from utils.quant import quantizers as quant
from utils.quant.calibration import calibrated_model
from utils.quant.equalize import TransformSettings, add_transform_arguments
from utils.sensitivity import analyse, distributed
from utils.sensitivity.metrics import DIRECTIONS, METHODS
from utils.sensitivity.probes import MapProbe, ProxyProbe, select_layers
from utils.sensitivity.report import build_report, format_table, write_reports
from utils.sensitivity.store import (
    ProgressFile,
    check_progress,
    make_header,
    merge_shards,
    parse_shard,
    progress_path,
    shard_layers,
)

_logger = logging.getLogger("sensitivity_analyse")
DEFAULT_PROXY = "sqnr"  # the method without --data: label-free, the best agreement with map in the benchmark


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    model = parser.add_argument_group("model")
    model.add_argument("--weights", required=True, metavar="FILE", help="YOLOv6 release .pt or our checkpoint")
    model.add_argument("--calib-weights", default=None, metavar="FILE",
                       help="reuse a calibrated checkpoint (e.g. <output>/calibrated.pt) instead of calibrating")
    add_device_argument(model)
    model.add_argument("--seed", type=int, default=0, metavar="S", help="random seed")
    cal = parser.add_argument_group("calibration (first batch-size x batch-number images of --data-root, sorted)")
    cal.add_argument("--data-root", default=None, metavar="DIR", help="calibration image folder (searched recursively)")
    cal.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="images per batch")
    cal.add_argument("--batch-number", type=positive_int, default=4, metavar="N", help="calibration batches")
    cal.add_argument("--calib-method", choices=quant.METHODS, default=None,
                     help="input amax calibration (default: max, or the method of --calib-weights)")
    cal.add_argument("--percentile", type=float, default=99.99, metavar="P", help="for --calib-method percentile")
    cal.add_argument("--entropy-stride", type=positive_int, default=1, metavar="K",
                     help="entropy / auto: try every K-th histogram bin as the entropy amax (1: every bin, as YOLOv6; "
                          "4: calibrates about 4x faster, auto's choice barely changes)")
    add_transform_arguments(cal)
    cal.add_argument("--img-size", type=img_size, default=640, metavar="N", help="letterbox size, a multiple of 32")
    cal.add_argument("--workers", type=non_negative_int, default=2, metavar="N", help="data-loading processes")
    ana = parser.add_argument_group("analysis")
    ana.add_argument("--method", choices=METHODS, default=None,
                     help=f"map: COCO mAP per layer (needs --data/--images); sqnr/cosine/mse: label-free proxies on "
                          f"the calibration images (default: map with --data, else {DEFAULT_PROXY})")
    ana.add_argument("--direction", choices=DIRECTIONS, default="single",
                     help="single: quantize each layer alone (the seed's ranking); revert: return each layer alone "
                          "to float from full INT8 (files get a _revert suffix)")
    ana.add_argument("--data", default=None, metavar="JSON", help="COCO annotation file for --method map")
    ana.add_argument("--images", default=None, metavar="DIR", help="images of --data")
    ana.add_argument("--max-images", type=positive_int, default=None, metavar="N",
                     help="evaluate --method map on the first N images (default: all)")
    add_letterbox_argument(ana, extra_help=" (--method map; the proxies compare outputs on square calibration "
                                           "images)")
    ana.add_argument("--proxy-images", type=positive_int, default=32, metavar="N",
                     help="calibration images the proxies compare outputs on")
    ana.add_argument("--layers", nargs="+", default=None, metavar="PATTERN",
                     help="analyse only layers matching these names or globs, e.g. 'detect.*' (default: all)")
    ana.add_argument("--shard", type=_shard, default=None, metavar="K/N",
                     help="analyse layers K, K+N, K+2N, ... (0-based) with its own progress file")
    ana.add_argument("--merge", action="store_true", help="join the finished --shard progress files into the ranking")
    out = parser.add_argument_group("output")
    out.add_argument("--output", default=None, metavar="DIR",
                     help="output folder (default: runs/sensitivity/<weights stem>)")
    out.add_argument("--resume", action="store_true", help="continue the progress file of an interrupted run")
    out.add_argument("--overwrite", action="store_true", help="discard an existing progress file and start over")
    out.add_argument("--no-progress", action="store_true", help="hide progress bars")
    out.add_argument("--verbose", action="store_true", help="debug logging, one line per layer")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Option combinations argparse cannot check (InputError names the fix); sets the default --method."""
    if args.method is None:
        args.method = "map" if args.data else DEFAULT_PROXY
        if not args.data and not args.merge:
            _logger.info("no --data: ranking with the label-free %s proxy (pass --data/--images for mAP)",
                         args.method)
    if args.resume and args.overwrite:
        raise InputError("--resume and --overwrite contradict each other: pass one")
    if args.merge and args.shard is not None:
        raise InputError("--merge joins all shards: drop --shard")
    if args.merge:
        return
    if args.method == "map" and not (args.data and args.images):
        raise InputError("--method map needs the evaluation set: pass --data JSON and --images DIR")
    if not args.data_root and (not args.calib_weights or args.method != "map"):
        raise InputError(f"pass --data-root DIR with calibration images (needed to "
                         f"{'calibrate' if not args.calib_weights else 'compute the ' + args.method + ' proxy'})")


def _probe(args: argparse.Namespace, qmodel: torch.nn.Module, layers: list[str],
           device: torch.device) -> tuple[Any, dict[str, Any]]:
    if args.method == "map":
        dataset = CocoDetection(args.data, args.images, img_size=args.img_size, max_images=args.max_images,
                                letterbox=args.letterbox, stride=model_stride(qmodel))
        data = {"annotations_sha256": file_sha256(args.data), "max_images": args.max_images,
                "images": len(dataset), "letterbox": args.letterbox}
        return MapProbe(qmodel, dataset, args.batch_size, args.workers, device, direction=args.direction), data
    batches, dataset = proxy_batches(args.data_root, args.img_size, args.proxy_images, args.batch_size,
                                     args.workers)
    data = {"images_sha256": images_sha256(dataset), "images": len(dataset)}
    return ProxyProbe(qmodel, batches, args.method, device, layers=layers, direction=args.direction,
                      progress=not args.no_progress), data


def _finish(args: argparse.Namespace, output: Path, header: dict, records: dict, baselines: dict,
            start: float) -> dict[str, Any]:
    report = build_report(header, records, baselines, args_dict(args))
    paths = write_reports(output, report)
    print(format_table(report))
    first = min(report["layers"], key=lambda r: r["rank"])["name"]
    flat = {f"{name}_{col}": v for name, values in baselines.items() for col, v in values.items()}
    return {"method": args.method, "direction": args.direction, "layers": len(records), "most_sensitive": first,
            **flat,
            **{kind: str(p) for kind, p in paths.items()}, "seconds": round(time.perf_counter() - start, 2)}


def _output(args: argparse.Namespace) -> Path:
    return Path(args.output or Path("runs", "sensitivity", Path(args.weights).stem))


def _calibrated(args: argparse.Namespace, ckpt: Any, device: torch.device) -> tuple[torch.nn.Module, dict]:
    loader = None if args.calib_weights else calibration_loader(
        args.data_root, args.img_size, args.batch_size, args.batch_number, args.workers)
    model = reparameterize(model_from_checkpoint(ckpt, args.weights))
    return calibrated_model(model, calib_weights=args.calib_weights, loader=loader, batch_number=args.batch_number,
                            calib_method=args.calib_method, percentile=args.percentile, device=device,
                            entropy_stride=args.entropy_stride, transform=TransformSettings.from_args(args))


def _model_id(args: argparse.Namespace, ckpt: Any) -> dict[str, Any]:
    """What the progress files name the model by."""
    return {"sha256": file_sha256(args.weights), "config": ckpt.config.get("name")}


def _save_calibration(args: argparse.Namespace, qmodel: torch.nn.Module, output: Path) -> None:
    saved = calibration.save_calibrated(output / "calibrated.pt", qmodel, meta={"weights": str(args.weights)})
    _logger.info("calibrated checkpoint: %s (pass it as --calib-weights to skip calibration)", saved)


def analyse_layers(args: argparse.Namespace, start: float,
                   on_layer: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """One process's analysis: every selected layer, or its --shard, or the --merge of finished shards."""
    output = _output(args)
    ckpt = read_checkpoint(args.weights)
    model_id = _model_id(args, ckpt)
    if args.merge:
        return _finish(args, output, *merge_shards(output, args.method, model=model_id, direction=args.direction),
                       start)
    progress_file = progress_path(output, args.method, args.shard, args.direction)
    check_progress(progress_file, model_id, args.method, args.resume, args.overwrite,  # before the slow part
                   args.direction)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    qmodel, calib = _calibrated(args, ckpt, device)
    layers = select_layers(qmodel, args.layers)
    probe, data = _probe(args, qmodel, layers, device)
    header = make_header(model=model_id, method=args.method, calibration=calib, img_size=args.img_size,
                         data=data, layer_info=[i for i in quant.layer_info(qmodel) if i["name"] in layers],
                         shard=args.shard, direction=args.direction)
    progress = ProgressFile(progress_file, header, resume=args.resume, overwrite=args.overwrite)
    if not args.calib_weights:  # after the progress check: never replace the calibration of another analysis
        _save_calibration(args, qmodel, output)
    records = analyse(probe, shard_layers(layers, args.shard), progress, method=args.method, direction=args.direction,
                      baselines=args.shard is None or args.shard[0] == 0, on_layer=on_layer,
                      show_progress=not args.no_progress)
    if args.shard is not None:
        _logger.info("shard %d/%d done (%d layers) in %s; when every shard is done run --merge", *args.shard,
                     len(records), progress_file)
        return {"method": args.method, "shard": "%d/%d" % args.shard, "layers": len(records),
                "progress": str(progress_file), "seconds": round(time.perf_counter() - start, 2)}
    return _finish(args, output, header, records, progress.baselines, start)


def analyse_under_torchrun(args: argparse.Namespace, rank: int, world: int, start: float,
                           on_layer: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """torchrun: rank 0 calibrates once (unless --calib-weights), every rank analyses shard RANK/WORLD_SIZE,
    rank 0 merges the shards into the ranking when all are done."""
    if args.shard is not None or args.merge:
        raise InputError("under torchrun each rank takes its shard from RANK / WORLD_SIZE: drop --shard / --merge")
    device = distributed.rank_device(resolve_device(args.device))
    args.device, args.shard, output = str(device), (rank, world), _output(args)
    distributed.init_group(device)
    try:
        if not args.calib_weights:  # one calibration for all ranks, so that the shards can be merged
            if rank == 0:
                ckpt = read_checkpoint(args.weights)
                check_progress(progress_path(output, args.method, args.shard, args.direction),
                               _model_id(args, ckpt), args.method, args.resume, args.overwrite, args.direction)
                torch.manual_seed(args.seed)
                _save_calibration(args, _calibrated(args, ckpt, device)[0], output)
            distributed.barrier()
            args.calib_weights = str(output / "calibrated.pt")
        shard = analyse_layers(args, start, on_layer)
        distributed.barrier()  # every shard finished (a failed rank makes torchrun stop the others)
        if rank != 0:
            return shard
        args.shard, args.merge = None, True
        return analyse_layers(args, start)
    finally:
        distributed.close_group()


def main(args: argparse.Namespace, on_layer: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    check_args(args)
    ranked = distributed.torchrun_shard()
    if ranked is not None:
        return analyse_under_torchrun(args, *ranked, start, on_layer)
    return analyse_layers(args, start, on_layer)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
