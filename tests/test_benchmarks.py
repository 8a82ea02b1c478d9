"""The benchmark scripts run as their --help says, on a few layers of a tiny model."""
from __future__ import annotations

import json
import os
import shutil

import onnx
import pytest

from tests.helpers import SIZE, load_script
from utils.cli import run_cli
from utils.data.coco import CocoDetection
from utils.deploy.onnx_graph import qdq_summary
from utils.inference.evaluate import evaluate
from utils.inference.runners import OnnxRuntimeRunner
from utils.quant import calibration
from utils.sensitivity.metrics import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ["backbone.ERBlock_2.0.rbr_reparam", "neck.Rep_p3.block.0.rbr_reparam", "detect.cls_preds.0",
          "detect.reg_preds.1"]


def _import_benchmark():
    return load_script("benchmarks/sensitivity_benchmark.py")


def test_benchmark_runs_on_a_few_layers(tiny_checkpoint, tiny_val, tmp_path, capsys):
    bench = _import_benchmark()
    out = tmp_path / "bench.json"
    args = bench.get_args_parser().parse_args(
        ["--weights", str(tiny_checkpoint), "--data", tiny_val["json"], "--images", tiny_val["images"], "--data-root",
         tiny_val["images"], "--img-size", str(SIZE), "--max-images", "6", "--batch-size", "4", "--batch-number",
         "2", "--proxy-images", "8", "--workers", "0", "--layers", *LAYERS, "--json", str(out),
         "--map-reliability"])
    result = bench.main(args)
    saved = json.loads(out.read_text())
    for method in METHODS:
        for key in ("seconds_per_layer", "total_seconds", "spearman", "top5_overlap", "top10_overlap"):
            assert key in saved[method], (method, key)
    assert saved["map"]["spearman"] == pytest.approx(1.0) and result["map_top5_overlap"] == 4
    assert -1.0 <= saved["map[even vs odd]"]["spearman"] <= 1.0 and saved["layer_names"] == LAYERS
    assert "spearman" in capsys.readouterr().out
    assert os.path.exists(out)


def test_benchmark_makes_its_own_data_when_none_is_named(tiny_checkpoint, tmp_path, capsys):
    bench = _import_benchmark()
    synthetic = tmp_path / "synthetic"
    args = bench.get_args_parser().parse_args(
        ["--weights", str(tiny_checkpoint), "--synthetic-dir", str(synthetic), "--img-size", str(SIZE),
         "--batch-size", "4", "--batch-number", "2", "--proxy-images", "8", "--workers", "0", "--methods", "sqnr",
         "--layers", LAYERS[0]])
    result = bench.main(args)
    assert result["sqnr_seconds_per_layer"] > 0 and "spearman" not in " ".join(result)  # no map: no agreement
    record = json.loads((synthetic / "synthetic.json").read_text())
    assert record["settings"] == {"num_train": 8, "num_val": 200, "img_size": SIZE, "seed": 0}
    assert len(list((synthetic / "images" / "val").iterdir())) == 200
    stamp = (synthetic / "annotations" / "instances_val.json").stat().st_mtime_ns
    bench.main(args)  # the second run reuses the set
    assert (synthetic / "annotations" / "instances_val.json").stat().st_mtime_ns == stamp


def test_benchmark_names_the_missing_data(tiny_checkpoint, tmp_path, capsys):
    bench = _import_benchmark()
    args = bench.get_args_parser().parse_args(["--weights", str(tiny_checkpoint), "--data", "x.json"])
    with pytest.raises(SystemExit) as exc:
        run_cli(bench.main, args)
    assert exc.value.code == 2 and "--data-root is required" in capsys.readouterr().err


def _real_sets(tiny_val) -> list[str]:
    return ["--val-data", tiny_val["json"], "--val-images", tiny_val["images"], "--train-data", tiny_val["json"],
            "--train-images", tiny_val["images"], "--unlabelled-images", tiny_val["images"]]


