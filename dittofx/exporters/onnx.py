"""Export any nn.Module to ONNX with torch's torch.export-based exporter, checked in onnxruntime.

    from dittofx.exporters.onnx import export_onnx
    result = export_onnx(model, "model.onnx", example_inputs=(x,))
    result.max_rel_diff, result.trt_report.ok

What it does, in order:

1. Checks that the output path can be written (ExportError, one line, before any work).
2. Runs the module once on the example (the reference outputs) and flattens inputs and outputs:
   nested tuples, lists, dicts, dataclasses and transformers ModelOutput / diffusers BaseOutput
   objects become flat lists of tensors with stable names (`x`, `logits`, `hidden_states.0`,
   `output_0`, ...). Non-tensor inputs (flags, python numbers) are baked into the graph.
3. Captures a flat wrapper with torch.export (non-strict), with one dynamic `batch` dim shared by
   every input whose dim 0 is the batch. torch.export specialises a batch of 1, so an example of
   batch 1 is repeated to batch 2 for the capture (the check still uses the user's example). If
   the model fixes its batch (a hard-coded reshape), the export falls back to the example's batch
   with a warning.
4. Translates to ONNX with `torch.onnx.export(exported_program, dynamo=True)`; optionally
   optimizes (onnxscript optimizer + rewriter, then onnxruntime's offline ORT_ENABLE_EXTENDED).
5. Writes into a temporary folder next to the target, compares onnxruntime (CPU) with PyTorch on
   the example, runs the TensorRT readiness check, and only then renames the file(s) into place.
   Models over 2 GB are written with external data (`NAME.onnx.data` next to it). A mismatch
   raises ExportError and leaves nothing behind.

The check: for each output, max|onnx - torch| / max|torch| (the "max relative difference"); an
output passes when max|onnx - torch| <= atol + rtol * max|torch|. The worst output's relative
difference is returned as `max_rel_diff`.

Opsets (measured with torch 2.14.1, onnxscript 0.7, onnxruntime 1.32 CPU): the exporter emits
opsets 18 to 25 (lower asks are converted by onnx's version converter, 26 fails). At 18-22,
`aten.scaled_dot_product_attention` becomes MatMul / Mul / Softmax (plus Add for a mask); from 23
it becomes one ONNX `Attention` node. Both match PyTorch in onnxruntime to ~3e-7, except that
onnxruntime's CPU Attention kernel rejects a mask whose query axis is broadcast (shape
(B, 1, 1, N), the shape of ToMe's proportional-attention bias): it needs (.., N_q, N_k).
The default, 18, is the safe choice: onnxruntime and every TensorRT 10 read it. Pick 23-25 to get
the fused `Attention` op (TensorRT 10.15+ and 11 read it, TensorRT 10.0-10.14 do not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from dittofx import progress
from dittofx.errors import ExportError, first_line
from dittofx.exporters.trt_check import TrtReport, check_tensorrt_readiness

DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 18, 25  # what torch 2.14's exporter emits without version conversion
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps a file at 2 GiB: keep a margin for the graph


@dataclass
class OnnxExport:
    path: str
    opset: int
    max_rel_diff: float | None  # None when check=False
    trt_report: TrtReport
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool = False
    external_data: bool = False

    def __str__(self) -> str:
        batch = "dynamic batch" if self.dynamic_batch else "fixed batch"
        diff = "not checked" if self.max_rel_diff is None else f"max relative difference {self.max_rel_diff:.2e}"
        trt = "ready" if self.trt_report.ok else f"{len(self.trt_report.errors)} error(s)"
        return (
            f"{self.path} (opset {self.opset}, {batch}; inputs {', '.join(self.input_names)}; "
            f"outputs {', '.join(self.output_names)}): onnxruntime vs PyTorch {diff}; TensorRT: {trt}"
        )


def export_onnx(
    module,
    path,
    example_inputs=(),
    example_kwargs=None,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    optimize: bool = False,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> OnnxExport:
    """Export `module(*example_inputs, **example_kwargs)` to the ONNX file `path` and check it.

    opset: 18 by default (onnxruntime and TensorRT 10 read it; SDPA becomes MatMul/Softmax). Use
        23-25 for the ONNX `Attention` op (TensorRT 10.15+/11, onnxruntime 1.2x+; see the module
        docstring for onnxruntime's mask-shape restriction).
    dynamic_batch: make dim 0 of every input whose dim 0 equals the example's batch dynamic.
    optimize: run onnxscript's optimizer and rewriter, then onnxruntime's offline optimizer
        (ORT_ENABLE_EXTENDED). The result is tuned for onnxruntime and may contain com.microsoft
        operators (FusedMatMul, SkipLayerNormalization) that TensorRT cannot parse: the TensorRT
        report then says so. For TensorRT use export_tensorrt(optimize=True), which stops after
        onnxscript.
    check: compare onnxruntime (CPU) with PyTorch on the example; beyond rtol/atol (see the
        module docstring) raise ExportError and write nothing.

    The module is put in eval mode for the export and restored afterwards. Returns an OnnxExport;
    `trt_report` is the TensorRT readiness report of the written file.
    """
    return _export(
        module, path, example_inputs, example_kwargs, opset=opset, dynamic_batch=dynamic_batch,
        optimize="all" if optimize else None, check=check, rtol=rtol, atol=atol,
    )


def _export(module, path, example_inputs, example_kwargs, *, opset, dynamic_batch, optimize, check, rtol, atol) -> OnnxExport:
    path = check_output_path(path)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported: choose {MIN_OPSET} (default, safe for onnxruntime and TensorRT 10) to {MAX_OPSET} (23+ gives the ONNX Attention op)")
    _require_onnx()
    if isinstance(module, torch.export.ExportedProgram):
        module = module.module()
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"export_onnx needs a torch.nn.Module, got {type(module).__name__}")
    from dittofx.runtime_pab import PyramidBroadcast

    if any(isinstance(m, PyramidBroadcast) for m in module.modules()):
        raise ExportError("the model has PAB caches, which live between calls and one ONNX model cannot hold: "
                          "export it with dittofx.exporters.onnx_pab.export_pab_onnx (one ONNX per broadcast "
                          "pattern, run by OnnxPABRunner)")
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    args = tuple(args)
    kwargs = dict(example_kwargs or {})

    # Eval mode for the export. The flags are set directly: the GraphModule of
    # torch.export(...).module() refuses train()/eval() calls.
    flipped = [m for m in module.modules() if m.training]
    for m in flipped:
        m.training = False
    try:
        return _export_eval(module, path, args, kwargs, opset=opset, dynamic_batch=dynamic_batch, optimize=optimize, check=check, rtol=rtol, atol=atol)
    finally:
        for m in flipped:
            m.training = True


def _export_eval(module, path, args, kwargs, *, opset, dynamic_batch, optimize, check, rtol, atol) -> OnnxExport:
    # Inputs: every tensor leaf of (args, kwargs) with a stable name.
    in_leaves = _input_leaves(module, args, kwargs)
    in_names = _unique([name for name, _ in in_leaves])
    in_paths = [p for p, _ in _leaves_with_paths((args, kwargs))]
    tensors = [t for _, t in in_leaves]

    with torch.no_grad():
        try:
            reference = module(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the user's model or example is wrong
            raise ExportError(f"the model does not run on the example inputs: {type(e).__name__}: {first_line(e)}") from None
    out_leaves = _output_leaves(reference)
    if not out_leaves:
        raise ExportError("the model returns no tensor: nothing to export")
    out_names = _unique([n for n, _ in out_leaves], taken=set(in_names))
    ref_tensors = [t for _, t in out_leaves]
    out_paths = [p for p, _ in _leaves_with_paths(reference)]

    flat = _FlatModule(module, args, kwargs, in_paths, out_paths)

    # Capture with a dynamic batch where the example allows it.
    batch_idx, batch = _batch_inputs(tensors) if dynamic_batch else ([], None)
    ep, dynamic = None, False
    with progress.stage("capture"):
        if batch_idx:
            export_tensors = list(tensors)
            if batch == 1:  # torch.export specialises a batch of 1: capture at 2
                for i in batch_idx:
                    export_tensors[i] = torch.cat([tensors[i], tensors[i]], dim=0)
            dim = torch.export.Dim("batch")
            shapes = (tuple({0: dim} if i in batch_idx else None for i in range(len(tensors))),)
            try:
                ep = _torch_export(flat, export_tensors, shapes)
                dynamic = True
            except Exception as e:  # noqa: BLE001 - fall back to the example's batch
                why = "the model fixes it (a hard-coded batch size?)" if "specialized it to be a constant" in str(e) else first_line(e)
                progress.warn(f"the batch cannot be dynamic: {why}; exporting with a fixed batch of {batch}")
        if ep is None:
            try:
                ep = _torch_export(flat, tensors, None)
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"torch.export could not capture the model: {type(e).__name__}: {first_line(e)}") from None

    target_dir = os.path.dirname(path)
    base = os.path.basename(path)
    tmp_dir = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=target_dir)
    try:
        tmp_path = os.path.join(tmp_dir, base)
        with progress.stage("export ONNX"):
            program = _translate(ep, tensors if not dynamic else None, opset, in_names, out_names)
            if dynamic:
                _rename_batch_axis(program, batch_idx)
            if optimize:
                _optimize_onnxscript(program)
            external = _initializer_bytes(program) > EXTERNAL_DATA_BYTES
            with _quiet_torch():
                program.save(tmp_path, external_data=external)
            del program
        if optimize == "all":
            with progress.stage("optimize in onnxruntime"):
                _optimize_onnxruntime(tmp_path, external)

        max_rel = None
        if check:
            with progress.stage("check in onnxruntime"):
                max_rel = _check_in_onnxruntime(tmp_path, in_names, tensors, out_names, ref_tensors, rtol, atol)
            _say(f"  onnxruntime vs PyTorch: max relative difference {max_rel:.2e} (rtol {rtol:g})")

        with progress.stage("TensorRT readiness"):
            report = check_tensorrt_readiness(tmp_path)
        report.path = path
        if not report.ok or report.warnings:
            _say(_indent(str(report)))

        import onnx

        proto = onnx.load(tmp_path, load_external_data=False)
        final_in = [i.name for i in proto.graph.input]
        final_out = [o.name for o in proto.graph.output]
        del proto

        # Everything checked: move the file(s) into place (the data file first).
        data_tmp = tmp_path + ".data"
        external = os.path.exists(data_tmp)
        if external:
            os.replace(data_tmp, path + ".data")
        os.replace(tmp_path, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    return OnnxExport(
        path=path, opset=opset, max_rel_diff=max_rel, trt_report=report, input_names=final_in,
        output_names=final_out, dynamic_batch=dynamic, external_data=external,
    )


# -- output path -----------------------------------------------------------------------------------


def check_output_path(path) -> str:
    """Return the absolute path if a file can be written there, else raise ExportError (one line)."""
    try:
        path = os.path.abspath(os.fspath(path))
    except TypeError:
        raise ExportError(f"not a file path: {path!r}") from None
    if os.path.isdir(path):
        raise ExportError(f"output path {path} is a directory: give a file name, e.g. {os.path.join(path, 'model.onnx')}")
    parent = os.path.dirname(path)
    if not os.path.exists(parent):
        raise ExportError(f"output directory {parent} does not exist")
    if not os.path.isdir(parent):
        raise ExportError(f"cannot write {path}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dittofx-write-test-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ExportError(f"cannot write to {parent}: {e.strerror or e}") from None
    return path


# -- flattening ------------------------------------------------------------------------------------


def _leaves_with_paths(obj, path=()):
    """(path, tensor) for every tensor leaf, in a deterministic order. A path is a tuple of keys
    (str for mappings and dataclass fields, int for sequences)."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):  # dict, OrderedDict, ModelOutput, BaseOutput
        for k, v in obj.items():
            yield from _leaves_with_paths(v, path + (str(k) if not isinstance(k, int) else k,))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _leaves_with_paths(getattr(obj, f.name), path + (f.name,))
    elif isinstance(obj, (tuple, list)):
        fields = getattr(obj, "_fields", None)  # namedtuple
        for i, v in enumerate(obj):
            yield from _leaves_with_paths(v, path + ((fields[i] if fields else i),))


def _get(obj, path):
    for key in path:
        if isinstance(obj, Mapping):
            obj = obj[key]
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            obj = getattr(obj, key)
        elif isinstance(key, str):  # namedtuple field
            obj = getattr(obj, key)
        else:
            obj = obj[key]
    return obj


def _replace(obj, values: dict, path=()):
    """Rebuild `obj` with the leaves at the given paths replaced."""
    if path in values:
        return values[path]
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        items = {k: _replace(v, values, path + (str(k) if not isinstance(k, int) else k,)) for k, v in obj.items()}
        try:
            return type(obj)(items)
        except Exception:  # noqa: BLE001 - a mapping type that cannot be built from a dict
            return items
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _replace(getattr(obj, f.name), values, path + (f.name,)) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, (tuple, list)):
        fields = getattr(obj, "_fields", None)
        items = [_replace(v, values, path + ((fields[i] if fields else i),)) for i, v in enumerate(obj)]
        if fields:
            return type(obj)(*items)
        return type(obj)(items) if isinstance(obj, list) else tuple(items)
    return obj


