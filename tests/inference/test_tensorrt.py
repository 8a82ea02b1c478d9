"""TensorRT runner: host-side logic, CLI errors and a stand-in ``tensorrt`` module that executes on CPU buffers.

TensorRT is not installable without a GPU, so a small fake ``tensorrt`` (inserted in ``sys.modules`` per test)
emulates the named-tensor API of TensorRT 10 and the binding API of TensorRT 8: its engines read their input from
the raw buffer addresses they are given and write a known function of it to the output address. The runner is
pointed at the CPU for these tests; the real thing is checked by the gpu/tensorrt test at the end, when
YOLOV6_TEST_ENGINE names an engine file.
"""
from __future__ import annotations

import ctypes
import enum
import json
import logging
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch

import eval_coco
from tests.helpers import one_line_error
from utils.data.synthetic import generate_synthetic_coco
from utils.errors import InputError
from utils.inference import tensorrt as trt_runner
from utils.inference.runners import create_runner
from utils.inference.tensorrt import (
    EngineExecutor,
    TensorRTRunner,
    TensorSpec,
    batch_plan,
    batch_slices,
    cuda_device,
    fixed_hw,
    input_shape_for,
    pad_batch,
    select_io,
    torch_dtype,
)

NUM_BOXES, NUM_CLASSES = 5, 6  # 6: the synthetic dataset's categories
_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "INT8": torch.int8, "INT32": torch.int32}


# ------------------------------------------------------------------------------------------------ fake tensorrt
def _cli_error(argv: list[str], capsys) -> str:
    return one_line_error(eval_coco, argv, capsys)


def predictions(images: torch.Tensor) -> torch.Tensor:
    """The fake engines' function: box n at (8(n+1), 8(n+1)), 8x8, objectness 1, class k score mean(image)/(k+1)."""
    batch = len(images)
    out = torch.zeros(batch, NUM_BOXES, 5 + NUM_CLASSES)
    centres = 8.0 * torch.arange(1, NUM_BOXES + 1)
    out[..., 0], out[..., 1], out[..., 2:4], out[..., 4] = centres, centres, 8.0, 1.0
    means = images.float().reshape(batch, -1).mean(1)
    out[..., 5:] = (means[:, None] / torch.arange(1, NUM_CLASSES + 1))[:, None, :]
    return out