def test_real_coco_benchmark_runs_every_stage(tiny_checkpoint, tiny_val, tmp_path, capsys):
    bench = load_script("benchmarks/real_coco_benchmark.py")
    args = bench.get_args_parser().parse_args(
        ["--weights", str(tiny_checkpoint), *_real_sets(tiny_val), "--img-size", str(SIZE), "--batch-size", "4",
         "--calib-images", "8", "--workers", "0", "--calibrators", "max", "percentile-99.99", "--partial-calibrator",
         "max",
         "--method-calibrator", "percentile-99.99", "--proxy-images", "4", "--target-drop", "1.0",
         "--layers", *LAYERS[:2], "--output-dir", str(tmp_path / "out"), "--json", str(tmp_path / "bench.json"),
         "--no-progress", "--qat-epochs", "1", "--qat-lr", "1e-5", "--equalize", "all", "--equalize-alpha", "0.5",
         "--qat-from", "full", "ours", "full-eq"])
    bench.main(args)
    result = json.loads((tmp_path / "bench.json").read_text())
    rows, quality = result["rows"], result["proxy_quality"]
    ours = "ours (percentile-99.99, re-ranked by sqnr, drop 1.0, stop on point)"
    ours_eq = "ours (percentile-99.99 + eq all a0.5, re-ranked by sqnr, drop 1.0, stop on point)"
    qat_eq = "QAT full INT8 + eq all a0.5 (1 epoch, learned amax)"
    seed = "seed partial (max, drop 1.0, stop on point)"
    assert list(rows) == ["float", "float (square)", "int8 max", "int8 percentile-99.99", "int8 max + eq all a0.5",
                          "int8 percentile-99.99 + eq all a0.5", ours, ours_eq, seed,
                          "seed ranking, 0 most sensitive float", "seed partial Q/DQ ONNX (ORT)",
                          "ours Q/DQ ONNX (ORT)", "ours + eq all a0.5 Q/DQ ONNX (ORT)",
                          "QAT full INT8 (1 epoch, learned amax)",
                          "QAT full INT8 (1 epoch, learned amax) Q/DQ ONNX (ORT)", "QAT ours (1 epoch, learned amax)",
                          "QAT ours (1 epoch, learned amax) Q/DQ ONNX (ORT)", qat_eq, f"{qat_eq} Q/DQ ONNX (ORT)"]
    assert rows["int8 max + eq all a0.5"]["transform"]["equalize"]["layers"] > 0
    # every measured drop carries its interval against float: full INT8 and ONNX rows from their saved predictions,
    # the partial rows from partial_quant.py
    for name in ("int8 max", "int8 percentile-99.99 + eq all a0.5", "ours Q/DQ ONNX (ORT)", ours, ours_eq,
                 "QAT ours (1 epoch, learned amax)"):
        d = rows[name]["drop_interval"]
        assert d["low"] <= d["drop"] <= d["high"], name
    assert rows["int8 max"]["drop_interval"]["drop"] == round(rows["float"]["mAP50_95"] - rows["int8 max"]["mAP50_95"],
                                                              4)
    # the fixed-size ONNX runs square canvases: its drop is from the float model on square canvases, and it is
    # compared with its PyTorch model on the same canvases
    onnx_row = rows["ours Q/DQ ONNX (ORT)"]
    assert rows["float"]["letterbox"] == "rect" and onnx_row["letterbox"] == rows["float (square)"]["letterbox"] == \
        "square"
    assert onnx_row["drop_interval"]["drop"] == round(rows["float (square)"]["mAP50_95"] - onnx_row["mAP50_95"], 4)
    assert onnx_row["minus_pytorch"] == pytest.approx(onnx_row["mAP50_95"] - onnx_row["pytorch_mAP50_95"], abs=1.5e-4)
    assert calibration.load_calibrated(tmp_path / "out" / "calibrated_percentile-99.99_eq.pt").quant_transform
    qat = rows["QAT full INT8 (1 epoch, learned amax)"]
    assert qat["int8_layers"] == qat["total_layers"] and qat["loss_after"] < qat["loss_before"]
    partial = rows[seed]
    # drop 1.0: the seed's search stops at its first evaluation, full INT8 (amax shared, so not the "int8 max" row)
    assert partial["int8_layers"] == partial["total_layers"] and partial["evaluations"] == 1
    # drop 1.0: full INT8 (input amax shared for TensorRT) is within budget after one evaluation
    assert rows[ours]["int8_layers"] == rows[ours]["total_layers"] and rows[ours]["evaluations"] == 1
    assert (tmp_path / "out" / "ranking" / "sensitivity_map.json").is_file()
    assert set(quality) == {f"{m} {d}" for m in ("map", "sqnr", "cosine", "mse") for d in ("single", "revert")}
    assert quality["map revert"]["split_half_rho"] is not None and quality["sqnr single"]["top10_vs_map"] == 2
    out = capsys.readouterr().out
    assert "seed partial" in out and "split-half" in out
    searched = (tmp_path / "out" / "partial" / "partial_quant.json").stat().st_mtime_ns
    tuned = (tmp_path / "out" / "qat_full" / "qat.json").stat().st_mtime_ns
    bench.main(args)  # a rerun resumes the finished rankings and reuses the searches instead of recomputing them
    assert (tmp_path / "out" / "partial" / "partial_quant.json").stat().st_mtime_ns == searched
    assert (tmp_path / "out" / "qat_full" / "qat.json").stat().st_mtime_ns == tuned
    ours_report = tmp_path / "out" / "ours" / "partial_quant.json"
    ours_searched = ours_report.stat().st_mtime_ns
    shutil.copyfile(tmp_path / "out" / "calibrated_max.pt", tmp_path / "out" / "calibrated_percentile-99.99.pt")
    bench.main(args)  # same arguments, but its calibration file now holds other amax: searched again
    assert ours_report.stat().st_mtime_ns != ours_searched
    assert json.loads(ours_report.read_text())["calibration"]["method"] == "max"


