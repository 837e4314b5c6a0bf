"""Export any nn.Module to ONNX with torch's torch.export-based exporter, checked in onnxruntime.

    from dittofx.exporters.onnx import export_onnx
    result = export_onnx(model, "model.onnx", example_inputs=(x,))
    result.max_rel_diff, result.trt_report.ok

What it does, in order:

1. Checks that the output path can be written (ExportError, one line, before any work).
2. Runs the module once on the example (the reference outputs) and flattens inputs and outputs
   (`dittofx.signature`): nested tuples, lists, dicts, dataclasses and transformers ModelOutput /
   diffusers BaseOutput objects become flat lists of tensors with stable names (`x`, `logits`,
   `hidden_states.0`, `output_0`, ...). Non-tensor inputs (flags, python numbers) are baked into
   the graph.
3. Captures a flat wrapper with torch.export (non-strict), with one dynamic `batch` dim shared by
   every input whose dim 0 is the batch. torch.export specialises a batch of 1, so an example of
   batch 1 is repeated to batch 2 for the capture (the check still uses the user's example). If
   the model fixes its batch (a hard-coded reshape), the export falls back to the example's batch
   with a warning.
4. Translates to ONNX with `torch.onnx.export(exported_program, dynamo=True)`; optionally
   optimizes (onnxscript optimizer + rewriter, then onnxruntime's offline ORT_ENABLE_EXTENDED).
5. Writes into a temporary folder next to the target (`files.py`), compares onnxruntime (CPU) with
   PyTorch on the example, elementwise (`verify.py`; a model with RLT also on the example with
   clips frozen in time, so that dropped tubelets are compared too), runs the TensorRT readiness
   check, and only then renames the file(s) into place. Models over 2 GB are written with external
   data (`NAME.onnx.data` next to it). A mismatch raises ExportError and leaves nothing behind.

Progress and warnings go to `logging.getLogger("dittofx")` (the CLI shows them).

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
import contextvars
import operator
import os
from dataclasses import dataclass

import torch

from dittofx import signature
from dittofx._log import log, stage
from dittofx.errors import ExportError, first_line
from dittofx.exporters.files import check_output_path, staging_folder
from dittofx.exporters.trt_check import TrtReport, check_tensorrt_readiness
from dittofx.exporters.verify import (  # noqa: F401 - compare's old home
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    check_in_onnxruntime,
    check_tolerances,
    compare,
)
from dittofx.rewriter.quiet import quiet_export
from dittofx.runtime import is_stateful

DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 18, 25  # what torch 2.14's exporter emits without version conversion
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps a file at 2 GiB: keep a margin for the graph
OPTIMIZE = (None, "onnxscript", "all")
_STAGE_PREFIX = contextvars.ContextVar("dittofx_onnx_stage_prefix", default="")


@contextlib.contextmanager
def stages_named(prefix: str):
    """Stage titles of the exports inside start with `prefix` (which of several files is being written)."""
    token = _STAGE_PREFIX.set(prefix)
    try:
        yield
    finally:
        _STAGE_PREFIX.reset(token)


def _stage(title: str):
    return stage(_STAGE_PREFIX.get() + title)


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
    optimize: bool | str | None = None,
    check: bool = True,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> OnnxExport:
    """Export `module(*example_inputs, **example_kwargs)` to the ONNX file `path` and check it.

    opset: 18 by default (onnxruntime and TensorRT 10 read it; SDPA becomes MatMul/Softmax). Use
        23-25 for the ONNX `Attention` op (TensorRT 10.15+/11, onnxruntime 1.2x+; see the module
        docstring for onnxruntime's mask-shape restriction).
    dynamic_batch: make dim 0 of every input whose dim 0 equals the example's batch dynamic.
    optimize: None (default), "onnxscript" (onnxscript's optimizer and rewriter: what TensorRT
        reads), or "all" (also onnxruntime's offline optimizer, ORT_ENABLE_EXTENDED: tuned for
        onnxruntime, may contain com.microsoft operators such as FusedMatMul that TensorRT cannot
        parse; the TensorRT report then says so). True means "all".
    check: compare onnxruntime (CPU) with PyTorch on the example; an element beyond
        atol + rtol * |torch| (exporters/verify.py) raises ExportError and writes nothing.

    The module is put in eval mode for the export and restored afterwards. Returns an OnnxExport;
    `trt_report` is the TensorRT readiness report of the written file.
    """
    path = check_output_path(path)
    rtol, atol = check_tolerances(rtol, atol)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported: choose {MIN_OPSET} (default, safe for onnxruntime and "
                          f"TensorRT 10) to {MAX_OPSET} (23+ gives the ONNX Attention op)")
    if isinstance(optimize, bool):
        optimize = "all" if optimize else None
    if optimize not in OPTIMIZE:
        raise ExportError(f"optimize={optimize!r}: accepted None, 'onnxscript' or 'all'")
    _require_onnx()
    if isinstance(module, torch.export.ExportedProgram):
        module = module.module()
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"export_onnx needs a torch.nn.Module, got {type(module).__name__}")
    if is_stateful(module):
        raise ExportError("the model keeps state between calls (PAB caches), which one ONNX model cannot hold: "
                          "export it with dittofx.exporters.onnx_pab.export_pab_onnx (one ONNX per broadcast "
                          "pattern, run by OnnxPABRunner)")
    for m in module.modules():  # a part that says an exported model cannot hold it
        if why := getattr(m, "not_exportable", None):
            raise ExportError(why)
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    args = tuple(args)
    kwargs = dict(example_kwargs or {})

    # Eval mode for the export. The flags are set directly: the GraphModule of
    # torch.export(...).module() refuses train()/eval() calls.
    flipped = [m for m in module.modules() if m.training]
    for m in flipped:
        m.training = False
    try:
        return _export_eval(module, path, args, kwargs, opset=opset, dynamic_batch=dynamic_batch, optimize=optimize,
                            check=check, rtol=rtol, atol=atol)
    finally:
        for m in flipped:
            m.training = True


def _export_eval(module, path, args, kwargs, *, opset, dynamic_batch, optimize, check, rtol, atol) -> OnnxExport:
    in_names = signature.input_names(module, args, kwargs)
    tensors = [t for _, t in signature.tensor_leaves((args, kwargs))]
    with torch.no_grad():
        try:
            reference = module(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the user's model or example is wrong
            raise ExportError(f"the model does not run on the example inputs: {type(e).__name__}: "
                              f"{first_line(e)}") from None
    ref_tensors = [t for _, t in signature.tensor_leaves(reference)]
    if not ref_tensors:
        raise ExportError("the model returns no tensor: nothing to export")
    out_names = signature.output_names(reference, taken=set(in_names))
    flat = signature.FlatModule(module, args, kwargs, reference)
    checks = [("the example", tensors, ref_tensors)] + (_static_clip_checks(module, flat, tensors) if check else [])

    # Capture with a dynamic batch where the example allows it.
    batch_idx = signature.batched(tensors) if dynamic_batch else []
    batch = signature.batch_of(tensors)
    ep, dynamic = None, False
    with _stage("capture"):
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
                why = ("the model fixes it (a hard-coded batch size?)" if "specialized it to be a constant" in str(e)
                       else first_line(e))
                log.warning("the batch cannot be dynamic: %s; exporting with a fixed batch of %s",
                            why, batch)
        if ep is None:
            try:
                ep = _torch_export(flat, tensors, None)
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"torch.export could not capture the model: {type(e).__name__}: "
                                  f"{first_line(e)}") from None

    with staging_folder(path) as tmp_dir:
        tmp_path = os.path.join(tmp_dir, os.path.basename(path))
        with _stage("export ONNX"):
            program = _translate(ep, tensors if not dynamic else None, opset, in_names, out_names)
            if dynamic:
                _rename_batch_axis(program, batch_idx)
            if optimize:
                _optimize_onnxscript(program)
            external = _initializer_bytes(program) > EXTERNAL_DATA_BYTES
            with quiet_export():
                program.save(tmp_path, external_data=external)
            del program
        if optimize == "all":
            with _stage("optimize in onnxruntime"):
                _optimize_onnxruntime(tmp_path, external)

        max_rel = None
        if check:
            with _stage("check in onnxruntime"):
                max_rel = check_in_onnxruntime(tmp_path, in_names, out_names, checks, rtol, atol,
                                               rerun=_rerun(module, flat) if _chooses(ep) else None)
            log.info("  onnxruntime vs PyTorch on %s: max relative difference %.2e (every element within atol %g + "
                     "rtol %g x |torch|)", " and ".join(what for what, _, _ in checks), max_rel, atol, rtol)

        with _stage("TensorRT readiness"):
            report = check_tensorrt_readiness(tmp_path)
        report.path = path
        if not report.ok or report.warnings:
            log.info("%s", "\n".join("  " + line for line in str(report).splitlines()))

        import onnx

        proto = onnx.load(tmp_path, load_external_data=False)
        final_in = [i.name for i in proto.graph.input]
        final_out = [o.name for o in proto.graph.output]
        del proto

        # Everything checked: move the file(s) into place (the data file first).
        external = os.path.exists(tmp_path + ".data")
        if external:
            os.replace(tmp_path + ".data", path + ".data")
        os.replace(tmp_path, path)

    return OnnxExport(
        path=path, opset=opset, max_rel_diff=max_rel, trt_report=report, input_names=final_in,
        output_names=final_out, dynamic_batch=dynamic, external_data=external,
    )


# ops that choose by comparing values (ToMe's matching: max, sort; RLT's kept tubelets: nonzero): the
# check in onnxruntime allows for near ties (verify.check_in_onnxruntime's `rerun`)
_CHOOSING = frozenset(getattr(torch.ops.aten, name).default for name in (
    "sort", "argsort", "topk", "argmax", "argmin", "nonzero")) | {torch.ops.aten.max.dim, torch.ops.aten.min.dim}


def _chooses(ep) -> bool:
    return any(n.op == "call_function" and n.target in _CHOOSING for n in ep.graph.nodes)


@contextlib.contextmanager
def _report_kept(module):
    """The RLT states of `module` as the user's last forward left them (the report shows those), whatever
    the checks run inside; yields them."""
    from dittofx.passes.rlt.ops import RLTState

    states = [m for m in module.modules() if isinstance(m, RLTState)]
    saved = [s.kept_counts for s in states]
    try:
        yield states
    finally:
        for s, kept in zip(states, saved):
            s.kept_counts = kept


def _rerun(module, flat):
    """PyTorch's outputs for other inputs (the near-tie check's perturbations), the report untouched."""
    def rerun(inputs):
        with _report_kept(module):
            return list(flat(*inputs))
    return rerun


def _static_clip_checks(module, flat, tensors) -> list[tuple[str, list, list]]:
    """RLT drops the tubelets that repeat the previous one, which random example clips never do, so the
    example alone leaves the dropping untested: with RLT in the module, a second check input is the
    example with every other clip (the first included) frozen in time, its first frame repeated (clips
    of different lengths: the padded path too). [] without RLT or where freezing drops nothing."""
    with _report_kept(module) as states:
        if not states:
            return []
        frames = {s.grid[0] * s.tubelet[0] for s in states}
        for i, t in enumerate(tensors):
            if t.dim() < 5 or not t.is_floating_point():
                continue
            for d in (d for d in range(1, t.dim()) if t.shape[d] in frames):
                still = t.clone()
                still[::2] = t[::2].narrow(d, 0, 1).expand_as(still[::2])
                inputs = [still if j == i else x for j, x in enumerate(tensors)]
                for s in states:
                    s.kept_counts = None
                try:
                    with torch.no_grad():
                        reference = list(flat(*inputs))
                except Exception:  # noqa: BLE001 - not the video after all: the example's check stands
                    continue
                if any(s.kept is not None and sum(s.kept) < len(s.kept) * s.total for s in states):
                    return [("the example with static clips", inputs, reference)]
        return []


# -- torch.export and translation ------------------------------------------------------------------


def _torch_export(flat, tensors, dynamic_shapes):
    with quiet_export():
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
    with quiet_export(), _retrace_only_if_needed():
        try:
            program = torch.onnx.export(
                ep, tuple(tensors) if tensors is not None else None, dynamo=True, opset_version=opset,
                input_names=in_names, output_names=out_names, verbose=False, optimize=False,
            )
            if program is not None:
                _tidy(program.model)
                program.optimize()  # what optimize=True runs: onnxscript's optimizer and fusions
                _name_folded_constants(program.model.graph)
                _restore_names(program.model.graph, in_names, out_names)
                _drop_stack_traces(program.model.graph)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"torch.onnx could not translate the model to ONNX opset {opset}: {type(e).__name__}: "
                              f"{first_line(e)}") from None
        if program is None:
            raise ExportError("torch.onnx returned no program")
    _where_without_bool(program.model.graph)
    return program


# -- skipping torch.onnx's retrace -----------------------------------------------------------------
#
# torch.onnx retraces every ExportedProgram (`run_decompositions` with the ops ONNX lacks): one more
# pass of the whole graph through fake tensors and symbolic shapes, as slow as the capture itself
# (5 s of a ToMe ViT's 13). A graph that only holds ops ONNX implements, none of them mutating, has
# nothing for it to do, apart from the few composite ops below, which are rewritten here the way
# their decomposition would (`argsort` is ToMe's, `to` a cast). Any other op keeps the retrace.

_ATEN = torch.ops.aten
# the exporter drops these right after the retrace (torch.onnx's `remove_assertion_nodes`)
_ASSERTIONS = frozenset((_ATEN._assert_scalar.default, _ATEN._assert_tensor_metadata.default,
                         _ATEN._assert_async.default, _ATEN._assert_async.msg,
                         _ATEN.sym_constrain_range_for_size.default))
_BITWISE = {_ATEN.__or__.Tensor: _ATEN.bitwise_or.Tensor, _ATEN.__and__.Tensor: _ATEN.bitwise_and.Tensor,
            _ATEN.__xor__.Tensor: _ATEN.bitwise_xor.Tensor}


@contextlib.contextmanager
def _retrace_only_if_needed():
    """Inside, torch.onnx.export skips its decomposition retrace where `_needs_no_retrace` says so;
    else (or where torch moved its internals) it decomposes as always. Only inside quiet_export():
    the patch is torch's module attribute, and EXPORT_LOCK keeps dittofx's exports one at a time."""
    try:
        from torch.onnx._internal.exporter import _decomp, _fx_passes
        full = _fx_passes.decompose_with_registry
    except (ImportError, AttributeError):
        yield
        return

    def decompose(exported_program, registry):
        implemented = set(_decomp.get_onnx_implemented_overloads(registry))
        if _needs_no_retrace(exported_program, implemented):
            return exported_program
        return full(exported_program, registry)

    _fx_passes.decompose_with_registry = decompose
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = full


def _needs_no_retrace(ep, implemented) -> bool:
    """True when every node of `ep` is an ONNX-implemented, functional op (after rewriting the
    composites that `_rewrite_composite` knows in place); False, with `ep` untouched, otherwise."""
    from torch.export.graph_signature import InputKind, OutputKind

    sig = ep.graph_signature
    if any(s.kind != OutputKind.USER_OUTPUT for s in sig.output_specs) or \
            any(s.kind == InputKind.TOKEN for s in sig.input_specs):
        return False  # mutated buffers or inputs, effect tokens: functionalization has work
    gm = ep.graph_module
    if any(m is not gm for m in gm.modules()):
        return False  # control flow or other higher-order ops with subgraphs
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    for node in nodes:
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return False
        if node.target not in implemented and node.target not in _ASSERTIONS and \
                _rewrite_composite(gm.graph, node, dry_run=True) is None:
            return False
    changed = False
    for node in nodes:
        if node.target not in implemented and node.target not in _ASSERTIONS:
            _rewrite_composite(gm.graph, node)
            changed = True
    if changed:
        gm.recompile()
    return True


def _rewrite_composite(graph, node, dry_run=False):
    """Replace a composite op by what it decomposes into; returns the replacement ("" in a dry run)
    or None for an op not handled here."""
    args, kwargs = node.args, node.kwargs
    x = args[0] if args else None
    x_val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if not isinstance(x_val, torch.Tensor):
        return None
    if node.target is _ATEN.argsort.default:  # sort(x, dim, descending)[1]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
        descending = args[2] if len(args) > 2 else kwargs.get("descending", False)
        if dry_run:
            return ""
        with graph.inserting_before(node):
            sort = graph.call_function(_ATEN.sort.default, (x, dim, descending))
            sort.meta = {**node.meta, "val": (x_val, node.meta["val"])}
            out = graph.call_function(operator.getitem, (sort, 1))
    elif node.target in (_ATEN.to.dtype, _ATEN.to.dtype_layout):  # a cast: _to_copy, or x itself
        if node.target is _ATEN.to.dtype:
            dtype = args[1] if len(args) > 1 else kwargs.get("dtype")
            copy = args[3] if len(args) > 3 else kwargs.get("copy", False)
            memory_format = args[4] if len(args) > 4 else kwargs.get("memory_format")
            extra = {}
        else:
            if len(args) > 1:
                return None
            dtype, copy, memory_format = kwargs.get("dtype"), kwargs.get("copy", False), kwargs.get("memory_format")
            extra = {k: kwargs[k] for k in ("layout", "device") if kwargs.get(k) is not None}
        if memory_format not in (None, torch.preserve_format) or not isinstance(dtype, torch.dtype) or \
                extra.get("layout", torch.strided) != x_val.layout or \
                torch.device(extra.get("device", x_val.device)) != x_val.device:
            return None
        if dry_run:
            return ""
        if dtype == x_val.dtype and not copy:
            out = x
        else:
            with graph.inserting_before(node):
                out = graph.call_function(_ATEN._to_copy.default, (x,), {"dtype": dtype, **extra})
    elif node.target in _BITWISE and len(args) == 2 and not kwargs:
        if dry_run:
            return ""
        with graph.inserting_before(node):
            out = graph.call_function(_BITWISE[node.target], args)
    else:
        return None
    if out is not x:
        out.meta = dict(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return out


def _tidy(model) -> None:
    """Fold constants and drop dead and repeated nodes before onnxscript's optimizer: its rewriter
    tries each of its ~50 rules on each node, and a fresh translation is mostly constants, dead
    shape arithmetic and copies (a ToMe ViT: 2228 nodes, 521 after this), so this halves its time.
    The same passes run inside the optimizer; running them first gives the same graph."""
    try:
        import onnx_ir.passes.common as common
        from onnxscript.optimizer import fold_constants_ir
    except ImportError:
        return
    fold_constants_ir(model, onnx_shape_inference=True)
    for tidy in (common.RemoveUnusedNodesPass(),
                 common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                 common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass()):
        tidy(model)


def _restore_names(graph, in_names, out_names) -> None:
    """The input and output names again, after the optimizer: torch names them before it, and where
    an output is an input (a model returning its input), the optimizer's Identity takes the output's
    name and renames the input `<output>_orig`."""
    for values, names in ((graph.inputs, in_names), (graph.outputs, out_names)):
        for value, name in zip(values, names or ()):
            value.name = name


def _drop_stack_traces(graph) -> None:
    """torch.onnx writes each node's Python stack trace into the file: a third of a small model's
    bytes, with this machine's source paths in a file meant for deployment. Scopes and fx names stay."""
    for node in graph.all_nodes():
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)


