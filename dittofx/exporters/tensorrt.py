"""Build a TensorRT engine from an ONNX file (or straight from a module, through export_onnx).

    build_engine("model.onnx", "model.plan", fp16=True, batch=(1, 8, 32))
    export_tensorrt(model, "model.plan", (x,), fp16=True)

TensorRT 10 and 11 differ in how precision is chosen:

- TensorRT 10 has the weak-typing builder flags: fp16/bf16 set BuilderFlag.FP16 / BF16 and
  TensorRT picks per layer.
- TensorRT 11 removed them (networks are strongly typed: each tensor runs in the type the ONNX
  gives it). fp16=True then converts the ONNX to float16 first (onnxruntime's float16 converter,
  inputs and outputs kept float32) and builds that. bf16=True is refused with what to do instead.

Which one is installed is read from `trt.__version__` (major) and `hasattr(trt.BuilderFlag, "FP16")`.

Dynamic dims get one optimization profile: the batch dim (dim 0, named `batch` by export_onnx)
from `batch=(min, opt, max)`, any other dynamic dim (a token count, ...) from `shapes`, a dict
input name -> (min_shape, opt_shape, max_shape), which also overrides `batch` for that input.

This module is written against the documented TensorRT Python API (10.x and 11.x); it is tested
where tensorrt imports and a GPU is present, and skipped elsewhere.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from dittofx._log import log, stage
from dittofx.errors import ExportError
from dittofx.exporters.files import check_output_path, staging_folder
from dittofx.exporters.onnx import DEFAULT_OPSET, export_onnx
from dittofx.exporters.trt_check import TrtReport, check_tensorrt_readiness
from dittofx.exporters.verify import DEFAULT_ATOL, DEFAULT_RTOL, check_tolerances
from dittofx.runtime.tensorrt import import_tensorrt, require_cuda

# Ops kept in float32 when converting an ONNX to float16 for a strongly typed TensorRT 11 build.
FP16_KEEP_FP32_OPS = ["Range", "RandomUniformLike", "RandomNormalLike", "RandomUniform", "RandomNormal"]


@dataclass
class EngineBuild:
    path: str
    trt_version: str
    precision: str  # "fp32", "fp16", "bf16"
    strongly_typed: bool
    profile: dict = field(default_factory=dict)  # input name -> (min, opt, max) shapes
    build_seconds: float = 0.0
    timing_cache: str | None = None
    trt_report: TrtReport | None = None
    onnx: object | None = None  # the OnnxExport, when built by export_tensorrt (its file is gone)

    def __str__(self) -> str:
        return f"{self.path} (TensorRT {self.trt_version}, {self.precision}, built in {self.build_seconds:.1f}s)"


def trt_capabilities(trt) -> dict:
    """{'major': int, 'version': str, 'weak_typing': bool}: weak typing = the FP16/BF16 builder flags."""
    version = str(getattr(trt, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    weak = hasattr(trt, "BuilderFlag") and hasattr(trt.BuilderFlag, "FP16") and major < 11
    return {"major": major, "version": version, "weak_typing": weak}


def parse_range(text: str, what: str = "--batch") -> tuple[int, int, int]:
    """'1:4:8' -> (1, 4, 8); '4' -> (4, 4, 4)."""
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        raise ExportError(f"{what} {text!r} is not MIN:OPT:MAX (three integers, e.g. 1:4:16)") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or not (1 <= parts[0] <= parts[1] <= parts[2]):
        raise ExportError(f"{what} {text!r} must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
    return tuple(parts)


def build_engine(
    onnx_path,
    engine_path,
    *,
    fp16: bool = False,
    bf16: bool = False,
    batch: tuple[int, int, int] | None = (1, 1, 8),
    shapes: dict | None = None,
    timing_cache=None,
    workspace_gb: float | None = None,
) -> EngineBuild:
    """Parse `onnx_path` with TensorRT's ONNX parser and write a serialized engine to `engine_path`.

    batch: (min, opt, max) for dim 0 of every input where it is dynamic; None when the ONNX has
        no dynamic batch. shapes: {input name: (min_shape, opt_shape, max_shape)} for inputs with
        other dynamic dims (token counts ...), overriding `batch` for those inputs.
    timing_cache: a file; loaded if it exists, written (atomically) after the build.
    workspace_gb: limit of TensorRT's workspace memory pool.
    The engine is written atomically: nothing is left at `engine_path` when the build fails.
    """
    if fp16 and bf16:
        raise ExportError("choose one of fp16 and bf16")
    onnx_path = os.fspath(onnx_path)
    if not os.path.isfile(onnx_path):
        raise ExportError(f"no such ONNX file: {onnx_path}")
    engine_path = check_output_path(engine_path)
    if timing_cache is not None:
        timing_cache = check_output_path(timing_cache)
    if batch is not None:
        batch = tuple(int(b) for b in batch)
        if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
            raise ExportError(f"batch {batch} must be (min, opt, max) with 1 <= min <= opt <= max")
    trt = import_tensorrt()
    require_cuda("building a TensorRT engine")
    caps = trt_capabilities(trt)
    precision = "fp16" if fp16 else "bf16" if bf16 else "fp32"

    report = check_tensorrt_readiness(onnx_path, trt_version=caps["version"])
    if report.findings:
        log.info("%s", report)

    with staging_folder(engine_path) as work_dir:
        parse_path = onnx_path
        if precision != "fp32" and not caps["weak_typing"]:
            if bf16:
                raise ExportError(
                    f"TensorRT {caps['version']} builds strongly typed networks (no BF16 builder flag): "
                    "the precision must be in the ONNX; export a bfloat16 model (model.to(torch.bfloat16)) "
                    "or convert the ONNX with NVIDIA ModelOpt AutoCast (python -m modelopt.onnx.autocast "
                    "--onnx_path model.onnx --low_precision_type bf16), then build without --bf16"
                )
            with stage("convert ONNX to float16 (strongly typed TensorRT)"):
                parse_path = os.path.join(work_dir, "model_fp16.onnx")
                convert_onnx_to_fp16(onnx_path, parse_path)

        logger = trt.Logger(trt.Logger.WARNING)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(logger, "")  # ScatterElements with a reduction is a plugin
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10/11
        parser = trt.OnnxParser(network, logger)
        with stage("parse ONNX in TensorRT"):
            ok = parser.parse_from_file(parse_path)
        if not ok:
            lines = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
            hint = "" if report.ok else f"; the readiness check found: {'; '.join(str(f) for f in report.errors)}"
            raise ExportError(f"TensorRT's ONNX parser refused {os.path.basename(onnx_path)}:\n  "
                              + "\n  ".join(lines or ["(no error message)"]) + hint)

        config = builder.create_builder_config()
        if workspace_gb is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(float(workspace_gb) * (1 << 30)))
        if precision != "fp32" and caps["weak_typing"]:
            flag = "FP16" if fp16 else "BF16"
            if not hasattr(trt.BuilderFlag, flag):
                raise ExportError(f"TensorRT {caps['version']} has no BuilderFlag.{flag}")
            config.set_flag(getattr(trt.BuilderFlag, flag))

        profile_shapes = _profile_shapes(network, batch, shapes or {})
        if profile_shapes:
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profile_shapes.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)

        cache = None
        if timing_cache is not None:
            data = b""
            if os.path.isfile(timing_cache):
                with open(timing_cache, "rb") as f:
                    data = f.read()
            cache = config.create_timing_cache(data)
            config.set_timing_cache(cache, ignore_mismatch=False)

        start = time.perf_counter()
        with stage(f"build TensorRT engine ({precision})"):
            serialized = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - start
        if serialized is None:
            raise ExportError("TensorRT could not build the engine (see the TensorRT log above)")

        tmp_engine = os.path.join(work_dir, os.path.basename(engine_path))
        with open(tmp_engine, "wb") as f:
            f.write(memoryview(serialized))
        if timing_cache is not None:
            tmp_cache = os.path.join(work_dir, "timing.cache")
            with open(tmp_cache, "wb") as f:
                f.write(memoryview(config.get_timing_cache().serialize()))
            os.replace(tmp_cache, timing_cache)
        os.replace(tmp_engine, engine_path)

    return EngineBuild(
        path=engine_path, trt_version=caps["version"], precision=precision,
        strongly_typed=not caps["weak_typing"], profile=profile_shapes, build_seconds=seconds,
        timing_cache=timing_cache, trt_report=report,
    )


def _profile_shapes(network, batch, shapes: dict) -> dict:
    """{input: (min, opt, max)} for every network input with a dynamic (-1) dim."""
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    unknown = set(shapes) - set(names)
    if unknown:
        raise ExportError(f"shapes names unknown input(s) {sorted(unknown)}; the inputs are {names}")
    out = {}
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        dims = tuple(int(d) for d in inp.shape)
        if all(d >= 0 for d in dims):
            continue
        if inp.name in shapes:
            lo, opt, hi = (tuple(int(d) for d in s) for s in shapes[inp.name])
            for s in (lo, opt, hi):
                if len(s) != len(dims) or any(d >= 0 and d != v for d, v in zip(dims, s)):
                    raise ExportError(f"shape {s} for input {inp.name!r} does not fit its dims {dims} (-1 = dynamic)")
            out[inp.name] = (lo, opt, hi)
            continue
        dynamic = [j for j, d in enumerate(dims) if d < 0]
        if dynamic != [0] or batch is None:
            other = [j for j in dynamic if j != 0 or batch is None]
            raise ExportError(
                f"input {inp.name!r} has dynamic dim(s) {other} (shape {dims}): "
                f"give shapes={{'{inp.name}': (min, opt, max)}}"
                + ("" if batch is not None else " or a batch range")
            )
        out[inp.name] = tuple((b,) + dims[1:] for b in batch)
    return out


def _parser_error(err) -> str:
    parts = []
    node_name = _call(err, "node_name")
    op = _call(err, "node_operator")
    node = _call(err, "node")
    if node_name or op:
        parts.append(f"node {node_name!r} ({op})" if node_name else f"{op}")
    elif node is not None and node >= 0:
        parts.append(f"node #{node}")
    desc = _call(err, "desc") or str(err)
    parts.append(" ".join(str(desc).split()))
    return ": ".join(parts)


def _call(obj, name):
    fn = getattr(obj, name, None)
    if fn is None:
        return None
    try:
        return fn() if callable(fn) else fn
    except Exception:  # noqa: BLE001
        return None


def convert_onnx_to_fp16(src, dst) -> str:
    """Write a float16 copy of the ONNX model `src` to `dst` (inputs and outputs stay float32), for
    strongly typed TensorRT builds. Uses onnxruntime's float16 converter."""
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:
        raise ExportError("converting to float16 needs onnxruntime (pip install 'dittofx[onnx]')") from None
    model = onnx.load(os.fspath(src))
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_KEEP_FP32_OPS)
    size = model.ByteSize() if model.ByteSize() < (1 << 31) - 1 else None
    onnx.save(model, os.fspath(dst), save_as_external_data=size is None)
    return os.fspath(dst)