def _host_view(address: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The memory at a raw address as a tensor (the fake's "device" buffers are host memory)."""
    count = math.prod(shape)
    nbytes = count * torch.empty(0, dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype=dtype, count=count).reshape(shape)


class _Core:
    """What both fake APIs share: tensor specs, profile, shape resolution and execution on raw addresses."""

    def __init__(self, spec: dict):
        self.input_shape = tuple(spec["input"])
        self.profile = [tuple(s) for s in spec.get("profile") or []]
        self.dtypes = {"images": spec.get("input_dtype", "FLOAT")}
        self.outputs = spec.get("outputs", ["outputs"])
        self.dtypes.update({name: spec.get("output_dtype", "FLOAT") for name in self.outputs})
        self.calls: list[tuple[int, int]] = []  # (batch, stream handle) per execution

    def shape(self, name: str, current: tuple[int, ...] | None = None) -> tuple[int, ...]:
        if name == "images":
            return current or self.input_shape
        batch = (current or self.input_shape)[0]
        return (batch, NUM_BOXES, 5 + NUM_CLASSES)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        low, high = self.profile[0], self.profile[2]
        fixed_ok = all(e < 0 or e == s for e, s in zip(self.input_shape, shape))
        return len(shape) == 4 and fixed_ok and all(lo <= s <= hi for lo, s, hi in zip(low, shape, high))

    def run(self, current: tuple[int, ...] | None, addresses: dict[str, int], stream: int) -> bool:
        shape = current or self.input_shape
        if -1 in shape or set(addresses) != {"images", *self.outputs}:
            return False  # TensorRT too refuses to run with unset shapes or addresses
        images = _host_view(addresses["images"], shape, _TORCH[self.dtypes["images"]])
        out = _host_view(addresses["outputs"], self.shape("outputs", shape), _TORCH[self.dtypes["outputs"]])
        out.copy_(predictions(images))
        self.calls.append((shape[0], stream))
        return True


class FakeContext10:
    def __init__(self, core: _Core):
        self.core, self.current, self.addresses = core, None, {}

    def set_input_shape(self, name, shape):
        if name != "images" or not self.core.accepts(tuple(shape)):
            return False
        self.current = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.core.shape(name, self.current)

    def set_tensor_address(self, name, memory):
        self.addresses[name] = memory
        return name in self.core.dtypes

    def execute_async_v3(self, stream_handle):
        return self.core.run(self.current, self.addresses, stream_handle)


class FakeEngine10:
    """ICudaEngine's named-tensor API (TensorRT >= 8.5, 10.x)."""

    def __init__(self, trt, spec: dict):
        self.trt, self.core = trt, _Core(spec)
        self.names = ["images", *self.core.outputs]

    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == "images" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_shape(self, name):
        return self.core.shape(name)

    def get_tensor_dtype(self, name):
        return self.trt.DataType[self.core.dtypes[name]]

    def get_tensor_profile_shape(self, name, profile_index):
        assert name == "images" and profile_index == 0
        return list(self.core.profile)

    def create_execution_context(self):
        return FakeContext10(self.core)


class FakeContext8:
    def __init__(self, core: _Core, names: list[str]):
        self.core, self.names, self.current = core, names, None

    def set_binding_shape(self, binding, shape):
        if binding != 0 or not self.core.accepts(tuple(shape)):
            return False
        self.current = tuple(shape)
        return True

    def get_binding_shape(self, binding):
        return self.core.shape(self.names[binding], self.current)

    def execute_async_v2(self, bindings, stream_handle):
        return self.core.run(self.current, dict(zip(self.names, bindings)), stream_handle)


class FakeEngine8:
    """ICudaEngine's binding-index API (TensorRT 8.0-8.4): no num_io_tensors."""

    def __init__(self, trt, spec: dict):
        self.trt, self.core = trt, _Core(spec)
        self.names = ["images", *self.core.outputs]
        self.num_bindings, self.num_optimization_profiles = len(self.names), 1

    def get_binding_name(self, index):
        return self.names[index]

    def binding_is_input(self, index):
        return index == 0

    def get_binding_shape(self, index):
        return self.core.shape(self.names[index])

    def get_binding_dtype(self, index):
        return self.trt.DataType[self.core.dtypes[self.names[index]]]

    def get_profile_shape(self, profile_index, binding):
        assert profile_index == 0 and binding == 0
        return list(self.core.profile)

    def create_execution_context(self):
        return FakeContext8(self.core, self.names)


def make_fake_trt(version: str = "10.0.0-fake") -> types.ModuleType:
    """A stand-in ``tensorrt`` module; its Runtime reads "engines" that are JSON specs (anything else: None)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    names = ["FLOAT", "HALF", "INT8", "INT32", "BOOL"] + (["BF16", "INT64"] if int(version.split(".")[0]) >= 10 else [])
    trt.DataType = enum.Enum("DataType", names + ["FP8"])
    trt.TensorIOMode = enum.Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    trt.engines = []  # every engine deserialized, for the tests to inspect

    class Logger:
        WARNING = 2

        def __init__(self, min_severity=WARNING):
            self.min_severity = min_severity

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine):
            try:
                spec = json.loads(bytes(serialized_engine))
            except ValueError:
                return None
            engine = (FakeEngine8 if spec.get("api") == 8 else FakeEngine10)(trt, spec)
            trt.engines.append(engine)
            return engine

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


def write_engine(path: Path, **spec) -> Path:
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture
def fake_trt(monkeypatch) -> types.ModuleType:
    """The fake ``tensorrt`` imported by the runner, which runs on the CPU as if it were the CUDA device."""
    trt = make_fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_runner, "cuda_device", lambda device: torch.device("cpu"))
    return trt


@pytest.fixture(autouse=True)
def _restore_logging():
    """run_cli sets up logging on the (captured) stderr of its test; later tests must not log to that stream."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:], logging.root.level = handlers, level


def _images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ pure helpers
def test_dtype_mapping_covers_tensorrt_8_and_10():
    trt10, trt8 = make_fake_trt("10.0.0"), make_fake_trt("8.4.3")
    assert torch_dtype(trt10, trt10.DataType.FLOAT) is torch.float32
    assert torch_dtype(trt10, trt10.DataType.HALF) is torch.float16
    assert torch_dtype(trt10, trt10.DataType.BF16) is torch.bfloat16
    assert torch_dtype(trt10, trt10.DataType.INT64) is torch.int64
    assert torch_dtype(trt8, trt8.DataType.INT8) is torch.int8  # no BF16/INT64 members in 8.x: skipped, no error
    assert torch_dtype(trt8, trt8.DataType.BOOL) is torch.bool
    with pytest.raises(InputError, match="float16"):
        torch_dtype(trt10, trt10.DataType.FP8)


def test_batch_slices_and_padding():
    assert batch_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert batch_slices(3, 8) == [slice(0, 3)] and batch_slices(0, 4) == []
    with pytest.raises(ValueError):
        batch_slices(3, 0)
    images = _images(3)
    padded = pad_batch(images, 5)
    assert padded.shape == (5, 3, 32, 32) and torch.equal(padded[:3], images) and not padded[3:].any()
    assert pad_batch(images, 3) is images and pad_batch(images, 1) is images


def test_batch_plan_and_input_size_from_engine_shapes():
    assert batch_plan((4, 3, 640, 640), None) == (4, 4)  # fixed batch: pad to 4
    profile = ((1, 3, 640, 640), (8, 3, 640, 640), (16, 3, 640, 640))
    assert batch_plan((-1, 3, 640, 640), profile) == (1, 16)  # dynamic: chunks of the profile max
    with pytest.raises(InputError, match="optimization profile"):
        batch_plan((-1, 3, 640, 640), None)
    assert fixed_hw((1, 3, 640, 480)) == (640, 480) and fixed_hw((-1, 3, -1, -1)) is None
    assert input_shape_for((-1, 3, 64, 64), (7, 3, 64, 64)) == (7, 3, 64, 64)
    assert input_shape_for((1, 3, -1, -1), (1, 3, 96, 128)) == (1, 3, 96, 128)
    with pytest.raises(InputError, match="--img-size"):
        input_shape_for((-1, 3, 64, 64), (2, 3, 96, 96))


def test_select_io_rejects_end_to_end_and_odd_engines():
    image = TensorSpec("images", True, (-1, 3, 640, 640), None)
    raw = TensorSpec("outputs", False, (-1, 8400, 85), None)
    assert select_io([raw, image]) == (image, raw)
    nms = [TensorSpec(n, False, (-1, 100), None) for n in ("num_dets", "det_boxes", "det_scores", "det_classes")]
    with pytest.raises(InputError, match="--end2end"):
        select_io([image, *nms])
    with pytest.raises(InputError, match="expected one 'images'"):
        select_io([image, TensorSpec("extra", True, (1,), None), raw])
    with pytest.raises(InputError, match=r"\[B,3,H,W\]"):
        select_io([TensorSpec("images", True, (1, 640, 640), None), raw])


def test_cuda_device_refuses_cpu_and_missing_gpus(monkeypatch):
    with pytest.raises(InputError, match="pass --device cuda:0"):
        cuda_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="CUDA GPU"):
        cuda_device("cuda:0")


# ------------------------------------------------------------------------------------------------ execution core
@pytest.mark.parametrize("api", [10, 8])
def test_dynamic_batch_is_chunked_by_the_profile_max(fake_trt, tmp_path, api):
    path = write_engine(tmp_path / "dyn.engine", api=api, input=[-1, 3, 32, 32],
                        profile=[[1, 3, 32, 32], [2, 3, 32, 32], [4, 3, 32, 32]])
    runner = create_runner(path, "cuda:0")
    assert isinstance(runner, TensorRTRunner) and runner.input_hw == (32, 32) and runner.name.startswith("tensorrt")
    images = _images(10)
    out = runner(images)
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == (10, NUM_BOXES, 5 + NUM_CLASSES)
    torch.testing.assert_close(out, predictions(images))
    assert fake_trt.engines[-1].core.calls == [(4, 0), (4, 0), (2, 0)]  # 10 images, profile max 4
    runner(images[:3])
    assert fake_trt.engines[-1].core.calls[-1] == (3, 0)


def test_fixed_batch_pads_the_last_chunk_and_drops_the_padding(fake_trt, tmp_path):
    runner = create_runner(write_engine(tmp_path / "fixed.plan", input=[4, 3, 32, 32]), "cuda:0")
    images = _images(6, seed=1)
    torch.testing.assert_close(runner(images), predictions(images))
    assert fake_trt.engines[-1].core.calls == [(4, 0), (4, 0)]
    assert runner(images[:1]).shape[0] == 1


def test_profile_min_batch_pads_like_a_fixed_batch(fake_trt, tmp_path):
    """build_engine.sh --batch N makes min = opt = max = N on a dynamic-batch ONNX: short batches are padded."""
    path = write_engine(tmp_path / "batch4.engine", api=10, input=[-1, 3, 32, 32],
                        profile=[[4, 3, 32, 32], [4, 3, 32, 32], [4, 3, 32, 32]])
    runner = create_runner(path, "cuda:0")
    images = _images(6, seed=3)
    torch.testing.assert_close(runner(images), predictions(images))
    assert fake_trt.engines[-1].core.calls == [(4, 0), (4, 0)]


def test_fp16_io_engine_gets_half_input_and_returns_float32(fake_trt, tmp_path):
    path = write_engine(tmp_path / "half.trt", input=[2, 3, 32, 32], input_dtype="HALF", output_dtype="HALF")
    runner = create_runner(path, "cuda:0")
    images = _images(3, seed=2)
    out = runner(images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, predictions(images.half()).half().float())


def test_executor_runs_a_deserialized_engine_directly():
    trt = make_fake_trt()
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(json.dumps(
        {"input": [-1, 3, -1, -1], "profile": [[1, 3, 32, 32], [1, 3, 64, 64], [2, 3, 96, 96]]}).encode())
    executor = EngineExecutor(trt, engine, torch.device("cpu"))
    assert executor.input_hw is None and executor.max_batch == 2
    images = _images(3, size=64)
    torch.testing.assert_close(executor(images), predictions(images))
    with pytest.raises(InputError, match="optimization profile allows"):
        executor(_images(1, size=128))  # outside the profile: TensorRT's set_input_shape says no


def test_bad_engines_are_input_errors(fake_trt, tmp_path):
    (tmp_path / "junk.engine").write_bytes(b"\x00not an engine")  # the fake runtime returns None, like TensorRT
    with pytest.raises(InputError, match="could not be loaded by TensorRT 10.0.0-fake.*rebuild"):
        create_runner(tmp_path / "junk.engine", "cuda:0")
    e2e = write_engine(tmp_path / "e2e.engine", input=[1, 3, 32, 32],
                       outputs=["num_dets", "det_boxes", "det_scores", "det_classes"])
    with pytest.raises(InputError, match="--end2end"):
        create_runner(e2e, "cuda:0")
    int8_io = write_engine(tmp_path / "int8.engine", input=[1, 3, 32, 32], input_dtype="INT8")
    with pytest.raises(InputError, match="--inputIOFormats"):
        create_runner(int8_io, "cuda:0")
    with pytest.raises(InputError, match="drop --half"):
        create_runner(write_engine(tmp_path / "ok.engine", input=[1, 3, 32, 32]), "cuda:0", half=True)


# ------------------------------------------------------------------------------------------------ eval_coco CLI


def _argv(weights: Path, *extra: str) -> list[str]:
    return ["--weights", str(weights), "--data", "missing.json", "--images", "missing", *extra]


def test_missing_tensorrt_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError, installed or not
    engine = write_engine(tmp_path / "model.engine", input=[1, 3, 32, 32])
    message = _cli_error(_argv(engine, "--device", "cuda:0"), capsys)
    assert "requirements-trt.txt" in message and "TensorRT's Python package" in message


def test_engine_on_cpu_or_without_gpu_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt())
    engine = write_engine(tmp_path / "model.engine", input=[1, 3, 32, 32])
    assert "pass --device cuda:0" in _cli_error(_argv(engine), capsys)  # --device defaults to cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = _cli_error(_argv(engine, "--device", "cuda:0"), capsys)
    assert "CUDA GPU" in message and "use --device cpu" not in message
    assert "drop --half" in _cli_error(_argv(engine, "--device", "cuda:0", "--half"), capsys)