def _path_name(path, top="output") -> str:
    if not path:
        return top
    parts = [str(p) for p in path]
    if isinstance(path[0], int):
        parts[0] = f"{top}_{path[0]}"
    return ".".join(parts)


def _output_leaves(outputs):
    return [(_path_name(p), t) for p, t in _leaves_with_paths(outputs)]


def _input_leaves(module, args, kwargs):
    """(name, tensor) for every tensor input, named after the forward's parameters: `x`,
    `encoder_hidden_states`, `added_cond_kwargs.resolution`; `input_0` where no name is known."""
    positional, var_positional = _forward_parameters(module)
    out = []
    for p, t in _leaves_with_paths((args, kwargs)):
        if p[0] == 0:
            i = p[1]
            if i < len(positional):
                base = positional[i]
            elif var_positional and var_positional != "args":
                base = f"{var_positional}_{i - len(positional)}"
            else:
                base = f"input_{i}"
        else:
            base = str(p[1])
        out.append((_path_name(p[2:], base) if len(p) > 2 else base, t))
    return out


# Attributes under which wrappers keep the module they forward to (dittofx's OptimizedModule,
# torch.compile's OptimizedModule, DataParallel-style wrappers).
_WRAPPED_ATTRS = ("original", "_orig_mod", "module", "model")