def export_tensorrt(
    module,
    path,
    example_inputs=(),
    example_kwargs=None,
    *,
    opset: int | None = None,
    fp16: bool = False,
    bf16: bool = False,
    batch: tuple[int, int, int] | None = None,
    shapes: dict | None = None,
    timing_cache=None,
    workspace_gb: float | None = None,
    optimize: bool = False,
    check: bool = True,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
):
    """export_onnx to a temporary file (checked in onnxruntime), then build_engine to `path`.

    batch: default (1, B, max(8, B)) with B the example's batch. optimize: onnxscript's optimizer
    only (onnxruntime's offline optimizer writes operators TensorRT cannot parse).
    Returns the EngineBuild, with the OnnxExport (check result, names) as `.onnx`.
    """
    path = check_output_path(path)
    check_tolerances(rtol, atol)
    import_tensorrt()  # fail before the export work when TensorRT cannot be used
    require_cuda("building a TensorRT engine")
    opset = DEFAULT_OPSET if opset is None else opset
    with staging_folder(path) as work_dir:
        onnx_path = os.path.join(work_dir, "model.onnx")
        exported = export_onnx(
            module, onnx_path, example_inputs, example_kwargs, opset=opset, dynamic_batch=True,
            optimize="onnxscript" if optimize else None, check=check, rtol=rtol, atol=atol,
        )
        if batch is None and exported.dynamic_batch:
            b = _example_batch(example_inputs)
            batch = (1, b, max(8, b))
        built = build_engine(
            onnx_path, path, fp16=fp16, bf16=bf16, batch=batch if exported.dynamic_batch else None,
            shapes=shapes, timing_cache=timing_cache, workspace_gb=workspace_gb,
        )
    built.onnx = exported
    return built


def _example_batch(example_inputs) -> int:
    import torch

    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() >= 1:
            return int(a.shape[0])
    return 1
