"""Tests for utils/sensitivity.py and sensitivity_analyse.py: the seed's file format and command line, map numbers
equal independent evaluations, proxy metrics equal hand computations, forward reuse changes nothing, resume after
SIGKILL, determinism, shards + merge, and one-line errors for bad input. CPU, 64 px images, a few layers."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sensitivity_analyse as sa
from models import build_model, load_config, reparameterize, save_checkpoint
from models.config import with_overrides
from utils import quantization as quant
from utils import sensitivity as sens
from utils.cli import run_cli
from utils.data import CocoDetection
from utils.errors import InputError
from utils.evaluate import evaluate
from utils.runners import TorchRunner
from utils.synthetic import generate_synthetic_coco

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
LAYERS = ["backbone.ERBlock_2.0.rbr_reparam", "neck.Rep_p3.block.0.rbr_reparam", "detect.cls_preds.0",
          "detect.reg_preds.1"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("synthetic")
    info = generate_synthetic_coco(out, num_train=0, num_val=8, img_size=SIZE, seed=11)
    return {"json": str(info["val"]["ann_file"]), "images": str(info["val"]["img_dir"])}


def _tiny_model(seed: int = 0, dead_channel: bool = False) -> torch.nn.Module:
    """An untrained 6-class yolov6n whose prediction layers are perturbed so that it outputs real detections."""
    torch.manual_seed(seed)
    model = build_model(with_overrides(load_config("yolov6n"), num_classes=6)).eval()
    with torch.no_grad():
        for conv in model.detect.cls_preds:
            conv.weight.normal_(0, 0.05)
            conv.bias.normal_(0, 0.5)
        for conv in model.detect.reg_preds:
            conv.weight.normal_(0, 0.02)
            conv.bias.uniform_(1.0, 4.0)
        if dead_channel:
            model.detect.cls_preds[0].weight[0].zero_()
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", _tiny_model())


def _argv(checkpoint, synthetic, output, *extra, layers=LAYERS) -> list[str]:
    argv = ["--weights", str(checkpoint), "--data-root", synthetic["images"], "--img-size", str(SIZE),
            "--batch-size", "4", "--batch-number", "2", "--proxy-images", "8", "--workers", "0", "--no-progress",
            "--output", str(output), *extra]
    return argv + (["--layers", *layers] if layers else [])


def _map_argv(checkpoint, synthetic, output, *extra) -> list[str]:
    return _argv(checkpoint, synthetic, output, "--method", "map", "--data", synthetic["json"], "--images",
                 synthetic["images"], "--max-images", "6", *extra)


def _run(argv: list[str], on_layer=None) -> dict:
    return sa.main(sa.get_args_parser().parse_args(argv), on_layer=on_layer)


def _exit_2(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(sa.main, sa.get_args_parser().parse_args(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and err[-1] == errors[0] and not any("Traceback" in line for line in err)
    return errors[0]


# ------------------------------------------------------------------------------------------ format and CLI
def test_seed_text_format_round_trip(tmp_path):
    rows = [{"name": "backbone.stem.rbr_reparam", "mAP50": 0.61234, "mAP50_95": 0.412345},
            {"name": "detect.cls_preds.0", "mAP50": 0.5, "mAP50_95": 0.3}]
    text = sens.format_sensitivity(rows, "map")
    assert text == "backbone.stem.rbr_reparam 0.6123 0.4123\ndetect.cls_preds.0 0.5000 0.3000\n"
    for line in text.splitlines(keepends=True):  # YOLOv6's quant_sensitivity_load
        layer, map50, map50_95 = line.strip("\n").split(" ")
        assert float(map50) >= 0 and float(map50_95) >= 0
    parsed, metric = sens.parse_sensitivity(text)
    assert metric == "mAP50_95" and parsed == [("backbone.stem.rbr_reparam", 0.6123, 0.4123),
                                               ("detect.cls_preds.0", 0.5, 0.3)]
    proxy = sens.format_sensitivity([{"name": "a.b", "sqnr_db_neck": 31.5, "sqnr_db": 20.25}], "sqnr")
    assert proxy.startswith("# metric: sqnr_db (higher = less sensitive")
    path = tmp_path / "s.txt"
    path.write_text(proxy)
    assert sens.read_sensitivity(path) == ([("a.b", 31.5, 20.25)], "sqnr_db")
    path.write_text("a.b 0.1\n")
    with pytest.raises(InputError, match="line 1"):
        sens.read_sensitivity(path)


def test_seed_command_line_parses():
    args = sa.get_args_parser().parse_args(["--weights", "x.pt", "--batch-size", "32", "--batch-number", "4",
                                            "--data-root", "d/"])
    assert (args.weights, args.batch_size, args.batch_number, args.data_root) == ("x.pt", 32, 4, "d/")
    assert args.calib_weights is None and args.img_size == 640 and args.output is None
    sa.check_args(args)  # no --data: the label-free default proxy, so the seed's command runs as written
    assert args.method == sa.DEFAULT_PROXY
    assert sa.get_args_parser().parse_args(["--weights", "x.pt", "--shard", "1/3"]).shard == (1, 3)


# ------------------------------------------------------------------------------------------------- metrics
def test_metrics_equal_hand_computation():
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    noise = torch.tensor([0.1, -0.1, 0.1, -0.1], dtype=torch.float64)
    test = ref + noise
    assert sens.sqnr_db(ref, test) == pytest.approx(10 * math.log10(30 / 0.04))
    dot, n1, n2 = float((ref * test).sum()), float(ref.norm()), float(test.norm())
    assert sens.cosine_similarity(ref, test) == pytest.approx(dot / (n1 * n2))
    assert sens.mse(ref, test) == pytest.approx(0.01)
    weight = torch.tensor([1.0, 0.0, 0.0, 3.0])
    assert sens.sqnr_db(ref, test, weight) == pytest.approx(10 * math.log10((1 + 48) / (0.01 + 0.03)))
    assert sens.mse(ref, test, weight) == pytest.approx(0.04 / 4)
    assert sens.cosine_similarity(ref, -ref) == pytest.approx(-1.0)
    # finite everywhere: no error, zero signal, non-finite outputs
    assert sens.sqnr_db(ref, ref) == sens.SQNR_CAP_DB and sens.mse(ref, ref) == 0.0
    assert sens.sqnr_db(torch.zeros(3), torch.ones(3)) == -sens.SQNR_CAP_DB
    assert sens.cosine_similarity(torch.zeros(3), torch.zeros(3)) == 1.0
    bad = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    values = [sens.sqnr_db(ref, bad), sens.cosine_similarity(ref, bad), sens.mse(ref, bad)]
    assert values == [-sens.SQNR_CAP_DB, -1.0, sens.MSE_CAP] and all(math.isfinite(v) for v in values)
    # batches accumulate to the same numbers as one call
    moments = sens.Moments().update(ref[:2], test[:2]).update(ref[2:], test[2:])
    assert moments.sqnr_db == pytest.approx(sens.sqnr_db(ref, test))
    # parts combine by mean noise-to-signal ratio
    a, b = sens.Moments().update(ref, test), sens.Moments().update(ref, ref + 2 * noise)
    nsr = (0.04 / 30 + 0.16 / 30) / 2
    assert sens.combine("sqnr", [a, b]) == pytest.approx(-10 * math.log10(nsr))


def test_head_parts_normalise_boxes_and_weight_by_score():
    # one anchor: a 20x10 box at (100, 50), scores 0.5 / 0.2; the test box is shifted by 2 px in x
    ref = torch.tensor([[[100.0, 50.0, 20.0, 10.0, 1.0, 0.5, 0.2]]])
    test = ref.clone()
    test[..., 0] += 2.0
    (box_ref, box_test, weight), (score_ref, score_test) = sens.head_parts(ref, test)
    size = math.sqrt(200.0)
    assert torch.allclose(box_ref, torch.tensor([-10.0, -5.0, 10.0, 5.0]) / size)
    assert torch.allclose(box_test - box_ref, torch.tensor([2.0, 0.0, 2.0, 0.0]) / size)
    assert weight.item() == pytest.approx(0.5) and torch.equal(score_ref, score_test)
    error = sens.DetectionError().update(ref, test)
    values = error.values("sqnr")
    assert values["sqnr_db_score"] == sens.SQNR_CAP_DB
    assert values["sqnr_db_box"] == pytest.approx(10 * math.log10(250 / 8))
    assert values["sqnr_db"] == pytest.approx(-10 * math.log10((8 / 250) / 2), rel=1e-6)


def _calibrated(model: torch.nn.Module, synthetic: dict) -> torch.nn.Module:
    loader = sens.calibration_loader(synthetic["images"], SIZE, 4, 2, workers=0)
    return sens.calibrated_model(reparameterize(model), loader=loader, batch_number=2)[0]


def test_tiny_amax_makes_a_layer_look_worse(synthetic):
    qmodel = _calibrated(_tiny_model(), synthetic)
    batches, _ = sens.proxy_batches(synthetic["images"], SIZE, 4, 4, workers=0)
    layer = "neck.Rep_p3.block.0.rbr_reparam"
    before = {m: sens.ProxyProbe(qmodel, batches, m)(layer) for m in sens.PROXY_METHODS}
    quantizer = quant.quant_layers(qmodel)[layer].input_quantizer
    quantizer._amax.mul_(1e-3)  # clips almost every activation
    after = {m: sens.ProxyProbe(qmodel, batches, m)(layer) for m in sens.PROXY_METHODS}
    assert after["sqnr"]["sqnr_db"] < before["sqnr"]["sqnr_db"] - 10
    assert after["cosine"]["cosine"] < before["cosine"]["cosine"]
    assert after["mse"]["mse"] > before["mse"]["mse"]
    assert after["sqnr"]["sqnr_db_neck"] < before["sqnr"]["sqnr_db_neck"]


def test_forward_reuse_changes_nothing(synthetic):
    qmodel = _calibrated(_tiny_model(), synthetic)
    batches, _ = sens.proxy_batches(synthetic["images"], SIZE, 8, 4, workers=0)
    fast, slow = sens.ProxyProbe(qmodel, batches, "sqnr"), sens.ProxyProbe(qmodel, batches, "sqnr", reuse=False)
    layers = list(quant.quant_layers(qmodel))
    for layer in layers[::7] + ["backbone.ERBlock_5.2.cspsppf.m", "neck.Bifusion0.cv3.block.conv"]:
        assert fast(layer) == slow(layer), layer
    assert fast.reuse is not None  # the self-check kept it on
    assert fast.baselines() == slow.baselines()


def test_reuse_that_disagrees_is_turned_off(synthetic, caplog):
    qmodel = _calibrated(_tiny_model(), synthetic)
    batches, _ = sens.proxy_batches(synthetic["images"], SIZE, 4, 4, workers=0)
    probe, plain = sens.ProxyProbe(qmodel, batches, "cosine"), sens.ProxyProbe(qmodel, batches, "cosine", reuse=False)
    probe.prepare()
    layer = "detect.reg_preds.1"  # its input, reg_convs.1's output, comes from the records: corrupt it there,
    probe.reuse.records[0][id(qmodel.detect.reg_convs[1])][0][1].mul_(2.0)  # as an in-place op in a model would
    with caplog.at_level("WARNING"):
        assert probe(layer)["cosine_box"] == plain(layer)["cosine_box"]
    assert probe.reuse is None and any("turned off" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------- map
def test_map_numbers_equal_independent_evaluations(checkpoint, synthetic, tmp_path):
    result = _run(_map_argv(checkpoint, synthetic, tmp_path / "out"))
    report = json.loads(Path(result["json"]).read_text())
    model = quant.load_calibrated(tmp_path / "out" / "calibrated.pt")
    dataset = CocoDetection(synthetic["json"], synthetic["images"], img_size=SIZE, max_images=6)

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


def test_resume_after_sigkill_computes_only_the_rest(checkpoint, synthetic, tmp_path):
    layers = ["backbone.ERBlock_2.0.rbr_reparam", "neck.reduce_layer1.block.conv", "neck.Rep_p3.block.0.rbr_reparam",
              "detect.stems.2.block.conv", "detect.cls_preds.0", "detect.reg_preds.1"]  # model order
    full = _run(_argv(checkpoint, synthetic, tmp_path / "full", "--method", "sqnr", layers=layers))
    argv = _argv(checkpoint, synthetic, tmp_path / "cut", "--method", "sqnr", layers=layers)
    proc = subprocess.run([sys.executable, "-c", _KILLER.format(repo=str(REPO), k=2, argv=argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    progress = sens.progress_path(tmp_path / "cut", "sqnr")
    _, records, _ = sens.read_progress(progress)
    assert [r["name"] for r in records if r["type"] == "layer"] == layers[:2]
    with open(progress, "a") as f:
        f.write('{"type": "layer", "name": "neck.reduce_la')  # a torn last line, as a kill mid-write leaves
    computed = []
    resumed = _run(argv + ["--resume"], on_layer=lambda name, record: computed.append(name))
    assert computed == layers[2:]
    assert Path(resumed["txt"]).read_bytes() == Path(full["txt"]).read_bytes()
    assert sum(r["type"] == "layer" for r in sens.read_progress(progress)[1]) == len(layers)


def test_interrupted_run_keeps_finished_layers(checkpoint, synthetic, tmp_path, capsys):
    argv = _map_argv(checkpoint, synthetic, tmp_path / "out")

    def stop(name, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(argv, on_layer=stop)
    _, records, _ = sens.read_progress(sens.progress_path(tmp_path / "out", "map"))
    assert [r["name"] for r in records if r["type"] == "layer"] == LAYERS[:1]
    assert {r["name"] for r in records if r["type"] == "baseline"} == {"fp", "ptq"}
    assert "--resume" in _exit_2(argv, capsys)  # without --resume an existing progress file is an error
    computed = []
    _run(argv + ["--resume", "--calib-weights", str(tmp_path / "out" / "calibrated.pt")],
         on_layer=lambda name, record: computed.append(name))
    assert computed == LAYERS[1:]


def test_same_inputs_give_identical_ranking_files(checkpoint, synthetic, tmp_path):
    first = _run(_argv(checkpoint, synthetic, tmp_path / "a", "--method", "cosine"))
    second = _run(_argv(checkpoint, synthetic, tmp_path / "b", "--method", "cosine"))
    assert Path(first["txt"]).read_bytes() == Path(second["txt"]).read_bytes()
    one, two = (json.loads(Path(r["json"]).read_text()) for r in (first, second))
    assert one["calibration"]["amax_sha256"] == two["calibration"]["amax_sha256"]
    assert [r["rank"] for r in one["layers"]] == [r["rank"] for r in two["layers"]]


def test_shards_merge_to_the_single_run(checkpoint, synthetic, tmp_path, capsys):
    single = _run(_argv(checkpoint, synthetic, tmp_path / "single", "--method", "mse"))
    out = tmp_path / "sharded"
    calib = str(tmp_path / "single" / "calibrated.pt")
    for k in (0, 1):
        result = _run(_argv(checkpoint, synthetic, out, "--method", "mse", "--shard", f"{k}/2", "--calib-weights",
                            calib))
        assert result["layers"] == 2
    merged = _run(_argv(checkpoint, synthetic, out, "--method", "mse", "--merge", layers=None))
    assert Path(merged["txt"]).read_bytes() == Path(single["txt"]).read_bytes()
    assert json.loads(Path(merged["json"]).read_text())["baselines"] == \
        json.loads(Path(single["json"]).read_text())["baselines"]
    shard1 = sens.progress_path(out, "mse", (1, 2))
    lines = shard1.read_text().splitlines(keepends=True)
    shard1.write_text("".join(lines[:-1]))  # shard 1 not finished
    assert "not analysed yet" in _exit_2(_argv(checkpoint, synthetic, out, "--method", "mse", "--merge",
                                               layers=None), capsys)
    shard1.unlink()
    assert "shard(s) 1/2 missing" in _exit_2(_argv(checkpoint, synthetic, out, "--method", "mse", "--merge",
                                                   layers=None), capsys)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_exit_2_with_one_line(checkpoint, synthetic, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = _argv(checkpoint, synthetic, tmp_path / "o1", "--method", "sqnr")
    argv[argv.index("--data-root") + 1] = str(empty)
    assert "no images found" in _exit_2(argv, capsys)
    # a calibration of another model
    other = save_checkpoint(tmp_path / "other.pt", _tiny_model(seed=1))
    _run(_argv(other, synthetic, tmp_path / "o2", "--method", "sqnr"))
    assert "another model" in _exit_2(_argv(checkpoint, synthetic, tmp_path / "o3", "--method", "sqnr",
                                            "--calib-weights", str(tmp_path / "o2" / "calibrated.pt")), capsys)
    # resume with the progress file of another model, then of another method
    assert "another model" in _exit_2(_argv(checkpoint, synthetic, tmp_path / "o2", "--method", "sqnr",
                                            "--resume"), capsys)
    sqnr_progress = sens.progress_path(tmp_path / "o2", "sqnr")
    sens.progress_path(tmp_path / "o2", "cosine").write_bytes(sqnr_progress.read_bytes())
    assert "another method" in _exit_2(_argv(other, synthetic, tmp_path / "o2", "--method", "cosine",
                                             "--resume"), capsys)
    assert sqnr_progress.read_bytes() == sens.progress_path(tmp_path / "o2", "cosine").read_bytes()  # untouched
    assert "matches no quantized layer" in _exit_2(_argv(checkpoint, synthetic, tmp_path / "o4", "--method",
                                                         "sqnr", layers=["nope.*"]), capsys)
    assert "--data JSON" in _exit_2(_argv(checkpoint, synthetic, tmp_path / "o5", "--method", "map"), capsys)


@pytest.mark.parametrize("extra, message", [(["--calib-method", "minmax"], "invalid choice"),
                                            (["--shard", "2/2"], "0 <= K < N"),
                                            (["--method", "psnr"], "invalid choice")])
def test_bad_options_exit_2_from_a_real_process(tmp_path, extra, message):
    proc = subprocess.run([sys.executable, str(REPO / "sensitivity_analyse.py"), "--weights", "w.pt", *extra],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr


def test_dead_channel_warns_and_stays_finite(synthetic, tmp_path, caplog):
    weights = save_checkpoint(tmp_path / "dead.pt", _tiny_model(dead_channel=True))
    with caplog.at_level("WARNING"):
        result = _run(_argv(weights, synthetic, tmp_path / "out", "--method", "sqnr"))
    assert any("amax" in r.getMessage() and "detect.cls_preds.0" in r.getMessage() for r in caplog.records)
    report = json.loads(Path(result["json"]).read_text())
    values = [v for row in report["layers"] for k, v in row.items() if k.startswith("sqnr")]
    assert values and all(math.isfinite(v) for v in values)
    assert "NaN" not in Path(result["json"]).read_text() and "nan" not in Path(result["txt"]).read_text()


def test_spearman_and_overlap():
    assert sens.average_ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert sens.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert sens.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: Pearson of the average ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4]
    assert sens.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert sens.spearman([1, 1, 1], [1, 2, 3]) == 0.0
    assert sens.top_k_overlap(["a", "b", "c"], ["c", "a", "d"], 2) == 1
    assert sens.sensitivity_order([0.3, 0.1, 0.2], "map") == [1, 2, 0]
    assert sens.sensitivity_order([1e-3, 1e-1, 1e-2], "mse") == [1, 2, 0]


def test_benchmark_runs_on_a_few_layers(checkpoint, synthetic, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import sensitivity_benchmark as bench
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = tmp_path / "bench.json"
    args = bench.get_args_parser().parse_args(
        ["--weights", str(checkpoint), "--data", synthetic["json"], "--images", synthetic["images"], "--data-root",
         synthetic["images"], "--img-size", str(SIZE), "--max-images", "6", "--batch-size", "4", "--batch-number",
         "2", "--proxy-images", "8", "--workers", "0", "--layers", *LAYERS, "--json", str(out),
         "--map-reliability"])
    result = bench.main(args)
    saved = json.loads(out.read_text())
    for method in sens.METHODS:
        for key in ("seconds_per_layer", "total_seconds", "spearman", "top5_overlap", "top10_overlap"):
            assert key in saved[method], (method, key)
    assert saved["map"]["spearman"] == pytest.approx(1.0) and result["map_top5_overlap"] == 4
    assert -1.0 <= saved["map[even vs odd]"]["spearman"] <= 1.0 and saved["layer_names"] == LAYERS
    assert "spearman" in capsys.readouterr().out
    assert os.path.exists(out)
