"""Tests for sensitivity_analyse.py: the seed's command line, map numbers equal independent evaluations, resume
after SIGKILL, determinism, shards + merge, and one-line errors for bad input. CPU, 64 px images, a few layers."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import sensitivity_analyse as sa
from models import save_checkpoint
from tests.helpers import REPO, SIZE, one_line_error, tiny_detector
from utils.data.coco import CocoDetection
from utils.inference.evaluate import evaluate
from utils.inference.runners import TorchRunner
from utils.quant import calibration
from utils.quant import quantizers as quant
from utils.sensitivity.report import read_ranking
from utils.sensitivity.store import progress_path, read_progress

pytestmark = pytest.mark.usefixtures("one_thread")


LAYERS = ["backbone.ERBlock_2.0.rbr_reparam", "neck.Rep_p3.block.0.rbr_reparam", "detect.cls_preds.0",
          "detect.reg_preds.1"]


def _exit_2(argv: list[str], capsys) -> str:
    return one_line_error(sa, argv, capsys)


def _argv(tiny_checkpoint, tiny_val, output, *extra, layers=LAYERS) -> list[str]:
    argv = ["--weights", str(tiny_checkpoint), "--data-root", tiny_val["images"], "--img-size", str(SIZE),
            "--batch-size", "4", "--batch-number", "2", "--proxy-images", "8", "--workers", "0", "--no-progress",
            "--output", str(output), *extra]
    return argv + (["--layers", *layers] if layers else [])


def _map_argv(tiny_checkpoint, tiny_val, output, *extra) -> list[str]:
    return _argv(tiny_checkpoint, tiny_val, output, "--method", "map", "--data", tiny_val["json"], "--images",
                 tiny_val["images"], "--max-images", "6", *extra)


def _run(argv: list[str], on_layer=None) -> dict:
    return sa.main(sa.get_args_parser().parse_args(argv), on_layer=on_layer)


def test_seed_command_line_parses():
    args = sa.get_args_parser().parse_args(["--weights", "x.pt", "--batch-size", "32", "--batch-number", "4",
                                            "--data-root", "d/"])
    assert (args.weights, args.batch_size, args.batch_number, args.data_root) == ("x.pt", 32, 4, "d/")
    assert args.calib_weights is None and args.img_size == 640 and args.output is None
    sa.check_args(args)  # no --data: the label-free default proxy, so the seed's command runs as written
    assert args.method == sa.DEFAULT_PROXY
    assert sa.get_args_parser().parse_args(["--weights", "x.pt", "--shard", "1/3"]).shard == (1, 3)


# --------------------------------------------------------------------------------------------------- map
def test_map_numbers_equal_independent_evaluations(tiny_checkpoint, tiny_val, tmp_path):
    result = _run(_map_argv(tiny_checkpoint, tiny_val, tmp_path / "out"))
    report = json.loads(Path(result["json"]).read_text())
    model = calibration.load_calibrated(tmp_path / "out" / "calibrated.pt")
    # YOLOv6's rect canvases by default, as eval_coco.py
    dataset = CocoDetection(tiny_val["json"], tiny_val["images"], img_size=SIZE, max_images=6, letterbox="rect",
                            stride=model.max_stride)
    assert report["data"]["letterbox"] == "rect"

    def evaluate_now() -> tuple[float, float]:
        metrics = evaluate(TorchRunner(model), dataset, batch_size=4, workers=0, progress=False)
        return metrics["mAP50"], metrics["mAP50_95"]

    quant.disable_all(model)
    fp = evaluate_now()
    assert fp[1] > 0 and (report["baselines"]["fp"]["mAP50"], report["baselines"]["fp"]["mAP50_95"]) == fp
    assert (result["fp_mAP50"], result["fp_mAP50_95"]) == fp
    rows = {row["name"]: row for row in report["layers"]}
    assert list(rows) == LAYERS and sorted(r["rank"] for r in rows.values()) == [1, 2, 3, 4]
    for layer in LAYERS:
        quant.quantize_only(model, [layer])
        assert (rows[layer]["mAP50"], rows[layer]["mAP50_95"]) == evaluate_now()
    text = Path(result["txt"]).read_text().splitlines()
    assert [line.split()[0] for line in text] == LAYERS  # model order, seed format, no header
    assert Path(result["png"]).stat().st_size > 0 and Path(result["csv"]).read_text().startswith("name,")
    assert report["args"]["method"] == "map" and report["calibration"]["method"] == "max"


# ----------------------------------------------------------------------------- resume, determinism, shards
_KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import sensitivity_analyse as sa
done = []
def on_layer(name, record):
    done.append(name)
    if len(done) == {k}:
        os.kill(os.getpid(), signal.SIGKILL)
sa.main(sa.get_args_parser().parse_args({argv!r}), on_layer=on_layer)
"""


