"""Run exported models with one call convention: `runner(*inputs) -> list[torch.Tensor]`.

    runner = OnnxRuntimeRunner("model.onnx")        # onnxruntime, CPU (or CUDA when installed)
    runner = TensorRTRunner("model.plan")           # a TensorRT engine, on the GPU
    logits, = runner(x)

Inputs are torch tensors or numpy arrays, in the order of `runner.input_names` (the flattened
inputs of the exported module), or by name as keyword arguments. Outputs come back as torch
tensors in the order of `runner.output_names`: on the CPU from onnxruntime, on the GPU from
TensorRT.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dittofx.errors import ExportError, first_line

TENSORRT_MISSING = "tensorrt is not installed: pip install 'dittofx[tensorrt]' (needs an NVIDIA GPU)"

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _order_inputs(names: list[str], inputs: tuple, named: dict, who: str) -> list:
    if named:
        unknown = set(named) - set(names)
        if unknown:
            raise ExportError(f"{who} has no input(s) {sorted(unknown)}; its inputs are {names}")
    values = list(inputs)
    if len(values) > len(names):
        raise ExportError(f"{who} takes {len(names)} input(s) ({', '.join(names)}), got {len(values)}")
    for name in names[len(values):]:
        if name not in named:
            raise ExportError(f"{who} is missing input {name!r}; its inputs are {names}")
        values.append(named[name])
    return values


class OnnxRuntimeRunner:
    """An onnxruntime session behind `__call__(*inputs) -> list[torch.Tensor]`.

    providers: onnxruntime execution providers; default CUDA (when onnxruntime-gpu is installed)
    then CPU. threads: intra-op threads (default: onnxruntime's choice).
    """

    def __init__(self, path, providers: list[str] | None = None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("onnxruntime is not installed: pip install 'dittofx[onnx]'") from None
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ExportError(f"no such ONNX file: {path}")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads is not None:
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(path, so, providers=list(providers))
        except Exception as e:  # noqa: BLE001 - a bad file or provider is the user's input
            raise ExportError(f"onnxruntime cannot load {path}: {first_line(e)}") from None
        self.path = path
        self._inputs = self.session.get_inputs()
        self.input_names = [i.name for i in self._inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs, **named) -> list[torch.Tensor]:
        values = _order_inputs(self.input_names, inputs, named, f"{os.path.basename(self.path)}")
        feed = {}
        for meta, value in zip(self._inputs, values):
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu()
                if value.dtype == torch.bfloat16:
                    value = value.float()
                value = value.numpy()
            value = np.asarray(value)
            want = _ORT_TYPES.get(meta.type)
            if want is not None and value.dtype != want:
                value = value.astype(want)
            feed[meta.name] = value
        outs = self.session.run(None, feed)
        return [torch.from_numpy(np.ascontiguousarray(o)) for o in outs]

    def __repr__(self) -> str:
        return f"OnnxRuntimeRunner({self.path!r}, inputs={self.input_names}, outputs={self.output_names})"


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
            raise ExportError(f"TensorRT could not load {path}: built by another TensorRT version or for another GPU? Rebuild it with `dittofx build-engine`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._allocator = _make_output_allocator(trt)
        self._allocated_outputs: set[str] = set()
        self.stream = torch.cuda.Stream()

    def __call__(self, *inputs, **named) -> list[torch.Tensor]:
        values = _order_inputs(self.input_names, inputs, named, os.path.basename(self.path))
        keep = []  # keep the input tensors alive until the engine has run
        for name, value in zip(self.input_names, values):
            t = torch.as_tensor(value)
            t = t.to(device="cuda", dtype=self._dtypes[name]).contiguous()
            keep.append(t)
            if self.engine.is_shape_inference_io(name):
                raise ExportError(f"input {name!r} is a shape tensor; TensorRTRunner takes data inputs only")
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ExportError(f"input {name!r} of shape {tuple(t.shape)} is outside the engine's optimization profile")
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