def test_eval_coco_scores_an_engine_and_checks_its_input_size(fake_trt, tmp_path, capsys):
    info = generate_synthetic_coco(tmp_path / "data", num_train=0, num_val=3, img_size=64, seed=0)
    engine = write_engine(tmp_path / "model.engine", input=[2, 3, 64, 64])
    argv = ["--weights", str(engine), "--data", str(info["val"]["ann_file"]), "--images",
            str(info["val"]["img_dir"]), "--device", "cuda:0", "--batch-size", "3", "--workers", "0", "--no-progress"]
    result = eval_coco.main(eval_coco.get_args_parser().parse_args(argv))
    assert result["backend"].startswith("tensorrt") and result["img_size"] == 64 and result["images"] == 3
    assert fake_trt.engines[-1].core.calls == [(2, 0), (2, 0)]  # 3 images on a batch-2 engine: padded
    capsys.readouterr()
    assert "pass --img-size 64" in _cli_error(argv + ["--img-size", "96"], capsys)


# ------------------------------------------------------------------------------------------------ real TensorRT
@pytest.mark.gpu
@pytest.mark.tensorrt
def test_real_engine_gives_yolov6_predictions():
    """Runs the engine named by YOLOV6_TEST_ENGINE (e.g. built with build_engine.sh) on the GPU."""
    path = os.environ.get("YOLOV6_TEST_ENGINE")
    if not path:
        pytest.skip("set YOLOV6_TEST_ENGINE to a TensorRT engine file to run this test")
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    runner = TensorRTRunner(path, "cuda:0")
    size = runner.input_hw or (640, 640)
    images = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(0))
    out = runner(images)
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.ndim == 3
    assert out.shape[0] == 3 and out.shape[2] > 5 and torch.isfinite(out).all()
    assert out[..., 4:].min() >= 0 and out[..., 4:].max() <= 1 + 1e-3  # objectness and sigmoid class scores
    torch.testing.assert_close(runner(images[:1]), out[:1], rtol=1e-2, atol=0.5)  # chunking/padding independent
