"""Run a serialized TensorRT engine (.engine/.trt/.plan) with the Runner interface of utils/runners.py.

Optional: needs TensorRT's Python package (``requirements-trt.txt``) and a CUDA GPU. There is no pycuda: PyTorch
CUDA tensors hold the engine's input and output buffers and PyTorch's current CUDA stream runs it.

Two TensorRT Python APIs are supported: the named-tensor API (``num_io_tensors``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``; TensorRT >= 8.5 and the only one in 10.x) and, for older engines, the
binding-index API (``num_bindings``, ``set_binding_shape``, ``execute_async_v2``). Everything that can be decided on
the host (shapes, optimization profiles, batch chunks, data types) is a plain function, testable without a GPU.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ContextManager

import torch

from utils.errors import InputError

_logger = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "outputs"
# TensorRT DataType member -> torch dtype; members missing from older releases (BF16, INT64 came with 10.0) are skipped
_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
           "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
_REBUILD = "rebuild the engine from its .onnx on this machine (build_engine.sh / trtexec)"


@dataclass(frozen=True)
class TensorSpec:
    """One engine I/O tensor as the engine declares it: -1 marks a dynamic dimension."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    trt_dtype: Any


# ------------------------------------------------------------------------------------------------ host-side helpers
def dims(value: Any) -> tuple[int, ...]:
    """A TensorRT ``Dims`` (or any sequence of ints) as a tuple."""
    return tuple(int(value[i]) for i in range(len(value)))


def torch_dtype(trt: ModuleType, trt_dtype: Any) -> torch.dtype:
    """The torch dtype of a ``trt.DataType`` member."""
    for name, dtype in _DTYPES.items():
        member = getattr(trt.DataType, name, None)
        if member is not None and member == trt_dtype:
            return dtype
    raise InputError(f"the engine uses TensorRT data type {trt_dtype} for its input or output, which PyTorch cannot "
                     "hold; rebuild it with float32 or float16 I/O")


def select_io(specs: list[TensorSpec]) -> tuple[TensorSpec, TensorSpec]:
    """The image input and the raw-prediction output of a YOLOv6 engine; anything else is an InputError."""
    inputs = [s for s in specs if s.is_input]
    outputs = [s for s in specs if not s.is_input]
    if len(outputs) != 1:
        raise InputError(f"the engine has outputs {[s.name for s in outputs]}, expected one '{OUTPUT_NAME}' "
                         "[B,N,5+nc] tensor; an engine with built-in NMS (num_dets/det_boxes/...) cannot be scored "
                         "here: build the engine without --end2end, from the raw-output ONNX of export_onnx.py")
    if len(inputs) != 1:
        raise InputError(f"the engine has inputs {[s.name for s in inputs]}, expected one '{INPUT_NAME}' image "
                         "tensor; build it from the ONNX of export_onnx.py")
    image, output = inputs[0], outputs[0]
    if len(image.shape) != 4 or image.shape[1] not in (3, -1):
        raise InputError(f"the engine input '{image.name}' has shape {image.shape}, expected [B,3,H,W]")
    if len(output.shape) != 3:
        raise InputError(f"the engine output '{output.name}' has shape {output.shape}, expected [B,N,5+nc]")
    return image, output


def batch_plan(input_shape: tuple[int, ...], profile: tuple[tuple[int, ...], ...] | None) -> tuple[int, int]:
    """(smallest, largest) batch an engine runs, from its input shape and, for a dynamic batch, its (min, opt, max)
    optimization profile. Smaller batches are zero-padded, larger ones split."""
    if input_shape[0] > 0:
        return input_shape[0], input_shape[0]
    if not profile or len(profile) != 3 or not 1 <= profile[0][0] <= profile[2][0]:
        raise InputError(f"the engine input has a dynamic batch {input_shape} but no usable optimization profile "
                         f"({profile}); {_REBUILD} with --minShapes/--optShapes/--maxShapes")
    return profile[0][0], profile[2][0]