def test_real_coco_benchmark_without_shared_names_the_paths(capsys):
    bench = load_script("benchmarks/real_coco_benchmark.py")
    args = bench.get_args_parser().parse_args(["--weights", "x.pt"])
    args.train_data = None
    with pytest.raises(SystemExit) as exc:
        run_cli(bench.main, args)
    assert exc.value.code == 2 and "pass --train-data" in capsys.readouterr().err


def test_gpu_check_compares_two_devices(tiny_checkpoint, tiny_val, tmp_path, capsys):
    """Run on two CPU 'devices' (what CI has): every check passes, with both runs' timings in the JSON."""
    check = load_script("benchmarks/gpu_check.py")
    args = check.get_args_parser().parse_args(
        ["--weights", str(tiny_checkpoint), "--val-data", tiny_val["json"], "--val-images", tiny_val["images"],
         "--calib-images", tiny_val["images"], "--devices", "cpu", "cpu", "--img-size", str(SIZE), "--batch-size",
         "4", "--batch-number", "2", "--proxy-images", "4", "--workers", "0", "--layers", "detect.*",
         "--output-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "check.json"), "--no-progress"])
    result = check.main(args)
    assert result["passed"] and result["checks"]["amax_max_rel_diff"]["value"] == 0.0
    assert result["checks"]["top10_same_order"]["value"] is True
    saved = json.loads((tmp_path / "check.json").read_text())
    assert [r["device"] for r in saved["runs"]] == ["cpu", "cpu"]
    assert all(r["seconds"]["calibration_and_ranking"] > 0 for r in saved["runs"])
    assert "PASS  map_int8_abs_diff" in capsys.readouterr().out


def test_equalization_benchmark_chooses_on_train_and_reports_val(tiny_checkpoint, tiny_val, tmp_path, capsys):
    bench = load_script("benchmarks/equalization_benchmark.py")
    args = bench.get_args_parser().parse_args(
        ["--weights", str(tiny_checkpoint), "--val-data", tiny_val["json"], "--val-images", tiny_val["images"],
         "--train-data", tiny_val["json"], "--train-images", tiny_val["images"], "--img-size", str(SIZE),
         "--batch-size", "4", "--calib-images", "8", "--workers", "0", "--settings", "p99.99", "p99.99 all a0.5",
         "--output-dir", str(tmp_path / "out"), "--json", str(tmp_path / "eq.json"), "--no-progress"])
    result = bench.main(args)
    table = json.loads((tmp_path / "eq.json").read_text())
    rows = table["rows"]
    assert list(rows) == ["float", "p99.99", "p99.99 all a0.5"]
    best = max(["p99.99", "p99.99 all a0.5"], key=lambda n: rows[n]["train"]["mAP50_95"])
    assert table["best_on_train"] == result["best_on_train"] == best
    assert rows["p99.99 all a0.5"]["transform"]["equalize"]["layers"] > 0 and rows["p99.99"]["transform"] == {}
    for name in ("p99.99", "p99.99 all a0.5"):
        assert rows[name]["val_drop"] == round(rows["float"]["val"]["mAP50_95"] - rows[name]["val"]["mAP50_95"], 4)
    assert "<- best on train" in capsys.readouterr().out
    mtime = (tmp_path / "out" / "rows_so_far.json").stat().st_mtime_ns
    bench.main(args)  # finished settings are reused
    assert (tmp_path / "out" / "rows_so_far.json").stat().st_mtime_ns == mtime


def test_search_transfer_states_each_search_and_what_val_measured(tiny_checkpoint, tiny_val, tmp_path, capsys):
    bench = load_script("benchmarks/search_transfer.py")
    args = bench.get_args_parser().parse_args(
        ["--weights", str(tiny_checkpoint), *_real_sets(tiny_val), "--img-size", str(SIZE), "--batch-size", "4",
         "--calib-images", "8", "--workers", "0", "--proxy-images", "4", "--rerank-pool", "2", "--target-drop",
         "0.05", "--layers", *LAYERS[:2], "--search-sizes", "6", "100", "--output-dir", str(tmp_path / "out"),
         "--json", str(tmp_path / "transfer.json"), "--no-progress"])
    rows = bench.main(args)
    images = len(json.loads(open(tiny_val["json"]).read())["images"])
    assert list(rows) == [f"{m} {n} {r} 0.05" for m in ("seed", "ours") for n in (6, images)
                          for r in ("point", "upper")]
    for name, row in rows.items():
        predicted, val = row["predicted_val"], row["val_drop"]
        assert row["search_images"] == int(name.split()[1])
        assert row["val_inside_prediction"] == (predicted["low"] <= val["drop"] <= predicted["high"])
        assert row["val_within_target"] == (val["drop"] <= 0.05)
        if name.endswith("upper"):  # the whole interval of the chosen set's search drop is within the budget
            assert row["search_drop"]["high"] <= 0.05
        else:
            assert row["search_drop"]["drop"] <= 0.05
    assert "predicted val" in capsys.readouterr().out
    assert json.loads((tmp_path / "transfer.json").read_text())["rows"] == rows
    # the seed's ranking and the calibrations are real_coco_benchmark's own (shared --output-dir)
    assert (tmp_path / "out" / "ranking_eq" / "sensitivity_map.json").is_file()
    assert (tmp_path / "out" / "calibrated_percentile-99.99_eq.pt").is_file()
    # on the whole train set with the benchmark's --stop-on (point), the searches are real_coco_benchmark's own
    for folder in ("partial", "ours_eq"):
        report = json.loads((tmp_path / "out" / folder / "partial_quant.json").read_text())
        assert report["search"]["stop_on"] == "point" and "search_max_images" not in report["args"] or \
            report["args"]["search_max_images"] is None


def _peer_args(bench, tiny_checkpoint, tiny_val, tmp_path, *extra: str):
    return bench.get_args_parser().parse_args(
        ["--weights", str(tiny_checkpoint), *_real_sets(tiny_val), "--img-size", str(SIZE), "--batch-size", "4",
         "--calib-images", "8", "--workers", "0", "--target-drop", "1.0", "--output-dir", str(tmp_path / "out"),
         "--json", str(tmp_path / "peers.json"), "--no-progress", *extra])


def test_peers_benchmark_names_each_missing_peer_and_runs_the_rest(tiny_checkpoint, tiny_val, tmp_path, capsys,
                                                                 monkeypatch):
    from utils.quant import peers

    bench = load_script("benchmarks/peers.py")
    monkeypatch.setattr(peers, "missing_peers", lambda names: {n: f"{n} is not installed" for n in names})
    bench.main(_peer_args(bench, tiny_checkpoint, tiny_val, tmp_path))
    printed = capsys.readouterr().out
    assert all(f"skipping {row}: " in printed for row in bench.PEER_ROWS)
    rows = json.loads((tmp_path / "peers.json").read_text())["rows"]
    ours = "ours: search (drop 1.0 on train) Q/DQ ONNX"
    assert list(rows) == [bench.FLOAT_ONNX, bench.FLOAT_TORCH, "ours full INT8 (p99.99)",
                          "ours full INT8 (p99.99 + eq depthwise + bias corr.)", ours]
    # the ONNX row: its numbers are those of its file, measured independently; its drop is from the FP32 ONNX
    val = CocoDetection(tiny_val["json"], tiny_val["images"], img_size=SIZE)
    truth = evaluate(OnnxRuntimeRunner(rows[ours]["onnx"], optimization="basic"), val, 4, 0, progress=False)
    assert rows[ours]["mAP50_95"] == round(truth["mAP50_95"], 4)
    counts = qdq_summary(onnx.load(rows[ours]["onnx"]))
    assert rows[ours]["int8_layers"] == counts["quantized_conv"] == rows[ours]["total_layers"]  # drop 1.0: all INT8
    assert rows[ours]["drop_interval"]["drop"] == round(rows[bench.FLOAT_ONNX]["mAP50_95"] - rows[ours]["mAP50_95"], 4)
    assert rows[ours]["reference"] == bench.FLOAT_ONNX
    assert rows["ours full INT8 (p99.99)"]["reference"] == bench.FLOAT_TORCH
    # a peer row is also compared with ours on its runtime: a "peer" that is the float ONNX itself has no drop, and
    # ours is below it by exactly ours' drop
    rows["a peer"] = {"runtime": "onnxruntime", "predictions": rows[bench.FLOAT_ONNX]["predictions"]}
    bench.add_drop_intervals(rows, val)
    assert rows["a peer"]["drop_interval"]["drop"] == 0 and rows["a peer"]["ours_row"] == ours
    assert rows["a peer"]["ours_minus_it"]["drop"] == round(rows[ours]["mAP50_95"] - rows[bench.FLOAT_ONNX]["mAP50_95"],
                                                            4)
    assert "ours_minus_it" not in rows[ours]


def test_peers_benchmark_rejects_impossible_bits(tiny_checkpoint, tiny_val, tmp_path, capsys):
    bench = load_script("benchmarks/peers.py")
    with pytest.raises(SystemExit) as exc:
        run_cli(bench.main, _peer_args(bench, tiny_checkpoint, tiny_val, tmp_path, "--auto-quantize-bits", "20"))
    assert exc.value.code == 2 and "--auto-quantize-bits must be between 8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _peers_missing() -> dict:
    from utils.quant import peers

    return peers.missing_peers()


@pytest.mark.skipif(bool(_peers_missing()), reason="NNCF / ModelOpt not installed (optional: pip install -r "
                                                   "requirements-peers.txt)")
def test_peers_benchmark_rows_are_their_models_numbers(tiny_checkpoint, tiny_val, tmp_path):
    bench = load_script("benchmarks/peers.py")
    args = _peer_args(bench, tiny_checkpoint, tiny_val, tmp_path, "--no-ours", "--peers", "nncf-ptq", "nncf-ac",
                      "modelopt-max-conv", "auto-quantize", "--auto-quantize-bits", "16")
    bench.main(args)
    rows = json.loads((tmp_path / "peers.json").read_text())["rows"]
    val = CocoDetection(tiny_val["json"], tiny_val["images"], img_size=SIZE)
    for name in ("NNCF quantize (defaults)", "NNCF accuracy control (max drop 1.0 on train)",
                 "ModelOpt ONNX PTQ max (Conv only)"):
        truth = evaluate(OnnxRuntimeRunner(rows[name]["onnx"], optimization="basic"), val, 4, 0, progress=False)
        assert rows[name]["mAP50_95"] == round(truth["mAP50_95"], 4), name
        assert rows[name]["int8_layers"] == qdq_summary(onnx.load(rows[name]["onnx"]))["quantized_conv"] > 0
    floating = rows["ModelOpt auto_quantize (16.00 effective bits)"]  # 16 bits: nothing needs quantizing
    assert floating["int8_layers"] == 0 and floating["mAP50_95"] == rows[bench.FLOAT_TORCH]["mAP50_95"]
    assert "ModelOpt auto_quantize (8.00 effective bits = ours' INT8 fraction)" not in rows  # --no-ours
    written = (tmp_path / "out" / "nncf_ptq.onnx").stat().st_mtime_ns
    bench.main(args)  # a rerun reuses the finished rows
    assert (tmp_path / "out" / "nncf_ptq.onnx").stat().st_mtime_ns == written
