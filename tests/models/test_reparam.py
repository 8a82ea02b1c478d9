"""Tests for models/reparam.py: every block's deployed form computes the training form's function (eval mode),
whole models deploy to the official deployed layout, and reparameterization is idempotent."""
import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from models import build_model, is_deployed, load_config, reparameterize
from models.common import BepC3, ConvModule, QARepVGGBlock, QARepVGGBlockV2, RealVGGBlock, RepVGGBlock
from models.config import available_configs, with_overrides
from models.reparam import fuse_conv_bn

OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "yolov6-official"
MULTI_BRANCH = ("rbr_dense", "rbr_1x1", "rbr_identity", "rbr_avg")


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, BottleRep alphas and head prediction weights (seeded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.3 + 1.5 * torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
            elif isinstance(m, nn.Conv2d) and name.split(".")[-2:-1] in (["cls_preds"], ["reg_preds"],
                                                                          ["reg_preds_dist"]):
                fan_in = m.weight[0].numel()  # YOLOv6 zero-initialises these: give them real weights
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
        for name, p in module.named_parameters():
            if name.endswith("alpha"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, QARepVGGBlock):  # its post-BN sees a sum of 3-4 branches: keep activations O(1)
                m.bn.running_var.copy_(2.0 + 4.0 * torch.rand(m.bn.num_features, generator=g))
    return module


def assert_same_function(y_train: torch.Tensor, y_deploy: torch.Tensor) -> None:
    assert y_train.shape == y_deploy.shape
    tol = 1e-4 * max(1.0, y_train.abs().max().item())
    diff = (y_train - y_deploy).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol:.3g}"


def deploy_and_compare(module: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    module.eval()
    with torch.no_grad():
        y_train = module(x)
    deployed = reparameterize(copy.deepcopy(module))
    assert not deployed.training
    with torch.no_grad():
        y_deploy = deployed(x)
    assert_same_function(y_train, y_deploy)
    return deployed, y_train


def no_bn(module: nn.Module) -> bool:
    return not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())


# ------------------------------------------------------------------------------------------------------- blocks
BLOCK_CASES = {
    "repvgg_identity": lambda: RepVGGBlock(8, 8),
    "repvgg_no_identity": lambda: RepVGGBlock(8, 16),
    "repvgg_stride2": lambda: RepVGGBlock(8, 8, stride=2),
    "qarepvgg_identity": lambda: QARepVGGBlock(8, 8),
    "qarepvgg_stride2": lambda: QARepVGGBlock(8, 16, stride=2),
    "qarepvggv2_avg": lambda: QARepVGGBlockV2(8, 8),
    "qarepvggv2_stride2": lambda: QARepVGGBlockV2(8, 8, stride=2),
    "realvgg": lambda: RealVGGBlock(8, 16),
    "realvgg_stride2": lambda: RealVGGBlock(8, 8, stride=2),
    "conv_relu": lambda: ConvModule(8, 16, 3, activation="relu"),
    "conv_silu_s2": lambda: ConvModule(8, 16, 3, stride=2, activation="silu"),
    "conv_linear_1x1": lambda: ConvModule(8, 16, 1, activation=None),
    "bepc3_repvgg": lambda: BepC3(16, 16, n=4, e=0.5, block=RepVGGBlock),
    "bepc3_qarepvggv2": lambda: BepC3(16, 24, n=2, e=2 / 3, block=QARepVGGBlockV2),
}


@pytest.mark.parametrize("case", sorted(BLOCK_CASES))
def test_block_deploys_to_same_function(case):
    torch.manual_seed(0)
    block = randomize(BLOCK_CASES[case](), seed=1)
    x = torch.randn(2, 8 if not case.startswith("bepc3") else 16, 17, 19)  # odd sizes: padding/stride edges
    deployed, _ = deploy_and_compare(block, x)
    assert no_bn(deployed) and is_deployed(deployed)
    for m in deployed.modules():
        if isinstance(m, (RepVGGBlock, QARepVGGBlock)):
            assert isinstance(m.rbr_reparam, nn.Conv2d) and m.rbr_reparam.kernel_size == (3, 3)
            assert m.rbr_reparam.bias is not None
            assert not any(hasattr(m, name) for name in MULTI_BRANCH)
            assert [n for n, _ in m.named_children()] == ["nonlinearity", "se", "rbr_reparam"]


def test_qarepvggv2_average_branch_matters():
    """The avg-pool branch is really part of the function that the deployed kernel reproduces."""
    torch.manual_seed(0)
    v2 = randomize(QARepVGGBlockV2(8, 8), seed=2).eval()
    v1 = QARepVGGBlock(8, 8).eval()
    v1.load_state_dict(v2.state_dict())
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        assert (v2(x) - v1(x)).abs().max() > 1e-2
        v2_deployed = reparameterize(copy.deepcopy(v2))
        torch.testing.assert_close(v2_deployed(x), v2(x), rtol=1e-5, atol=1e-5)