def _name_folded_constants(graph) -> None:
    """Name the initializers that constant folding made (`val_<counter>`) after their content: the
    counter shifts with any change upstream, and the PAB export stores a weight once per distinct
    name and content across its pattern files, so equal constants must get equal names."""
    import hashlib
    import re

    taken = set(graph.initializers)
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if not re.fullmatch(r"val_\d+", name) or tensor is None or value.is_graph_input() or \
                value.is_graph_output():
            continue
        digest = hashlib.sha1(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.tobytes())
        base = f"const_{digest.hexdigest()[:16]}"
        new, copy = base, 0
        while new in taken:  # equal tensors that deduplication left apart
            copy += 1
            new = f"{base}_{copy}"
        graph.initializers.pop(name)
        value.name = new
        graph.initializers[new] = value
        taken.add(new)


def _where_without_bool(graph) -> None:
    """onnxruntime has no CPU kernel for a Where that selects booleans (a boolean `masked_fill`, as
    HunyuanVideo's attention mask): select uint8 and cast back."""
    import onnx_ir as ir

    for node in list(graph.all_nodes()):
        if node.op_type != "Where" or node.domain not in ("", "ai.onnx") or node.outputs[0].dtype != ir.DataType.BOOL:
            continue
        out = node.outputs[0]
        casts = [ir.node("Cast", [v], {"to": ir.DataType.UINT8}) for v in node.inputs[1:]]
        where = ir.node("Where", [node.inputs[0], *(c.outputs[0] for c in casts)])
        back = ir.node("Cast", where.outputs, {"to": ir.DataType.BOOL})
        back.outputs[0].dtype, back.outputs[0].shape = out.dtype, out.shape
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], [*casts, where, back], [out],
                                                back.outputs)


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

    with quiet_export():
        model = optimizer.optimize(program.model)
        model = rewriter.rewrite(model)
    program.model = model


def _optimize_onnxruntime(path: str, external: bool) -> None:
    """Replace `path` by onnxruntime's offline-optimized version (ORT_ENABLE_EXTENDED)."""
    from dittofx.runtime.onnxruntime import import_onnxruntime

    ort = import_onnxruntime()
    with staging_folder(path) as out_dir:
        out = os.path.join(out_dir, os.path.basename(path))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = out
        so.log_severity_level = 3
        if external:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        os.path.basename(path) + ".data")
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


# -- helpers ---------------------------------------------------------------------------------------


def _require_onnx() -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise ExportError(f"{name} is not installed: pip install 'dittofx[onnx]'") from None