def _forward_parameters(module, depth: int = 0):
    """(names of the positional parameters of forward, name of its *args or None). A wrapper whose
    forward is (*args, **kwargs) is looked through to the module it wraps."""
    positional, var_positional = [], None
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return positional, var_positional
    for p in params:
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            positional.append(p.name)
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            var_positional = p.name
    if not positional and var_positional and depth < 4:
        for attr in _WRAPPED_ATTRS:
            try:
                inner = getattr(module, attr, None)
            except Exception:  # noqa: BLE001 - a property that raises
                inner = None
            if isinstance(inner, torch.nn.Module) and inner is not module:
                return _forward_parameters(inner, depth + 1)
    return positional, var_positional


def _unique(names, taken=()):
    seen = set(taken)
    out = []
    for n in names:
        cand, i = n, 1
        while cand in seen:
            cand = f"{n}_{i}"
            i += 1
        seen.add(cand)
        out.append(cand)
    return out


class _FlatModule(torch.nn.Module):
    """forward(*tensors) -> tuple of tensors: the user's module between flat inputs and outputs."""

    def __init__(self, module, args, kwargs, in_paths, out_paths):
        super().__init__()
        self.inner = module
        self._template = (args, kwargs)
        self._in_paths = list(in_paths)
        self._out_paths = list(out_paths)

    def forward(self, *tensors):
        args, kwargs = _replace(self._template, dict(zip(self._in_paths, tensors)))
        out = self.inner(*args, **kwargs)
        return tuple(_get(out, p) for p in self._out_paths)


