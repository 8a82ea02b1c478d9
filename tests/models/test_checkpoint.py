"""Tests for models/checkpoint.py and models.load_model: official YOLOv6 files against YOLOv6's own outputs, config
inference, refusal of unsafe or foreign files, and the project's own checkpoint format."""
import copy
import json
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import build_model, load_config, load_model, read_checkpoint, reparameterize, save_checkpoint
from models.checkpoint import UnsafeCheckpointError, infer_config
from models.config import available_configs, with_overrides
from utils.errors import InputError

OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "yolov6-official"
FIXTURES = ["yolov6n_v3_official_random", "yolov6n_v3_distillns_random", "yolov6n_reopt_v2_official_random"]
BOX_TOL, SCORE_TOL = 0.05, 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def official(name: str, suffix: str = ".pt") -> Path:
    path = OFFICIAL / f"{name}{suffix}"
    if not path.is_file():
        pytest.fail(f"shared YOLOv6 fixtures not found at {OFFICIAL}: clone the repo with ../shared beside it")
    return path


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------------------------- official files vs YOLOv6
@pytest.mark.parametrize("deploy, ref_key", [(True, "out_train_mode_false"), (False, "out_unfused")])
@pytest.mark.parametrize("name", FIXTURES)
def test_official_checkpoint_matches_yolov6_outputs(name, deploy, ref_key):
    ref = np.load(official(name, ".ref.npz"))
    model = load_model(official(name), deploy=deploy)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    y = forward(model, torch.from_numpy(ref["input"]))
    expected = torch.from_numpy(ref[ref_key])
    assert y.dtype == torch.float32 and y.shape == expected.shape == (1, 2100, 85)
    box_diff = (y[..., :4] - expected[..., :4]).abs().max().item()
    score_diff = (y[..., 4:] - expected[..., 4:]).abs().max().item()
    assert box_diff <= BOX_TOL, f"boxes differ by {box_diff}"
    assert score_diff <= SCORE_TOL, f"scores differ by {score_diff}"
    assert expected[..., 5:].std() > 5e-3 and expected[..., 2:4].std() > 1.0  # the reference is not trivial


def test_loading_official_file_imports_nothing_from_yolov6():
    read_checkpoint(official(FIXTURES[0]))
    assert not any(m == "yolov6" or m.startswith("yolov6.") for m in sys.modules)


@pytest.mark.parametrize("name, config_name, distill, use_dfl, reg_max, block", [
    ("yolov6n_v3_official_random", "yolov6n", False, False, 0, "repvgg"),
    ("yolov6n_v3_distillns_random", "yolov6n", True, True, 16, "repvgg"),
    ("yolov6n_reopt_v2_official_random", "yolov6n_reopt", False, False, 0, "repopt"),
])
def test_read_checkpoint_infers_config(name, config_name, distill, use_dfl, reg_max, block):
    meta = json.loads(official(name, ".keys.json").read_text())
    ckpt = read_checkpoint(official(name))
    assert ckpt.source == "official" and not ckpt.deployed
    cfg = ckpt.config
    assert cfg["name"] == config_name
    assert cfg["block"] == block == meta["training_mode"]
    assert cfg["layout"] == ("v2" if "reopt" in name else "v3")
    assert cfg["head"]["distill_ns"] is distill is meta["distill_ns"]
    assert cfg["head"]["use_dfl"] is use_dfl is meta["head_use_dfl"]
    assert cfg["head"]["reg_max"] == reg_max
    assert cfg["num_classes"] == 80 == meta["num_classes"]
    names = cfg["names"]
    assert len(names) == 80 and names[0] == "person" and names[79] == "toothbrush"
    assert names == meta["modules"][0]["attrs"]["names"]
    # the state_dict is the full official one, FP16 as saved
    official_keys = [(e["key"], tuple(e["shape"])) for e in meta["state_dict"]]
    assert [(k, tuple(v.shape)) for k, v in ckpt.state_dict.items()] == official_keys
    assert ckpt.state_dict["backbone.stem.rbr_dense.conv.weight" if block == "repvgg"
                           else "backbone.stem.conv.weight"].dtype == torch.float16
    assert ckpt.meta.get("epoch") == 299


def test_infer_config_for_m_layout_from_keys_only():
    meta = json.loads(official("yolov6m_v3_official_random", ".keys.json").read_text())
    sd = {e["key"]: torch.zeros(e["shape"]) for e in meta["state_dict"]}
    cfg = infer_config(sd)
    assert cfg["name"] == "yolov6m"
    assert cfg["block"] == "repvgg" and cfg["layout"] == "v3"
    assert cfg["backbone"]["type"] == "CSPBepBackbone" and cfg["neck"]["type"] == "CSPRepBiFPANNeck"
    assert cfg["head"]["use_dfl"] is True and cfg["head"]["reg_max"] == 16 and cfg["head"]["distill_ns"] is False
    assert cfg["num_classes"] == 80
    model = build_model(cfg)
    model.load_state_dict(sd, strict=True)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == \
        [(e["key"], tuple(e["shape"])) for e in meta["state_dict"]]


