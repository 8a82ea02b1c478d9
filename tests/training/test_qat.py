"""Tests for utils/training/qat.py and train.py --qat: the distillation loss and the learned-amax fake quantization
against hand-computed values and pytorch-quantization, and the whole fine-tuning on the bundled demo model (loss
falls, float layers stay float, sharing holds, weight amax follow the weights, the Q/DQ export verifies, resume is
exact)."""
from __future__ import annotations

import json

import pytest
import torch
from pytorch_quantization.tensor_quant import fake_tensor_quant

import export_onnx
import train
from models import load_model
from tests.helpers import REPO, one_line_error
from utils.cli import run_cli
from utils.data.calibration import calibration_loader
from utils.data.synthetic import generate_synthetic_coco
from utils.quant import calibration
from utils.quant import quantizers as quant
from utils.quant.sharing import trace_sharing_groups
from utils.training.qat import LearnedInputAmax, QatTrainer, distill_loss, fake_quant_ste

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 128
DEMO = REPO / "assets" / "yolov6n_synthetic.pt"
FLOAT_LAYER = "detect.cls_preds.0"


def test_distill_loss_hand_values():
    """Rows [cx, cy, w, h, obj, cls]. Scores 0.5 -> 0.3 (anchor 0): NSR 0.2^2 / (0.5^2 + 0.25^2) = 0.128. Box of
    anchor 1 (4 px size scale: sqrt(2*8)) moved 1 px right: corners x1, x2 each +0.25, weight 0.25 -> 0.03125 over
    the weighted signal 0.5 * 1 + 0.25 * 2.125 = 1.03125. Loss = mean of the two."""
    ref = torch.tensor([[[10.0, 10.0, 4.0, 4.0, 1.0, 0.5], [20.0, 20.0, 2.0, 8.0, 1.0, 0.25]]])
    test = ref.clone()
    test[0, 0, 5], test[0, 1, 0] = 0.3, 21.0
    test.requires_grad_(True)
    loss, parts = distill_loss(ref, test)
    assert parts["score"] == pytest.approx(0.128)
    assert parts["box"] == pytest.approx(0.03125 / 1.03125)
    assert float(loss) == pytest.approx((0.128 + 0.03125 / 1.03125) / 2)
    loss.backward()
    # d/d score of (1/2) (s - 0.5)^2 / 0.3125 at s = 0.3: -0.64; the moved box is pushed back left
    assert float(test.grad[0, 0, 5]) == pytest.approx(-0.64) and test.grad[0, 1, 0] > 0
    assert float(distill_loss(ref, ref.clone())[0]) == 0.0


def test_fake_quant_matches_pytorch_quantization_and_has_the_lsq_gradient():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(fake_quant_ste(x, torch.tensor(2.5), (-127.0, 127.0)), fake_tensor_quant(x, torch.tensor(2.5)))
    # amax 4: 0.3 * 127/4 = 9.525 rounds to 10, so d/d amax = (10 - 9.525) / 127; 5 and -7 clip: +1 and -1
    amax = torch.tensor(4.0, requires_grad=True)
    xs = torch.tensor([0.3, 5.0, -7.0], requires_grad=True)
    fake_quant_ste(xs, amax, (-127.0, 127.0)).sum().backward()
    assert float(amax.grad) == pytest.approx(0.475 / 127 + 1 - 1, abs=1e-6)
    assert xs.grad.tolist() == [1.0, 0.0, 0.0]  # straight through inside the range, zero where clipped