def _batch_inputs(tensors):
    """Indices of the inputs whose dim 0 is the batch (the first tensor's dim 0), and the batch."""
    first = next((t for t in tensors if t.dim() >= 1), None)
    if first is None:
        return [], None
    batch = int(first.shape[0])
    return [i for i, t in enumerate(tensors) if t.dim() >= 1 and int(t.shape[0]) == batch], batch


# -- torch.export and translation ------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_torch():
    """Silence torch.onnx / torch.export chatter (warnings, logging, prints) for the block."""
    names = ["torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "onnxscript", "torch._dynamo"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    out = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out):
            warnings.simplefilter("ignore")
            yield out
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torch_export(flat, tensors, dynamic_shapes):
    with _quiet_torch():
        ep = torch.export.export(flat, tuple(tensors), dynamic_shapes=dynamic_shapes, strict=False)
    _drop_noop_squeezes(ep.graph_module)
    return ep


def _drop_noop_squeezes(gm) -> None:
    """`squeeze(x, d)` of a dim that is not 1 does nothing in torch, but ONNX's Squeeze rejects it
    (diffusers' PixArt has one): remove those before translating."""
    squeezes = (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims)
    for node in list(gm.graph.nodes):
        if node.target not in squeezes or not isinstance(node.args[0].meta.get("val"), torch.Tensor):
            continue
        shape = node.args[0].meta["val"].shape
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        if all(not (isinstance(shape[d], int) and shape[d] == 1) for d in dims) and \
                all(isinstance(shape[d], int) for d in dims):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()


def _translate(ep, tensors, opset, in_names, out_names):
    with _quiet_torch():
        try:
            program = torch.onnx.export(
                ep, tuple(tensors) if tensors is not None else None, dynamo=True, opset_version=opset,
                input_names=in_names, output_names=out_names, verbose=False, optimize=True,
            )
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"torch.onnx could not translate the model to ONNX opset {opset}: {type(e).__name__}: {first_line(e)}") from None
    if program is None:
        raise ExportError("torch.onnx returned no program")
    return program