@pytest.mark.parametrize("config_name", available_configs())
def test_infer_config_recognises_our_own_builds(config_name):
    model = build_model(load_config(config_name))
    # as read from a release file: the pickled class of every module is known
    classes = {name: f"yolov6.layers.common.{type(m).__name__}" for name, m in model.named_modules()}
    cfg = infer_config(model.state_dict(), classes)
    assert cfg["name"] == config_name
    assert cfg["block"] == load_config(config_name)["block"]
    # from keys alone, QARepVGG v1/v2 and Conv-BN-ReLU/SiLU have identical state_dicts; the rest is unambiguous
    if not config_name.endswith("_qa") and config_name != "yolov6l":
        assert infer_config(model.state_dict())["name"] == config_name


# ---------------------------------------------------------------------- official-format files written here
class _FakeYolov6:
    """Registers throwaway ``yolov6.*`` modules so that torch.save pickles classes under YOLOv6's names; removed on
    exit, before anything is read back."""

    NAMES = ("yolov6", "yolov6.models", "yolov6.models.yolo", "yolov6.layers", "yolov6.layers.common")

    def __enter__(self):
        assert not any(n in sys.modules for n in self.NAMES)
        self.modules = {n: types.ModuleType(n) for n in self.NAMES}
        sys.modules.update(self.modules)
        self.patched: list[tuple[type, str, str]] = []
        return self

    def register(self, cls: type, module: str) -> None:
        self.patched.append((cls, cls.__module__, cls.__qualname__))
        cls.__module__ = module
        setattr(self.modules[module], cls.__name__, cls)

    def __exit__(self, *exc):
        for cls, module, qualname in self.patched:
            cls.__module__, cls.__qualname__ = module, qualname
        for n in self.NAMES:
            sys.modules.pop(n, None)


