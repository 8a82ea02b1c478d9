"""Tests for models/: building every shipped config, official key layouts, and the detection head's decoding.

Expected head outputs are derived by hand (plain Python arithmetic over the anchor grid), not by the head's code.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from models import build_model, load_config
from models.common import get_block
from models.config import available_configs, with_overrides
from utils.errors import InputError

OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "yolov6-official"
STRIDES = (8, 16, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def _num_anchors(h: int, w: int, lite: bool = False) -> int:
    return sum((h // s) * (w // s) for s in (*STRIDES, 64) if lite or s != 64)


def _keys_json(name: str) -> dict:
    path = OFFICIAL / f"{name}.keys.json"
    if not path.is_file():
        pytest.fail(f"shared YOLOv6 fixtures not found at {OFFICIAL}: clone the repo with ../shared beside it")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ every shipped config
def test_shipped_configs_are_the_expected_set():
    assert set(available_configs()) >= {"yolov6n", "yolov6s", "yolov6m", "yolov6l", "yolov6n_reopt",
                                        "yolov6n_qa", "yolov6s_qa", "yolov6m_qa"}


@pytest.mark.parametrize("name", available_configs())
def test_every_config_builds_and_decodes_nonsquare_batch(name):
    torch.manual_seed(0)
    config = load_config(name)
    model = build_model(config).eval()
    lite = config["layout"] == "lite"
    b, h, w = (2, 128, 192) if lite else (2, 64, 96)  # non-square, multiples of the largest stride (64 / 32)
    x = torch.rand(b, 3, h, w)
    with torch.no_grad():
        y = model(x)
    nc = config["num_classes"]
    # stride 8/16/32 grids, plus the lite head's stride-64 level
    expected = 16 * 24 + 8 * 12 + 4 * 6 + 2 * 3 if lite else 8 * 12 + 4 * 6 + 2 * 3
    assert y.shape == (b, _num_anchors(h, w, lite), 5 + nc) == (b, expected, 85)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert torch.equal(y[..., 4], torch.ones_like(y[..., 4]))
    scores = y[..., 5:]
    assert scores.min() >= 0 and scores.max() <= 1


def test_square_input_and_batch_independence():
    torch.manual_seed(0)
    model = build_model(load_config("yolov6n")).eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        y = model(x)
        y1 = model(x[1:])
    assert y.shape == (2, 16 * 16 + 8 * 8 + 4 * 4, 85)
    torch.testing.assert_close(y[1:], y1, rtol=1e-5, atol=1e-5)


def test_model_stride_is_not_in_state_dict():
    model = build_model(load_config("yolov6n"))
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    assert not any("stride" in k for k in model.state_dict())
    assert model.names == [str(i) for i in range(80)]


# --------------------------------------------------------------------------------------- official key layouts
@pytest.mark.parametrize("config_name, fixture", [
    ("yolov6n", "yolov6n_v3_official_random"),
    ("yolov6n_reopt", "yolov6n_reopt_v2_official_random"),
    ("yolov6m", "yolov6m_v3_official_random"),
])
def test_state_dict_keys_and_shapes_equal_official(config_name, fixture):
    official = [(e["key"], tuple(e["shape"])) for e in _keys_json(fixture)["state_dict"]]
    ours = [(k, tuple(v.shape)) for k, v in build_model(load_config(config_name)).state_dict().items()]
    missing = [k for k in official if k not in ours]
    extra = [k for k in ours if k not in official]
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    assert ours == official  # same order too


def test_distill_head_keys_and_shapes_equal_official():
    official = [(e["key"], tuple(e["shape"])) for e in _keys_json("yolov6n_v3_distillns_random")["state_dict"]]
    config = with_overrides(load_config("yolov6n"), head={"use_dfl": True, "reg_max": 16, "distill_ns": True})
    ours = [(k, tuple(v.shape)) for k, v in build_model(config).state_dict().items()]
    assert ours == official


# ---------------------------------------------------------------------------------------- hand-checked decoding
def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _expected_boxes(h: int, w: int, ltrb: list[float]) -> torch.Tensor:
    """cx, cy, w, h in pixels for each anchor, level by level, row-major: anchor centre (j + 0.5, i + 0.5) * s."""
    left, top, right, bottom = ltrb
    rows = []
    for s in STRIDES:
        for i in range(h // s):
            for j in range(w // s):
                ax, ay = j + 0.5, i + 0.5
                x1, y1, x2, y2 = ax - left, ay - top, ax + right, ay + bottom
                rows.append([(x1 + x2) / 2 * s, (y1 + y2) / 2 * s, (x2 - x1) * s, (y2 - y1) * s])
    return torch.tensor(rows, dtype=torch.float32)


def _set_pred(conv: nn.Conv2d, bias: list[float]) -> None:
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor(bias))


def _check_decoded(y: torch.Tensor, h: int, w: int, ltrb: list[float], logits: list[float]) -> None:
    expected = _expected_boxes(h, w, ltrb)
    for b in range(y.shape[0]):
        torch.testing.assert_close(y[b, :, :4], expected, rtol=0, atol=1e-4)
        assert torch.equal(y[b, :, 4], torch.ones(len(expected)))
        scores = torch.tensor([_sigmoid(v) for v in logits])
        torch.testing.assert_close(y[b, :, 5:], scores.expand(len(expected), -1), rtol=0, atol=1e-6)


def test_head_without_dfl_decodes_constant_ltrb_by_hand():
    torch.manual_seed(0)
    model = build_model(load_config("yolov6n")).eval()
    logits = [(k - 40) / 10 for k in range(80)]
    for conv in model.detect.cls_preds:
        _set_pred(conv, logits)
    # constant distance d on every side: centre = anchor centre, w = h = 2 * d * s
    for conv in model.detect.reg_preds:
        _set_pred(conv, [1.5] * 4)
    h, w = 64, 96
    with torch.no_grad():
        y = model(torch.rand(2, 3, h, w))
    _check_decoded(y, h, w, [1.5] * 4, logits)
    # spot values straight from the formula: first anchor of each level
    assert y[0, 0, :4].tolist() == pytest.approx([0.5 * 8, 0.5 * 8, 2 * 1.5 * 8, 2 * 1.5 * 8])
    first_16 = (h // 8) * (w // 8)
    assert y[0, first_16, :4].tolist() == pytest.approx([8.0, 8.0, 48.0, 48.0])
    last = y[0, -1, :4].tolist()  # level 32, cell (i=1, j=2)
    assert last == pytest.approx([2.5 * 32, 1.5 * 32, 96.0, 96.0])
    # distinct distances per side: left/top/right/bottom order
    ltrb = [0.25, 1.0, 2.0, 3.5]
    for conv in model.detect.reg_preds:
        _set_pred(conv, ltrb)
    with torch.no_grad():
        y = model(torch.rand(1, 3, h, w))
    _check_decoded(y, h, w, ltrb, logits)


def _dfl_side_logits() -> list[list[float]]:
    return [
        [0.0] * 17,                                   # uniform: expectation 8
        [50.0 if k == 3 else 0.0 for k in range(17)],  # almost one-hot at bin 3
        [k / 4 for k in range(17)],                   # ramp
        [20.0 if k in (2, 5) else 0.0 for k in range(17)],  # two equal peaks: 3.5
    ]


def _softmax_expectation(logits: list[float]) -> float:
    m = max(logits)
    e = [math.exp(v - m) for v in logits]
    return sum(k * ek for k, ek in enumerate(e)) / sum(e)


def test_dfl_head_decodes_softmax_expectation_by_hand():
    torch.manual_seed(0)
    config = with_overrides(load_config("yolov6n"), head={"use_dfl": True, "reg_max": 16, "distill_ns": False})
    model = build_model(config).eval()
    sides = _dfl_side_logits()
    ltrb = [_softmax_expectation(s) for s in sides]
    assert ltrb[0] == pytest.approx(8.0) and ltrb[1] == pytest.approx(3.0, abs=1e-6)
    assert ltrb[3] == pytest.approx(3.5, abs=1e-6)
    logits = [0.3] * 80
    for conv in model.detect.reg_preds:
        assert conv.out_channels == 4 * 17
        _set_pred(conv, [v for side in sides for v in side])  # channel = side * 17 + bin
    for conv in model.detect.cls_preds:
        _set_pred(conv, logits)
    h, w = 64, 64
    with torch.no_grad():
        y = model(torch.rand(1, 3, h, w))
    assert y.shape == (1, _num_anchors(h, w), 85)
    _check_decoded(y, h, w, ltrb, logits)


def test_yolov6m_head_uses_dfl_bins():
    detect = build_model(load_config("yolov6m")).detect
    assert detect.use_dfl and detect.reg_max == 16
    assert all(c.out_channels == 68 for c in detect.reg_preds)
    assert detect.proj.tolist() == [float(k) for k in range(17)]
    assert detect.proj_conv.weight.flatten().tolist() == [float(k) for k in range(17)]


def test_distill_head_evaluates_with_plain_ltrb_branch():
    torch.manual_seed(0)
    config = with_overrides(load_config("yolov6n"), head={"use_dfl": True, "reg_max": 16, "distill_ns": True})
    model = build_model(config).eval()
    ltrb = [1.0, 2.0, 0.5, 0.75]
    for conv in model.detect.reg_preds:
        assert conv.out_channels == 4
        _set_pred(conv, ltrb)
    for conv in model.detect.reg_preds_dist:  # must not influence the evaluation output
        _set_pred(conv, [float(k % 7) for k in range(68)])
    logits = [-1.0] * 80
    for conv in model.detect.cls_preds:
        _set_pred(conv, logits)
    h, w = 64, 96
    with torch.no_grad():
        y = model(torch.rand(1, 3, h, w))
    _check_decoded(y, h, w, ltrb, logits)


# ---------------------------------------------------------------------------------------------- training mode
@pytest.mark.parametrize("head, reg_width, distill", [
    ({"use_dfl": False, "reg_max": 0, "distill_ns": False}, 4, False),
    ({"use_dfl": True, "reg_max": 16, "distill_ns": False}, 68, False),
    ({"use_dfl": True, "reg_max": 16, "distill_ns": True}, 68, True),
])
def test_training_mode_outputs(head, reg_width, distill):
    torch.manual_seed(0)
    config = with_overrides(load_config("yolov6n"), head=head)
    model = build_model(config).train()
    b, h, w = 2, 64, 96
    out = model(torch.rand(b, 3, h, w))
    assert isinstance(out, tuple) and len(out) == (4 if distill else 3)
    feats, cls, reg = out[:3]
    n = _num_anchors(h, w)
    head_channels = [model.detect.stems[i].block.conv.out_channels for i in range(3)]
    assert [tuple(f.shape) for f in feats] == [(b, c, h // s, w // s) for c, s in zip(head_channels, STRIDES)]
    assert cls.shape == (b, n, 80)
    assert cls.min() >= 0 and cls.max() <= 1  # class scores after sigmoid, as YOLOv6's training head returns
    assert reg.shape == (b, n, reg_width)
    if distill:
        assert out[3].shape == (b, n, 4)
    # the prediction convs' biases reach the outputs unchanged (zero initial weights)
    bias = model.detect.cls_preds[0].bias[0].item()
    torch.testing.assert_close(cls[..., 0], torch.full((b, n), _sigmoid(bias)), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------- errors
def test_get_block_unknown_name_raises_value_error():
    with pytest.raises(ValueError, match="nope"):
        get_block("nope")
    assert get_block("repvgg").__name__ == "RepVGGBlock"


def test_load_config_errors_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_config("yolov6_nonexistent")
    bad = tmp_path / "bad.yaml"
    bad.write_text("layout: v3\nblock: repvgg\n")
    with pytest.raises(InputError, match="needs keys"):
        load_config(bad)