def fixed_hw(input_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The engine's input height and width when both are fixed, else None."""
    h, w = input_shape[2], input_shape[3]
    return (h, w) if h > 0 and w > 0 else None


def batch_slices(total: int, step: int) -> list[slice]:
    """Consecutive slices of at most ``step`` items covering ``total`` items."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return [slice(start, min(start + step, total)) for start in range(0, total, step)]


def pad_batch(images: torch.Tensor, min_size: int) -> torch.Tensor:
    """``images`` padded with zero images up to ``min_size`` (fixed-batch engines, profiles with min batch > 1)."""
    if len(images) >= min_size:
        return images
    return torch.cat([images, images.new_zeros((min_size - len(images),) + tuple(images.shape[1:]))])


def input_shape_for(engine_shape: tuple[int, ...], batch_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape to run ``batch_shape`` with: engine dims must match where they are fixed (-1 takes any)."""
    if len(engine_shape) != len(batch_shape) or any(e > 0 and e != b for e, b in zip(engine_shape, batch_shape)):
        raise InputError(f"the engine takes inputs of shape {engine_shape} (-1: any) but got a batch of shape "
                         f"{tuple(batch_shape)}; pass the engine's --img-size or {_REBUILD} for this size")
    return tuple(batch_shape)


def cuda_device(device: torch.device | str) -> torch.device:
    """The CUDA device an engine runs on; CPU devices and machines without CUDA are InputErrors."""
    device = torch.device(device)
    if device.type != "cuda":
        raise InputError(f"TensorRT engines run on an NVIDIA GPU, not on --device {device}; pass --device cuda:0")
    if not torch.cuda.is_available():
        raise InputError("TensorRT engines need a CUDA GPU but PyTorch sees none here; run on a GPU machine with a "
                         "CUDA build of PyTorch, or evaluate the .onnx the engine was built from")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                         f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def device_scope(device: torch.device) -> ContextManager[Any]:
    """Makes ``device`` current for TensorRT calls (engines live on the GPU that is current when deserialized)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, imported only when an engine is used."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the package is there but its CUDA/TensorRT libraries are not
        raise InputError(f"running .engine files needs TensorRT's Python package (pip install -r "
                         f"requirements-trt.txt on a machine with an NVIDIA GPU); import tensorrt failed: {exc}. "
                         "Without TensorRT, evaluate the .onnx the engine was built from") from None
    return trt


def deserialize_engine(trt: ModuleType, path: Path) -> tuple[Any, Any]:
    """(runtime, engine) for a serialized engine file; the runtime must outlive the engine."""
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the engine {path}: {exc.strerror or exc}") from None
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    try:
        engine = runtime.deserialize_cuda_engine(blob)
    except Exception:  # noqa: BLE001 - some releases raise instead of returning None; both mean "not loadable here"
        engine = None
    if engine is None:
        version = getattr(trt, "__version__", "?")
        raise InputError(f"{path} could not be loaded by TensorRT {version}: an engine only runs with the TensorRT "
                         f"version and GPU it was built with (or the file is not an engine); {_REBUILD}")
    return runtime, engine


def _create_context(engine: Any) -> Any:
    context = engine.create_execution_context()
    if context is None:
        raise InputError("TensorRT could not create an execution context for the engine (out of GPU memory?); "
                         "free GPU memory or use another --device")
    return context


# ------------------------------------------------------------------------------------------------ TensorRT APIs
class _TensorApi:
    """The named-tensor API (TensorRT >= 8.5; the only one in 10.x)."""

    def __init__(self, trt: ModuleType, engine: Any):
        self.trt, self.engine, self.context = trt, engine, _create_context(engine)

    def specs(self) -> list[TensorSpec]:
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        return [TensorSpec(name, engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT,
                           dims(engine.get_tensor_shape(name)), engine.get_tensor_dtype(name)) for name in names]

    def profile(self, name: str) -> tuple[tuple[int, ...], ...]:
        return tuple(dims(shape) for shape in self.engine.get_tensor_profile_shape(name, 0))

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        return bool(self.context.set_input_shape(name, shape))

    def output_shape(self, name: str) -> tuple[int, ...]:
        return dims(self.context.get_tensor_shape(name))

    def execute(self, addresses: dict[str, int], stream_handle: int) -> bool:
        if not all(self.context.set_tensor_address(name, address) for name, address in addresses.items()):
            return False
        return bool(self.context.execute_async_v3(stream_handle))


class _BindingApi:
    """The binding-index API of TensorRT 8.0-8.4 (deprecated in 8.5, removed in 10.0)."""

    def __init__(self, trt: ModuleType, engine: Any):
        self.engine, self.context = engine, _create_context(engine)
        per_profile = engine.num_bindings // max(1, getattr(engine, "num_optimization_profiles", 1))
        self.names = [engine.get_binding_name(i) for i in range(per_profile)]  # profile 0's bindings come first

    def specs(self) -> list[TensorSpec]:
        engine = self.engine
        return [TensorSpec(name, bool(engine.binding_is_input(i)), dims(engine.get_binding_shape(i)),
                           engine.get_binding_dtype(i)) for i, name in enumerate(self.names)]

    def profile(self, name: str) -> tuple[tuple[int, ...], ...]:
        return tuple(dims(shape) for shape in self.engine.get_profile_shape(0, self.names.index(name)))

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        return bool(self.context.set_binding_shape(self.names.index(name), shape))

    def output_shape(self, name: str) -> tuple[int, ...]:
        return dims(self.context.get_binding_shape(self.names.index(name)))

    def execute(self, addresses: dict[str, int], stream_handle: int) -> bool:
        return bool(self.context.execute_async_v2([addresses[name] for name in self.names], stream_handle))


# ------------------------------------------------------------------------------------------------ execution
class EngineExecutor:
    """Runs a deserialized engine on torch buffers of ``device``, chunking and padding batches as the engine needs.

    ``device`` is a CUDA device in use; tests pass the CPU with a stand-in engine, whose "device" pointers are then
    host addresses and whose stream handle is 0.
    """

    def __init__(self, trt: ModuleType, engine: Any, device: torch.device):
        self.engine, self.device = engine, torch.device(device)
        self.api = _TensorApi(trt, engine) if hasattr(engine, "num_io_tensors") else _BindingApi(trt, engine)
        self.input, self.output = select_io(self.api.specs())
        self.input_dtype = torch_dtype(trt, self.input.trt_dtype)
        self.output_dtype = torch_dtype(trt, self.output.trt_dtype)
        if not self.input_dtype.is_floating_point:
            raise InputError(f"the engine input '{self.input.name}' is {self.input_dtype}; images need a float "
                             "input: rebuild the engine without an integer --inputIOFormats")
        self.dynamic = -1 in self.input.shape
        self.profile_shapes = self.api.profile(self.input.name) if self.dynamic else None
        self.min_batch, self.max_batch = batch_plan(self.input.shape, self.profile_shapes)
        self.input_hw = fixed_hw(self.input.shape)

    def describe(self) -> str:
        profile = f", profile min/opt/max {self.profile_shapes}" if self.dynamic else ""
        return (f"input '{self.input.name}' {self.input.shape} {self.input_dtype}{profile} -> output "
                f"'{self.output.name}' {self.output.shape} {self.output_dtype}")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach()
        return torch.cat([self._run_chunk(images[part]) for part in batch_slices(len(images), self.max_batch)])

    def _run_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        count = len(chunk)
        batch = pad_batch(chunk, self.min_batch).to(self.device, self.input_dtype).contiguous()
        shape = input_shape_for(self.input.shape, tuple(batch.shape))
        if self.dynamic and not self.api.set_input_shape(self.input.name, shape):
            raise InputError(f"the engine does not accept input shape {shape}: its optimization profile allows "
                             f"{self.profile_shapes[0]} to {self.profile_shapes[2]}")
        output = torch.empty(self._output_shape(), dtype=self.output_dtype, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        addresses = {self.input.name: batch.data_ptr(), self.output.name: output.data_ptr()}
        if not self.api.execute(addresses, stream.cuda_stream if stream is not None else 0):
            raise RuntimeError(f"TensorRT failed to run the engine on a batch of shape {shape} (see its log above)")
        if stream is not None:
            stream.synchronize()  # the buffers are read (and may be freed) only after the engine is done with them
        return output[:count].float().cpu()

    def _output_shape(self) -> tuple[int, ...]:
        shape = self.api.output_shape(self.output.name)
        if any(d < 0 for d in shape):
            raise RuntimeError(f"TensorRT left the output '{self.output.name}' shape unresolved: {shape}")
        return shape


class TensorRTRunner:
    """Runs a TensorRT engine file: float32 [B,3,H,W] in [0,1] -> raw predictions [B,N,5+nc], float32 on the CPU.

    An engine runs in the precision it was built with; FP16-I/O engines get half inputs. Batches larger than the
    engine's fixed batch (or its profile's max batch) are split; a batch smaller than the fixed batch (or the
    profile's min batch, as in build_engine.sh --batch N engines) is zero-padded and the extra rows dropped.

    Raises:
        InputError: TensorRT missing, a non-CUDA device, an unreadable or incompatible engine, or an engine whose
            I/O is not YOLOv6's raw ``images`` -> ``outputs``.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cuda:0"):
        path = Path(path)
        trt = import_tensorrt()
        self.device = cuda_device(device)
        with device_scope(self.device):
            self._runtime, engine = deserialize_engine(trt, path)
            self._executor = EngineExecutor(trt, engine, self.device)
        self.input_hw = self._executor.input_hw
        io_dtype = str(self._executor.input_dtype).replace("torch.", "")
        self.name = f"tensorrt {getattr(trt, '__version__', '?')} ({io_dtype} I/O)"
        _logger.info("TensorRT engine %s on %s: %s", path, self.device, self._executor.describe())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with device_scope(self.device):
            return self._executor(images)