def test_resume_after_sigkill_computes_only_the_rest(tiny_checkpoint, tiny_val, tmp_path):
    layers = ["backbone.ERBlock_2.0.rbr_reparam", "neck.reduce_layer1.block.conv", "neck.Rep_p3.block.0.rbr_reparam",
              "detect.stems.2.block.conv", "detect.cls_preds.0", "detect.reg_preds.1"]  # model order
    full = _run(_argv(tiny_checkpoint, tiny_val, tmp_path / "full", "--method", "sqnr", layers=layers))
    argv = _argv(tiny_checkpoint, tiny_val, tmp_path / "cut", "--method", "sqnr", layers=layers)
    proc = subprocess.run([sys.executable, "-c", _KILLER.format(repo=str(REPO), k=2, argv=argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    progress = progress_path(tmp_path / "cut", "sqnr")
    _, records, _ = read_progress(progress)
    assert [r["name"] for r in records if r["type"] == "layer"] == layers[:2]
    with open(progress, "a") as f:
        f.write('{"type": "layer", "name": "neck.reduce_la')  # a torn last line, as a kill mid-write leaves
    computed = []
    resumed = _run(argv + ["--resume"], on_layer=lambda name, record: computed.append(name))
    assert computed == layers[2:]
    assert Path(resumed["txt"]).read_bytes() == Path(full["txt"]).read_bytes()
    assert sum(r["type"] == "layer" for r in read_progress(progress)[1]) == len(layers)


def test_interrupted_run_keeps_finished_layers(tiny_checkpoint, tiny_val, tmp_path, capsys):
    argv = _map_argv(tiny_checkpoint, tiny_val, tmp_path / "out")

    def stop(name, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(argv, on_layer=stop)
    _, records, _ = read_progress(progress_path(tmp_path / "out", "map"))
    assert [r["name"] for r in records if r["type"] == "layer"] == LAYERS[:1]
    assert {r["name"] for r in records if r["type"] == "baseline"} == {"fp", "ptq"}
    assert "--resume" in _exit_2(argv, capsys)  # without --resume an existing progress file is an error
    computed = []
    _run(argv + ["--resume", "--calib-weights", str(tmp_path / "out" / "calibrated.pt")],
         on_layer=lambda name, record: computed.append(name))
    assert computed == LAYERS[1:]


def test_same_inputs_give_identical_ranking_files(tiny_checkpoint, tiny_val, tmp_path):
    first = _run(_argv(tiny_checkpoint, tiny_val, tmp_path / "a", "--method", "cosine"))
    second = _run(_argv(tiny_checkpoint, tiny_val, tmp_path / "b", "--method", "cosine"))
    assert Path(first["txt"]).read_bytes() == Path(second["txt"]).read_bytes()
    one, two = (json.loads(Path(r["json"]).read_text()) for r in (first, second))
    assert one["calibration"]["amax_sha256"] == two["calibration"]["amax_sha256"]
    assert [r["rank"] for r in one["layers"]] == [r["rank"] for r in two["layers"]]


def test_shards_merge_to_the_single_run(tiny_checkpoint, tiny_val, tmp_path, capsys):
    single = _run(_argv(tiny_checkpoint, tiny_val, tmp_path / "single", "--method", "mse"))
    out = tmp_path / "sharded"
    calib = str(tmp_path / "single" / "calibrated.pt")
    for k in (0, 1):
        result = _run(_argv(tiny_checkpoint, tiny_val, out, "--method", "mse", "--shard", f"{k}/2", "--calib-weights",
                            calib))
        assert result["layers"] == 2
    merged = _run(_argv(tiny_checkpoint, tiny_val, out, "--method", "mse", "--merge", layers=None))
    assert Path(merged["txt"]).read_bytes() == Path(single["txt"]).read_bytes()
    assert json.loads(Path(merged["json"]).read_text())["baselines"] == \
        json.loads(Path(single["json"]).read_text())["baselines"]
    shard1 = progress_path(out, "mse", (1, 2))
    lines = shard1.read_text().splitlines(keepends=True)
    shard1.write_text("".join(lines[:-1]))  # shard 1 not finished
    assert "not analysed yet" in _exit_2(_argv(tiny_checkpoint, tiny_val, out, "--method", "mse", "--merge",
                                               layers=None), capsys)
    shard1.unlink()
    assert "shard(s) 1/2 missing" in _exit_2(_argv(tiny_checkpoint, tiny_val, out, "--method", "mse", "--merge",
                                                   layers=None), capsys)


def test_torchrun_ranks_share_the_layers_and_merge_to_the_single_run(tiny_val, tmp_path):
    """2 CPU processes (gloo) on the bundled model: rank 0 calibrates once, each rank analyses its shard, rank 0
    merges; the ranking file is byte-identical to one process's; rerun with --resume, nothing is recomputed."""
    demo = str(REPO / "assets" / "yolov6n_synthetic.pt")
    argv = ["--weights", demo, "--method", "map", "--data", tiny_val["json"], "--images", tiny_val["images"],
            "--data-root", tiny_val["images"], "--img-size", str(SIZE), "--batch-size", "4", "--batch-number", "2",
            "--workers", "0", "--no-progress", "--layers", *LAYERS]
    single = _run([*argv, "--output", str(tmp_path / "single")])
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              str(REPO / "sensitivity_analyse.py"), *argv, "--output", str(tmp_path / "ranks")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = tmp_path / "ranks"
    assert sorted(p.name for p in ranks.glob("progress_map.shard*")) == ["progress_map.shard0of2.jsonl",
                                                                       "progress_map.shard1of2.jsonl"]
    assert (ranks / "sensitivity_map.txt").read_bytes() == Path(single["txt"]).read_bytes()
    before = {p.name: p.read_bytes() for p in ranks.glob("progress_map.shard*")}
    again = subprocess.run([*launch, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in ranks.glob("progress_map.shard*")} == before
    assert (ranks / "sensitivity_map.txt").read_bytes() == Path(single["txt"]).read_bytes()


def test_revert_direction_map_numbers_files_and_shards(tiny_checkpoint, tiny_val, tmp_path, capsys):
    """--direction revert: each value is the mAP of full INT8 with only that layer float (evaluated here
    independently), a higher mAP ranks first, files carry a _revert suffix and say so, shards merge to the same."""
    out = tmp_path / "rev"
    result = _run(_map_argv(tiny_checkpoint, tiny_val, out, "--direction", "revert"))
    assert Path(result["txt"]).name == "sensitivity_map_revert.txt" and result["direction"] == "revert"
    report = json.loads(Path(result["json"]).read_text())
    model = calibration.load_calibrated(out / "calibrated.pt")
    dataset = CocoDetection(tiny_val["json"], tiny_val["images"], img_size=SIZE, max_images=6, letterbox="rect",
                            stride=model.max_stride)
    values = {}
    for layer in LAYERS:
        quant.enable_all(model)
        quant.set_quantized(model, [layer], False)
        values[layer] = evaluate(TorchRunner(model), dataset, batch_size=4, workers=0, progress=False)["mAP50_95"]
    rows = {row["name"]: row for row in report["layers"]}
    assert {name: rows[name]["mAP50_95"] for name in LAYERS} == values
    expected = sorted(LAYERS, key=lambda n: (-values[n], LAYERS.index(n)))  # most mAP regained = most sensitive
    assert read_ranking(result["txt"]) == expected == read_ranking(result["json"])
    assert "direction: revert" in Path(result["txt"]).read_text().splitlines()[0]
    assert not (out / "sensitivity_map.txt").exists() and report["direction"] == "revert"
    calib = str(out / "calibrated.pt")
    for k in (0, 1):
        _run(_map_argv(tiny_checkpoint, tiny_val, tmp_path / "sh", "--direction", "revert", "--shard", f"{k}/2",
                       "--calib-weights", calib))
    merged = _run(_argv(tiny_checkpoint, tiny_val, tmp_path / "sh", "--method", "map", "--direction", "revert",
                        "--merge", layers=None))
    assert Path(merged["txt"]).read_bytes() == Path(result["txt"]).read_bytes()
    single_progress = progress_path(tmp_path / "sh2", "map")
    single_progress.parent.mkdir()
    single_progress.write_bytes(progress_path(out, "map", direction="revert").read_bytes())
    assert "direction" in _exit_2(_map_argv(tiny_checkpoint, tiny_val, tmp_path / "sh2", "--resume",
                                            "--calib-weights", calib), capsys)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_exit_2_with_one_line(tiny_checkpoint, tiny_val, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = _argv(tiny_checkpoint, tiny_val, tmp_path / "o1", "--method", "sqnr")
    argv[argv.index("--data-root") + 1] = str(empty)
    assert "no images found" in _exit_2(argv, capsys)
    # a calibration of another model
    other = save_checkpoint(tmp_path / "other.pt", tiny_detector(seed=1))
    _run(_argv(other, tiny_val, tmp_path / "o2", "--method", "sqnr"))
    assert "another model" in _exit_2(_argv(tiny_checkpoint, tiny_val, tmp_path / "o3", "--method", "sqnr",
                                            "--calib-weights", str(tmp_path / "o2" / "calibrated.pt")), capsys)
    # resume with the progress file of another model, then of another method
    assert "another model" in _exit_2(_argv(tiny_checkpoint, tiny_val, tmp_path / "o2", "--method", "sqnr",
                                            "--resume"), capsys)
    sqnr_progress = progress_path(tmp_path / "o2", "sqnr")
    progress_path(tmp_path / "o2", "cosine").write_bytes(sqnr_progress.read_bytes())
    assert "another method" in _exit_2(_argv(other, tiny_val, tmp_path / "o2", "--method", "cosine",
                                             "--resume"), capsys)
    assert sqnr_progress.read_bytes() == progress_path(tmp_path / "o2", "cosine").read_bytes()  # untouched
    assert "matches no quantized layer" in _exit_2(_argv(tiny_checkpoint, tiny_val, tmp_path / "o4", "--method",
                                                         "sqnr", layers=["nope.*"]), capsys)
    assert "--data JSON" in _exit_2(_argv(tiny_checkpoint, tiny_val, tmp_path / "o5", "--method", "map"), capsys)


@pytest.mark.parametrize("extra, message", [(["--calib-method", "minmax"], "invalid choice"),
                                            (["--shard", "2/2"], "0 <= K < N"),
                                            (["--method", "psnr"], "invalid choice")])
def test_bad_options_exit_2_from_a_real_process(tmp_path, extra, message):
    proc = subprocess.run([sys.executable, str(REPO / "sensitivity_analyse.py"), "--weights", "w.pt", *extra],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr


def test_dead_channel_warns_and_stays_finite(tiny_val, tmp_path, caplog):
    weights = save_checkpoint(tmp_path / "dead.pt", tiny_detector(dead_channel=True))
    with caplog.at_level("WARNING"):
        result = _run(_argv(weights, tiny_val, tmp_path / "out", "--method", "sqnr"))
    assert any("amax" in r.getMessage() and "detect.cls_preds.0" in r.getMessage() for r in caplog.records)
    report = json.loads(Path(result["json"]).read_text())
    values = [v for row in report["layers"] for k, v in row.items() if k.startswith("sqnr")]
    assert values and all(math.isfinite(v) for v in values)
    assert "NaN" not in Path(result["json"]).read_text() and "nan" not in Path(result["txt"]).read_text()