def test_learned_amax_is_one_parameter_per_sharing_group(calibrated):
    model = calibrated
    snapshot = calibration.quantizer_state(model)
    quant.set_quantized(model, ["backbone.stem.rbr_reparam"], False)
    try:
        groups = trace_sharing_groups(model)
        learned = LearnedInputAmax(model, groups)
        in_float = set(quant.float_layers(model))
        expected = [[n for n in g if n not in in_float] for g in groups]
        assert all(unit in learned.members for unit in expected if unit)
        assert not any("backbone.stem.rbr_reparam" in unit for unit in learned.members)
        assert sorted(n for unit in learned.members for n in unit) == sorted(set(quant.quant_layers(model)) - in_float)
        with torch.no_grad():
            learned.amax.copy_(torch.arange(1, len(learned.members) + 1, dtype=torch.float32))
        learned.write_back()
        layers = quant.quant_layers(model)
        for index, unit in enumerate(learned.members):
            assert {float(layers[n].input_quantizer._amax.max()) for n in unit} == {index + 1.0}
    finally:
        calibration.load_quantizers(model, snapshot)
        quant.set_quantized(model, None, True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """The bundled model max-calibrated on synthetic images at 128 px, with one layer float (a partial model)."""
    out = tmp_path_factory.mktemp("qat")
    info = generate_synthetic_coco(out / "data", num_train=8, num_val=8, img_size=SIZE, seed=3)
    loader = calibration_loader(info["train"]["img_dir"], SIZE, 4, 2, workers=0)
    qmodel, _ = calibration.calibrated_model(load_model(str(DEMO), deploy=True), loader=loader, batch_number=2)
    quant.set_quantized(qmodel, [FLOAT_LAYER], False)
    path = calibration.save_calibrated(out / "partial.pt", qmodel)
    return {"out": out, "partial": path, "train": str(info["train"]["img_dir"]),
            "val_json": str(info["val"]["ann_file"]), "val": str(info["val"]["img_dir"])}


def _qat_argv(demo: dict, out, *extra: str) -> list[str]:
    return ["--qat", "--weights", str(demo["partial"]), "--images", demo["train"], "--img-size", str(SIZE),
            "--batch-size", "4", "--workers", "0", "--lr0", "1e-5", "--output-dir", str(out), "--no-progress",
            *extra]


def test_qat_on_the_bundled_model_keeps_its_structure_and_exports(demo, tmp_path):
    out = tmp_path / "qat"
    argv = _qat_argv(demo, out, "--epochs", "2", "--learn-amax", "--val-data", demo["val_json"], "--val-images",
                     demo["val"])
    record = run_cli(train.main, train.get_args_parser().parse_args(argv))
    assert record["after"]["loss"] < record["before"]["loss"]  # closer to the float outputs than PTQ was
    assert record["before"]["float"]["mAP50_95"] > 0 and "map" in record["after"]
    # the drop from the float teacher on the (rect) val images, with its paired-bootstrap interval
    drop = record["after"]["drop_interval"]
    assert record["after"]["letterbox"] == "rect" and drop["low"] <= drop["drop"] <= drop["high"]
    assert drop["drop"] == pytest.approx(record["before"]["float"]["mAP50_95"] - record["after"]["map"]["mAP50_95"],
                                         abs=1.5e-4)
    assert json.loads((out / "qat.json").read_text())["after"] == record["after"]
    assert record["int8_layers"] == record["total_layers"] - 1
    start, tuned = calibration.load_calibrated(demo["partial"]), calibration.load_calibrated(out / "qat.pt")
    assert quant.float_layers(tuned) == [FLOAT_LAYER]
    layers, before = quant.quant_layers(tuned), quant.quant_layers(start)
    for group in trace_sharing_groups(tuned):
        active = [n for n in group if n != FLOAT_LAYER]
        assert len({float(layers[n].input_quantizer._amax) for n in active}) <= 1, group  # still shared
    assert any(float(layers[n].input_quantizer._amax) != float(before[n].input_quantizer._amax) for n in layers)
    assert any(not torch.equal(layers[n].weight, before[n].weight) for n in layers)
    # load_calibrated checked every weight amax against max |w| of the fine-tuned weights; the export verifies
    onnx = run_cli(export_onnx.main, export_onnx.get_args_parser().parse_args(
        ["--weights", str(out / "qat.pt"), "--img-size", str(SIZE), "--output", str(tmp_path / "qat.onnx"),
         "--verify-images", demo["val"]]))
    assert onnx["int8_layers"] == record["int8_layers"]


def test_an_interrupted_qat_run_resumes_exactly(demo, tmp_path, monkeypatch):
    run_cli(train.main, train.get_args_parser().parse_args(_qat_argv(demo, tmp_path / "a", "--epochs", "2")))
    original = QatTrainer.train_one_epoch

    def crash_in_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(QatTrainer, "train_one_epoch", crash_in_second_epoch)
        with pytest.raises(KeyboardInterrupt):
            train.main(train.get_args_parser().parse_args(_qat_argv(demo, tmp_path / "b", "--epochs", "2")))
    assert (tmp_path / "b" / "last.pt").is_file() and not (tmp_path / "b" / "qat.pt").exists()
    run_cli(train.main, train.get_args_parser().parse_args(_qat_argv(demo, tmp_path / "b", "--epochs", "2",
                                                                     "--resume")))
    a = torch.load(tmp_path / "a" / "qat.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "qat.pt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert all(torch.equal(a["quantizers"][k], b["quantizers"][k]) for k in a["quantizers"])
    history = json.loads((tmp_path / "b" / "qat.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2]


def test_qat_bad_inputs_exit_2(demo, tmp_path, capsys):
    def error(argv):
        return one_line_error(train, argv, capsys)

    assert "calibrated or partial" in error(_qat_argv(demo, tmp_path / "x")[:2] + [str(DEMO)] +
                                            _qat_argv(demo, tmp_path / "x")[3:])
    assert "drop --data" in error(_qat_argv(demo, tmp_path / "x", "--data", demo["val_json"]))
    assert "together" in error(_qat_argv(demo, tmp_path / "x", "--val-data", demo["val_json"]))
    assert "no QAT checkpoint" in error(_qat_argv(demo, tmp_path / "x", "--resume"))
    assert "pass --data" in error(["--images", demo["train"]])
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "qat.pt").write_text("")
    assert "--overwrite" in error(_qat_argv(demo, tmp_path / "y"))