def _rename_batch_axis(program, batch_idx) -> None:
    """Name the dynamic batch dim `batch` (torch.export calls it s0, s67, ...)."""
    inputs = list(program.model.graph.inputs)
    for i in batch_idx:
        if i < len(inputs) and inputs[i].shape is not None and len(inputs[i].shape) > 0:
            dim = inputs[i].shape[0]
            if not isinstance(dim, int) and getattr(dim, "value", None) not in (None, "batch"):
                with contextlib.suppress(Exception):
                    program.rename_axes({dim.value: "batch"})
                return


def _initializer_bytes(program) -> int:
    total = 0
    for v in program.model.graph.initializers.values():
        cv = v.const_value
        if cv is not None:
            total += int(getattr(cv, "nbytes", 0) or 0)
    return total


def _optimize_onnxscript(program) -> None:
    from onnxscript import optimizer, rewriter

    with _quiet_torch():
        model = optimizer.optimize(program.model)
        model = rewriter.rewrite(model)
    program.model = model


def _optimize_onnxruntime(path: str, external: bool) -> None:
    """Replace `path` by onnxruntime's offline-optimized version (ORT_ENABLE_EXTENDED)."""
    import onnxruntime as ort

    out_dir = tempfile.mkdtemp(prefix=".ort.", dir=os.path.dirname(path))
    try:
        out = os.path.join(out_dir, os.path.basename(path))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = out
        so.log_severity_level = 3
        if external:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", os.path.basename(path) + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnxruntime could not optimize the model: {first_line(e)}") from None
        if os.path.exists(path + ".data"):
            os.remove(path + ".data")
        if os.path.exists(out + ".data"):
            os.replace(out + ".data", path + ".data")
        os.replace(out, path)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