def test_unknown_official_layout_is_an_input_error(tmp_path):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.foo = nn.Conv2d(3, 4, 1)

    Model.__qualname__ = "Model"
    path = tmp_path / "odd.pt"
    with _FakeYolov6() as fake:
        fake.register(Model, "yolov6.models.yolo")
        torch.save({"model": Model().half(), "ema": None}, path)
    assert "yolov6" not in sys.modules
    with pytest.raises(InputError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "unknown YOLOv6 layout" in message
    assert "foo" in message and "Model" in message  # what was seen
    assert str(path) in message


def _save_as_official(model: nn.Module, path: Path) -> None:
    """Pickle our model object the way YOLOv6's trainer does, with every class under a ``yolov6.*`` name."""
    with _FakeYolov6() as fake:
        for cls in {type(m) for m in model.modules()}:
            if not cls.__module__.startswith("torch."):
                fake.register(cls, "yolov6.models.yolo" if cls.__name__ == "Model" else "yolov6.layers.common")
        torch.save({"model": copy.deepcopy(model).half(), "ema": None, "optimizer": None, "epoch": 7}, path)


@pytest.mark.parametrize("config", [
    "yolov6n_qa",
    # a CSP model with Conv-BN-SiLU blocks and widths that no shipped config has
    {"base": "yolov6m", "block": "conv_silu", "width_multiple": 0.25},
])
def test_official_format_file_written_from_our_model_round_trips(tmp_path, config):
    if isinstance(config, dict):
        cfg = with_overrides(load_config(config["base"]), block=config["block"],
                             width_multiple=config["width_multiple"], name="custom")
    else:
        cfg = load_config(config)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial head, BN statistics away from 0/1
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        for conv in list(model.detect.cls_preds) + list(model.detect.reg_preds):
            conv.weight.normal_(0, 0.05)
    path = tmp_path / "official_like.pt"
    _save_as_official(model, path)
    ckpt = read_checkpoint(path)
    assert ckpt.source == "official" and ckpt.meta == {"epoch": 7}
    assert ckpt.config["block"] == cfg["block"]  # read from the pickled class names
    assert ckpt.config["name"] == cfg["name"]
    assert ckpt.config["backbone"]["type"] == cfg["backbone"]["type"]
    reference = copy.deepcopy(model).half().float()  # the file holds FP16 weights
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    loaded = load_model(path, deploy=False)
    torch.testing.assert_close(forward(loaded, x), forward(reference, x), rtol=0, atol=1e-5)
    deployed = load_model(path, deploy=True)
    y_ref = forward(reference, x)
    y = forward(deployed, x)
    tol = 1e-4 * max(1.0, y_ref.abs().max().item())
    assert (y - y_ref).abs().max() <= tol


# ------------------------------------------------------------------------------------------- unsafe pickles
class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Eval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload, expected_names", [
    (_System, ("os.system", "posix.system")),
    (_Eval, ("builtins.eval",)),
])
@pytest.mark.parametrize("wrap", ["top", "inside_official_dict"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, payload, expected_names, wrap):
    marker = tmp_path / "pwned"
    obj = payload(marker)
    path = tmp_path / "evil.pt"
    torch.save(obj if wrap == "top" else {"model": obj, "ema": None}, path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    assert isinstance(info.value, InputError)
    assert any(name in str(info.value) for name in expected_names), str(info.value)
    assert not marker.exists()
    with pytest.raises(InputError):
        load_model(path)
    assert not marker.exists()


def test_legacy_non_zip_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    torch.save(_System(marker), path, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError):
        read_checkpoint(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------- not a checkpoint
def test_text_file_is_an_input_error(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_text("these are not weights\n")
    with pytest.raises(InputError, match="not a PyTorch checkpoint"):
        read_checkpoint(path)


def test_missing_file_is_an_input_error_naming_the_path(tmp_path):
    path = tmp_path / "nowhere" / "yolov6n.pt"
    with pytest.raises(InputError) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(InputError):
        load_model(path)
    with pytest.raises(InputError):  # a directory is not a file either
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("content", [{"foo": 1}, [1, 2, 3], {"model": {"a": torch.zeros(2)}}])
def test_foreign_torch_file_is_not_a_yolov6_checkpoint(tmp_path, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(InputError, match="not a YOLOv6 checkpoint"):
        read_checkpoint(path)


def test_truncated_official_file_is_an_input_error(tmp_path):
    data = official(FIXTURES[0]).read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        read_checkpoint(path)


def test_zip_missing_a_tensor_record_is_an_input_error(tmp_path):
    src = official(FIXTURES[0])
    path = tmp_path / "missing_record.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        names = zin.namelist()
        dropped = next(n for n in names if n.split("/")[-2:] == ["data", "0"])
        for name in names:
            if name != dropped:
                zout.writestr(name, zin.read(name))
    with pytest.raises(InputError, match="could not be read"):
        read_checkpoint(path)


# ------------------------------------------------------------------------------------------------ our format
@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = build_model(load_config("yolov6n")).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
        for conv in list(model.detect.cls_preds) + list(model.detect.reg_preds):
            conv.weight.copy_(0.05 * torch.randn(conv.weight.shape, generator=g))
    return model


def _x():
    return torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(11))


def test_own_checkpoint_round_trip(tmp_path, small_model):
    path = tmp_path / "ckpt" / "model.pt"
    returned = save_checkpoint(path, small_model, meta={"note": "test"}, extra={"calib": {"amax": torch.ones(3)}})
    assert returned == path and path.is_file()
    assert os.listdir(path.parent) == ["model.pt"]  # atomic write: no temporary file left behind
    plain = torch.load(path, weights_only=True)  # plain data only
    assert plain["format"] == "yolov6-partial-quant/1" and plain["deployed"] is False
    assert plain["config"]["name"] == "yolov6n" and plain["meta"] == {"note": "test"}
    assert torch.equal(plain["calib"]["amax"], torch.ones(3))
    assert list(plain["state_dict"]) == list(small_model.state_dict())
    ckpt = read_checkpoint(path)
    assert ckpt.source == "ours" and not ckpt.deployed and ckpt.meta == {"note": "test"}
    x = _x()
    y = forward(small_model, x)
    assert torch.equal(forward(load_model(path, deploy=False), x), y)
    y_deploy = forward(load_model(path, deploy=True), x)
    assert (y_deploy - y).abs().max() <= 1e-4 * max(1.0, y.abs().max().item())


def test_own_deployed_checkpoint_round_trip(tmp_path, small_model):
    deployed = reparameterize(copy.deepcopy(small_model))
    path = save_checkpoint(tmp_path / "deployed.pt", deployed, deployed=True)
    assert read_checkpoint(path).deployed
    x = _x()
    loaded = load_model(path, deploy=True)
    assert torch.equal(forward(loaded, x), forward(deployed, x))
    assert set(loaded.state_dict()) == set(deployed.state_dict())
    with pytest.raises(InputError, match="deploy=True"):
        load_model(path, deploy=False)


def test_deployed_weights_saved_without_the_flag_are_an_input_error(tmp_path, small_model):
    deployed = reparameterize(copy.deepcopy(small_model))
    path = save_checkpoint(tmp_path / "mislabelled.pt", deployed)
    with pytest.raises(InputError, match="do not fit"):
        load_model(path)


def test_failed_save_leaves_previous_file_and_no_temporaries(tmp_path, small_model):
    path = save_checkpoint(tmp_path / "model.pt", small_model)
    before = path.read_bytes()
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):  # a lambda cannot be pickled
        save_checkpoint(path, small_model, extra={"unpicklable": lambda: None})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.pt"]