def test_repvgg_identity_branch_by_hand():
    """dense and 1x1 convs zeroed: the block is relu(bn_identity(x)) = relu(x * gamma / sqrt(var + eps) + beta)."""
    block = RepVGGBlock(4, 4).eval()
    with torch.no_grad():
        block.rbr_dense.conv.weight.zero_()
        block.rbr_1x1.conv.weight.zero_()
        bn = block.rbr_identity
        bn.weight.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, 0.5, 1.0, -0.25]))
        bn.running_mean.copy_(torch.tensor([0.0, 1.0, 0.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 9.0, 0.25]))
        bn.eps = 0.0
        for side in (block.rbr_dense.bn, block.rbr_1x1.bn):  # zero conv -> bn adds only its shift
            side.running_mean.zero_()
            side.bias.zero_()
    x = torch.randn(1, 4, 5, 5)
    scale = torch.tensor([1.0, 1.0, -1 / 3, 1.0]).view(1, 4, 1, 1)
    shift = torch.tensor([0.0, 0.5 - 1.0, 1.0, -0.25 - 2.0]).view(1, 4, 1, 1)
    expected = torch.relu(x * scale + shift)
    deployed = reparameterize(copy.deepcopy(block))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(deployed(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias, padding_mode", [(True, "zeros"), (False, "reflect")])
def test_fuse_conv_bn_keeps_geometry(bias, padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, groups=4, bias=bias, padding_mode=padding_mode)
    bn = randomize(nn.Sequential(nn.BatchNorm2d(12)), seed=3)[0].eval()
    fused = fuse_conv_bn(conv, bn)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(fused, attr) == getattr(conv, attr), attr
    assert fused.weight.shape == conv.weight.shape == (12, 2, 3, 3)
    assert fused.bias is not None
    x = torch.randn(2, 8, 15, 13)
    with torch.no_grad():
        expected = bn(conv(x))
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ whole models
@pytest.mark.parametrize("name", available_configs())
def test_whole_model_deploys_to_same_function(name):
    torch.manual_seed(0)
    model = randomize(build_model(load_config(name)), seed=4)
    assert not is_deployed(model)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    deployed, y_train = deploy_and_compare(model, x)
    with torch.no_grad():
        y = deployed(x)
    assert (y[..., 4:] - y_train[..., 4:]).abs().max() <= 1e-4  # scores on their own scale, not the boxes'
    # the comparison is only meaningful if the outputs are neither saturated nor huge
    scores = y[..., 5:]
    assert ((scores > 0.02) & (scores < 0.98)).float().mean() > 0.5, "scores should not be saturated"
    assert y[..., :4].abs().max() < 64 * 50, "boxes should stay on the scale of the input"
    assert is_deployed(deployed) and no_bn(deployed)
    assert not any(hasattr(m, b) for m in deployed.modules() if isinstance(m, (RepVGGBlock, QARepVGGBlock))
                   for b in MULTI_BRANCH)
    # idempotent: a second pass changes neither the weights nor the function
    before = {k: v.clone() for k, v in deployed.state_dict().items()}
    again = reparameterize(deployed)
    assert again is deployed
    after = deployed.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(deployed(x), y)


@pytest.mark.parametrize("name", ["yolov6n", "yolov6n_qa", "yolov6n_reopt", "yolov6m_qa"])
def test_whole_model_deploy_is_exact_in_float64(name):
    """In float64 the folding algebra is checked to ~1e-12 (float32 rounding no longer hides small errors)."""
    model = randomize(build_model(load_config(name)), seed=7).double().eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    deployed = reparameterize(copy.deepcopy(model))
    assert all(p.dtype == torch.float64 for p in deployed.parameters())
    with torch.no_grad():
        y, y_deploy = model(x), deployed(x)
    assert (y - y_deploy).abs().max() <= 1e-10 * max(1.0, y.abs().max().item())


def _official_deploy_keys(fixture: str) -> list[tuple[str, tuple[int, ...]]]:
    path = OFFICIAL / f"{fixture}.keys.json"
    if not path.is_file():
        pytest.fail(f"shared YOLOv6 fixtures not found at {OFFICIAL}: clone the repo with ../shared beside it")
    entries = json.loads(path.read_text())["deploy_state_dict_after_fuse_and_switch_to_deploy"]
    return [(e["key"], tuple(e["shape"])) for e in entries]


def _deployed_keys(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    model = reparameterize(build_model(config))
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("config, fixture", [
    ("yolov6n", "yolov6n_v3_official_random"),
    ("distill", "yolov6n_v3_distillns_random"),
    ("yolov6m", "yolov6m_v3_official_random"),
])
def test_deployed_keys_equal_official_deploy(config, fixture):
    official = _official_deploy_keys(fixture)
    if config == "distill":
        cfg = with_overrides(load_config("yolov6n"), head={"use_dfl": True, "reg_max": 16, "distill_ns": True})
    else:
        cfg = load_config(config)
    ours = _deployed_keys(cfg)
    assert sorted(ours) == sorted(official)
    assert [k for k, _ in ours] == [k for k, _ in official]


def test_reopt_deployed_keys_differ_from_official_only_by_folded_realvgg_bn():
    """YOLOv6 0.2.1's fuse_model folds Conv/SimConv only and keeps RealVGGBlock's BN; we fold that BN too, so each
    RealVGGBlock's ``bn.*`` entries become one ``conv.bias`` and nothing else differs."""
    official = dict(_official_deploy_keys("yolov6n_reopt_v2_official_random"))
    ours = dict(_deployed_keys(load_config("yolov6n_reopt")))
    model = build_model(load_config("yolov6n_reopt"))
    realvgg = [n for n, m in model.named_modules() if isinstance(m, RealVGGBlock)]
    assert realvgg
    expected = dict(official)
    for prefix in realvgg:
        channels = official[f"{prefix}.bn.weight"]
        for suffix in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            del expected[f"{prefix}.bn.{suffix}"]
        expected[f"{prefix}.conv.bias"] = channels
    assert ours == expected
