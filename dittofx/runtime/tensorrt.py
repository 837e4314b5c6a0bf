"""Run a TensorRT engine: `TensorRTRunner(path)(*inputs) -> list[torch.Tensor]` (CUDA tensors).

Inputs are torch tensors or numpy arrays in the order of `input_names`, or by name.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dittofx.errors import ExportError, first_line
from dittofx.signature import order_inputs

TENSORRT_MISSING = "tensorrt is not installed: pip install 'dittofx[tensorrt]' (needs an NVIDIA GPU)"


def import_tensorrt():
    """The tensorrt module, or ExportError saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError(TENSORRT_MISSING) from None
    except Exception as e:  # noqa: BLE001 - a broken install (missing libnvinfer, ...)
        raise ExportError(f"tensorrt does not import ({first_line(e)}): {TENSORRT_MISSING}") from None
    return trt


def require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise ExportError(f"{what} needs an NVIDIA GPU, and torch.cuda.is_available() is False on this machine")


def _torch_dtype(trt, dtype):
    table = {
        "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
        "int32": torch.int32, "int64": torch.int64, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
    }
    for name, torch_dtype in table.items():
        if hasattr(trt, name) and dtype == getattr(trt, name):
            return torch_dtype
    raise ExportError(f"TensorRT tensor type {dtype} has no torch equivalent here")


def _make_output_allocator(trt):
    """An IOutputAllocator that allocates torch CUDA buffers for outputs whose shape is only known
    while the engine runs (NonZero and friends), and records the final shapes."""

    class TorchOutputAllocator(trt.IOutputAllocator):
        def __init__(self):
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, torch.Tensor] = {}
            self.shapes: dict[str, tuple] = {}

        def reallocate_output(self, tensor_name, memory, size, alignment):
            return self._allocate(tensor_name, size)

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self._allocate(tensor_name, size)

        def _allocate(self, name, size):
            size = max(int(size), 1)
            buf = self.buffers.get(name)
            if buf is None or buf.numel() < size:
                buf = torch.empty(size, dtype=torch.uint8, device="cuda")
                self.buffers[name] = buf
            return buf.data_ptr()

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(int(d) for d in shape)

    return TorchOutputAllocator()


class TensorRTRunner:
    """A deserialized TensorRT engine behind `__call__(*inputs) -> list[torch.Tensor]` (CUDA tensors).

    Input shapes are set on every call (any shape inside the engine's optimization profile);
    outputs are allocated as torch CUDA tensors, through an IOutputAllocator for outputs whose
    shape depends on the data; the engine runs with execute_async_v3 on a CUDA stream.
    """

    def __init__(self, path):
        trt = import_tensorrt()
        require_cuda("running a TensorRT engine")
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ExportError(f"no such TensorRT engine: {path}")
        self.trt = trt
        self.path = path
        self.logger = trt.Logger(trt.Logger.WARNING)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(self.logger, "")  # engines may use plugins (ScatterElements)
        self.runtime = trt.Runtime(self.logger)
        with open(path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise ExportError(f"TensorRT could not load {path}: built by another TensorRT version or for another GPU? "
                              "Rebuild it with `dittofx build-engine`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._allocator = _make_output_allocator(trt)
        self._allocated_outputs: set[str] = set()
        self.stream = torch.cuda.Stream()

    def __call__(self, *inputs, **named) -> list[torch.Tensor]:
        values = order_inputs(self.input_names, inputs, named, os.path.basename(self.path), ExportError)
        keep = []  # keep the input tensors alive until the engine has run
        for name, value in zip(self.input_names, values):
            t = torch.as_tensor(value)
            t = t.to(device="cuda", dtype=self._dtypes[name]).contiguous()
            keep.append(t)
            if self.engine.is_shape_inference_io(name):
                raise ExportError(f"input {name!r} is a shape tensor; TensorRTRunner takes data inputs only")
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ExportError(f"input {name!r} of shape {tuple(t.shape)} is outside the engine's "
                                  "optimization profile")
            self.context.set_tensor_address(name, t.data_ptr())

        outputs: dict[str, torch.Tensor | None] = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):  # known only while running: let TensorRT ask for memory
                if name not in self._allocated_outputs:
                    self.context.set_output_allocator(name, self._allocator)
                    self._allocated_outputs.add(name)
                outputs[name] = None
                continue
            out = torch.empty(shape, dtype=self._dtypes[name], device="cuda")
            outputs[name] = out
            self.context.set_tensor_address(name, out.data_ptr())

        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ExportError("TensorRT failed to run the engine (see the TensorRT log above)")
        self.stream.synchronize()

        result = []
        for name in self.output_names:
            out = outputs[name]
            if out is None:
                shape = self._allocator.shapes[name]
                dtype = self._dtypes[name]
                numel = int(np.prod(shape)) if shape else 1
                nbytes = numel * torch.empty((), dtype=dtype).element_size()
                out = self._allocator.buffers[name][:nbytes].view(dtype).reshape(shape).clone()
            result.append(out)
        return result

    def __repr__(self) -> str:
        return f"TensorRTRunner({self.path!r}, inputs={self.input_names}, outputs={self.output_names})"