# -- the onnxruntime check -------------------------------------------------------------------------


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def compare(got: np.ndarray, ref) -> tuple[float, float, float]:
    """(max relative difference, max |got - ref|, max |ref|): relative = max|a-b| / max|b|."""
    a = np.asarray(got)
    b = _to_numpy(ref) if isinstance(ref, torch.Tensor) else np.asarray(ref)
    if a.shape != b.shape:
        return math.inf, math.inf, math.nan
    if a.size == 0:
        return 0.0, 0.0, 0.0
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if (nan_a != nan_b).any():
        return math.inf, math.inf, math.nan
    same_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    diff = np.where(nan_a | same_inf, 0.0, np.abs(a - b))
    finite_b = np.where(np.isfinite(b), np.abs(b), 0.0)
    max_diff = float(diff.max())
    scale = float(finite_b.max())
    if max_diff == 0:
        return 0.0, 0.0, scale
    rel = max_diff / scale if scale > 0 else math.inf
    return rel, max_diff, scale


def _check_in_onnxruntime(path, in_names, tensors, out_names, ref_tensors, rtol, atol) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # failures come back as one ExportError line, not as onnxruntime's log
    try:
        session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"onnxruntime cannot load the exported model: {first_line(e)}; the ONNX file was not written") from None
    wanted = {i.name for i in session.get_inputs()}
    feed = {n: _to_numpy(t) for n, t in zip(in_names, tensors) if n in wanted}
    missing = wanted - set(feed)
    if missing:
        raise ExportError(f"the exported model wants inputs {sorted(missing)} that the example does not give")
    names = [o.name for o in session.get_outputs()]
    try:
        outs = session.run(None, feed)
    except Exception as e:  # noqa: BLE001
        msg = _ort_message(e)
        hint = ""
        if "Attention" in str(e) and "attn_mask" in str(e):
            hint = " (onnxruntime's CPU Attention op, opset 23+, needs a mask spanning the full query length: export with opset 18)"
        raise ExportError(f"onnxruntime failed to run the exported model: {msg}{hint}; the ONNX file was not written") from None
    got = dict(zip(names, outs))
    worst = 0.0
    for name, ref in zip(out_names, ref_tensors):
        if name not in got:
            raise ExportError(f"the exported model has no output {name!r} (it has {names})")
        a = got[name]
        if tuple(a.shape) != tuple(ref.shape):
            raise ExportError(f"output {name!r} has shape {tuple(a.shape)} in onnxruntime but {tuple(ref.shape)} in PyTorch; the ONNX file was not written")
        rel, max_diff, scale = compare(a, ref)
        worst = max(worst, rel)
        if not max_diff <= atol + rtol * (scale if math.isfinite(scale) else 0.0):
            raise ExportError(
                f"onnxruntime differs from PyTorch on output {name!r}: max relative difference {rel:.3g} "
                f"(max |onnx - torch| {max_diff:.3g}, max |torch| {scale:.3g}) is beyond rtol {rtol:g}; the ONNX file was not written"
            )
    return worst


# -- helpers ---------------------------------------------------------------------------------------


def _require_onnx() -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise ExportError(f"{name} is not installed: pip install 'dittofx[onnx]'") from None


def _say(text: str) -> None:
    """Progress text on stderr (not when quiet), as is: no wrapping, no rich markup."""
    if not progress.is_quiet():
        progress.console().print(text, soft_wrap=True, markup=False, highlight=False)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _ort_message(e: BaseException) -> str:
    """onnxruntime's error without its C++ location and signature: the node and the failed check."""
    text = " ".join(str(e).split())
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    if "Status Message:" in text:
        text = text.split("Status Message:", 1)[1].strip()
        loc = re.match(r"\S+\.(?:h|cc|cpp):\d+ ", text)  # "file.h:70 Status f(signature) the check"
        start = text.find("(") if loc else -1
        if start >= 0:
            depth = 0
            for i in range(start, len(text)):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                if depth == 0:
                    text = text[i + 1 :]
                    break
    text = text.strip()[:300]
    return f"{node.group(1)} node {node.group(2)!r}: {text}" if node else text

