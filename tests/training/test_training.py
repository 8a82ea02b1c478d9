"""Training units against hand-computed values: TAL assignment, VFL / GIoU / DFL, a step that learns, resume."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from models import build_model, load_config, save_checkpoint
from models.config import with_overrides
from utils.cli import run_cli
from utils.data.coco import CocoDetection, collate_detection
from utils.data.synthetic import generate_synthetic_coco
from utils.errors import InputError
from utils.training.assigner import TaskAlignedAssigner
from utils.training.augment import AugmentConfig
from utils.training.dataset import TrainDataset
from utils.training.loop import TrainConfig, Trainer, cosine_factor
from utils.training.losses import DetectionLoss, dfl_loss, giou, targets_to_padded, varifocal_loss

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ assigner
def _assign(pred_boxes, scores, anchors, gt_boxes, gt_labels, topk=2):
    assigner = TaskAlignedAssigner(num_classes=3, topk=topk)
    return assigner(torch.tensor([scores]), torch.tensor([pred_boxes]), torch.tensor(anchors),
                    torch.tensor([gt_labels]), torch.tensor([gt_boxes]),
                    torch.ones(1, len(gt_labels), dtype=torch.bool))


def test_assigner_picks_topk_inside_and_normalises_scores():
    anchors = [[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [28.0, 28.0]]
    gt = [[0.0, 0.0, 16.0, 16.0]]
    # IoU with the GT: 1, 1/2, 1/4 and 0 (the last anchor lies outside the GT anyway)
    preds = [[0, 0, 16, 16], [0, 0, 16, 8], [0, 0, 8, 8], [24, 24, 32, 32]]
    scores = [[0.1, s, 0.1] for s in (0.5, 0.9, 0.9, 0.9)]  # probability of class 1 per anchor
    out = _assign([[float(v) for v in b] for b in preds], scores, anchors, gt, [1], topk=2)
    # align = s * IoU^6: 0.5, 0.9/64, 0.9/4096 -> the top 2 are anchors 0 and 1
    assert out.fg_mask.tolist() == [[True, True, False, False]]
    assert out.labels[0, :2].tolist() == [1, 1]
    assert torch.equal(out.bboxes[0, 0], torch.tensor(gt[0]))
    # normalised: align * best IoU (1) / best align (0.5)
    expected = torch.zeros(4, 3)
    expected[0, 1], expected[1, 1] = 1.0, (0.9 / 64) / 0.5
    assert torch.allclose(out.scores[0], expected, atol=1e-6)


def test_assigner_gives_a_shared_anchor_to_the_box_it_overlaps_most():
    anchors = [[8.0, 8.0], [40.0, 40.0]]
    gt = [[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 32.0, 32.0]]  # both contain anchor 0
    preds = [[0.0, 0.0, 30.0, 30.0], [36.0, 36.0, 44.0, 44.0]]  # anchor 0's box: IoU 256/900 vs 900/1024
    out = _assign(preds, [[0.9, 0.9, 0.9]] * 2, anchors, gt, [0, 2], topk=1)
    assert out.fg_mask.tolist() == [[True, False]]
    assert out.labels[0, 0].item() == 2 and out.gt_index[0, 0].item() == 1


def test_assigner_without_ground_truth_is_all_background():
    assigner = TaskAlignedAssigner(num_classes=2)
    out = assigner(torch.rand(1, 5, 2), torch.rand(1, 5, 4), torch.rand(5, 2), torch.zeros(1, 0),
                   torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.bool))
    assert not out.fg_mask.any() and out.scores.sum() == 0


# ------------------------------------------------------------------------------------------------ losses
def test_giou_hand_values():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0]])
    # inter 1, union 7, hull 9 -> 1/7 - 2/9; identical boxes -> 1
    assert torch.allclose(giou(pred, target), torch.tensor([1 / 7 - 2 / 9, 1.0]), atol=1e-6)


def test_varifocal_hand_value():
    pred = torch.tensor([[0.5, 0.2]])
    target = torch.tensor([[0.8, 0.0]])
    label = torch.tensor([[1.0, 0.0]])
    # positive: weight q=0.8, BCE(0.5, 0.8)=ln 2; negative: weight 0.75*0.2^2, BCE(0.2, 0)=-ln 0.8
    expected = 0.8 * math.log(2) + 0.75 * 0.04 * -math.log(0.8)
    assert varifocal_loss(pred, target, label).item() == pytest.approx(expected, rel=1e-5)


def test_dfl_hand_value():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5] + [0.0] * 13] * 4).unsqueeze(0)  # [1 box, 4 sides, 17 bins]
    target = torch.tensor([[2.3, 2.3, 2.3, 2.3]])
    log_softmax = logits[0, 0] - torch.logsumexp(logits[0, 0], 0)
    expected = -(0.7 * log_softmax[2] + 0.3 * log_softmax[3])  # 2.3 sits 30% of the way from bin 2 to bin 3
    assert dfl_loss(logits, target, 16).item() == pytest.approx(expected.item(), rel=1e-5)


def test_targets_are_padded_per_image():
    targets = torch.tensor([[0, 1, 0, 0, 5, 5], [2, 0, 1, 1, 4, 4], [2, 3, 2, 2, 6, 6]], dtype=torch.float32)
    labels, boxes, mask = targets_to_padded(targets, batch_size=3)
    assert mask.tolist() == [[True, False], [False, False], [True, True]]
    assert labels[2].tolist() == [0, 3] and boxes[0, 0].tolist() == [0, 0, 5, 5]


def test_cosine_schedule_ends_at_lrf():
    assert cosine_factor(0, 10, 0.01) == 1.0
    assert cosine_factor(10, 10, 0.01) == pytest.approx(0.01)
    assert cosine_factor(5, 10, 0.01) == pytest.approx(0.505)


# ------------------------------------------------------------------------------------------------ learning
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("tiny")
    info = generate_synthetic_coco(out, num_train=8, num_val=4, img_size=64, seed=5)
    return {"train": (info["train"]["ann_file"], info["train"]["img_dir"]),
            "val": (info["val"]["ann_file"], info["val"]["img_dir"]), "dir": out}


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(with_overrides(load_config("yolov6n"), num_classes=6))


def test_training_steps_lower_the_loss(tiny_data):
    dataset = TrainDataset(CocoDetection(*tiny_data["train"], img_size=64), AugmentConfig(mosaic=0.0, fliplr=0.0,
                                                                                         scale=0.0, translate=0.0))
    batch = collate_detection([dataset[i] for i in range(4)])
    model = _tiny_model().train()
    criterion = DetectionLoss(6, model.detect.stride)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(14):
        loss, parts = criterion(model(batch["image"]), batch["targets"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((loss.item(), parts["iou"]))
    # Boxes improve from the first steps; the class loss first rises because TAL's soft targets grow with the
    # IoU of the predictions (targets move), then falls: the total ends lower.
    assert history[5][1] < history[0][1]
    assert history[-1][0] < history[0][0]


def test_dfl_head_loss_is_finite_and_has_a_dfl_term(tiny_data):
    dataset = TrainDataset(CocoDetection(*tiny_data["train"], img_size=64), AugmentConfig(mosaic=0.0))
    batch = collate_detection([dataset[i] for i in range(2)])
    torch.manual_seed(0)
    model = build_model(with_overrides(load_config("yolov6n"), num_classes=6,
                                       head={"use_dfl": True, "reg_max": 16, "distill_ns": False})).train()
    loss, parts = DetectionLoss(6, model.detect.stride, reg_max=16, use_dfl=True)(model(batch["image"]),
                                                                                   batch["targets"])
    assert torch.isfinite(loss) and parts["dfl"] > 0
    loss.backward()


def test_train_dataset_is_reproducible_and_labels_stay_inside(tiny_data):
    base = CocoDetection(*tiny_data["train"], img_size=64)
    a, b = TrainDataset(base, seed=1), TrainDataset(base, seed=1)
    for i in range(len(base)):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["targets"], y["targets"])
        t = x["targets"]
        assert ((t[:, 1:] >= 0) & (t[:, 1:] <= 64)).all() and (t[:, 3] > t[:, 1]).all() and (t[:, 4] > t[:, 2]).all()


def test_resume_continues_from_the_saved_epoch(tiny_data, tmp_path):
    def trainer(epochs: int) -> Trainer:
        cfg = TrainConfig(epochs=epochs, batch_size=4, nominal_batch=4, eval_interval=1, workers=0,
                          warmup_epochs=0.5, no_mosaic_last=0)
        return Trainer(_tiny_model(), CocoDetection(*tiny_data["train"], img_size=64),
                       CocoDetection(*tiny_data["val"], img_size=64), cfg, tmp_path, progress=False)

    first = trainer(1)
    first.fit()
    steps_after_first = first.ema.updates
    assert steps_after_first == 2 and (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()
    second = trainer(2)
    second.resume(tmp_path / "last.pt")
    assert second.start_epoch == 1 and second.ema.updates == steps_after_first
    assert all(torch.equal(a, b) for a, b in zip(second.model.state_dict().values(),
                                                  first.model.state_dict().values()))
    second.fit()
    assert [row["epoch"] for row in second.history] == [1, 2]  # epoch 1 was not trained again
    assert second.ema.updates == 2 * steps_after_first
    saved = torch.load(tmp_path / "last.pt", weights_only=True)  # our format loads without pickled code
    assert saved["train_state"]["epoch"] == 1 and saved["meta"]["trained"]


def _train_argv(tiny_data, out: Path, *extra: str) -> list[str]:
    return ["--data", str(tiny_data["train"][0]), "--images", str(tiny_data["train"][1]),
            "--val-data", str(tiny_data["val"][0]), "--val-images", str(tiny_data["val"][1]), "--img-size", "64",
            "--epochs", "1", "--batch-size", "4", "--workers", "0", "--output-dir", str(out), "--no-progress", *extra]


def test_train_cli_bad_inputs_exit_2(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(train.main, train.get_args_parser().parse_args(_train_argv(tiny_data, tmp_path / "r", "--resume")))
    assert exc.value.code == 2 and "no checkpoint" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    ann = CocoDetection(*tiny_data["train"], img_size=64).coco.dataset
    empty.write_text(__import__("json").dumps({**ann, "annotations": []}))
    argv = _train_argv(tiny_data, tmp_path / "r2")
    argv[1] = str(empty)
    with pytest.raises(SystemExit) as exc:
        run_cli(train.main, train.get_args_parser().parse_args(argv))
    assert exc.value.code == 2 and "no usable annotations" in capsys.readouterr().err


def test_zero_annotation_dataset_is_refused_by_the_trainer(tiny_data, tmp_path):
    data = CocoDetection(*tiny_data["train"], img_size=64)
    data._targets = {k: v[:0] for k, v in data._targets.items()}
    with pytest.raises(InputError, match="no usable annotations"):
        Trainer(_tiny_model(), data, data, TrainConfig(workers=0), tmp_path)


def test_train_script_help_runs():
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--resume" in proc.stdout and "--nominal-batch" in proc.stdout


def test_mosaic_sample_keeps_every_label_inside(tiny_data):
    base = CocoDetection(*tiny_data["train"], img_size=64)
    dataset = TrainDataset(base, AugmentConfig(mosaic=1.0), seed=3)
    for epoch in range(2):
        dataset.epoch = epoch
        for i in range(len(base)):
            t = dataset[i]["targets"].numpy()
            assert np.all(t[:, 1:] >= 0) and np.all(t[:, 1:] <= 64)


def test_weights_of_another_class_count_seed_everything_but_the_class_layers(tmp_path):
    torch.manual_seed(1)
    source = build_model(load_config("yolov6n"))  # 80 classes
    weights = save_checkpoint(tmp_path / "coco.pt", source)
    args = train.get_args_parser().parse_args(["--data", "d", "--images", "i", "--val-data", "v", "--val-images", "w",
                                               "--weights", str(weights)])
    model = train.build_train_model(args, [f"c{i}" for i in range(6)])
    assert model.detect.cls_preds[0].weight.shape[0] == 6 and model.config["names"][5] == "c5"
    assert torch.equal(model.backbone.stem.rbr_dense.conv.weight, source.backbone.stem.rbr_dense.conv.weight)
    assert torch.equal(model.detect.reg_preds[2].bias, source.detect.reg_preds[2].bias)
