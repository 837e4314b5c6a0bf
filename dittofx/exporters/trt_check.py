"""Will TensorRT's ONNX parser take this model? A static check that needs neither TensorRT nor a GPU.

    report = check_tensorrt_readiness("model.onnx")
    print(report)          # one line per finding
    report.ok              # False when something will make the parser or the build fail

What is checked, and where the limits come from:

- The opset. TensorRT's parser reads opsets 9 to N, N depending on the release:
  TensorRT 10.0 / 10.1 GA: opset 9..20 ("TensorRT 10.0 supports operators in the inclusive range of
  opset 9 to opset 20", onnx-tensorrt docs/operators.md, 10.1-GA branch);
  TensorRT 10.15: opset 9..24 (same file, 10.15 revision);
  TensorRT 11.x: up to opset 25 (NVIDIA TensorRT docs, "ONNX Opset Guide", TensorRT 11.x table).
  Releases between 10.1 and 10.15 read something in between, so 21..24 is a warning unless the
  installed TensorRT says otherwise, and > 25 is an error.
- Operators: the explicit list below, the "Y" rows of onnx-tensorrt's operator support matrix
  (docs/operators.md, TensorRT 10.15 revision). Operators of other domains (com.microsoft ops
  written by onnxruntime's offline optimizer, custom domains) need a plugin: error.
- TopK: K must be at most 3840 (operators.md: "`K` input must be less than 3840"; DESIGN.md
  measured K <= 3840) and `sorted` must be 1. K is read from an initializer, a Constant node, or a
  small chain of shape arithmetic over shapes known from ONNX shape inference; otherwise warning.
- ScatterElements with a reduction is imported through the "ScatterElements" plugin
  (onnx-tensorrt onnxOpImporters.cpp, scatterPluginHelper): the plugin registry must be
  initialised with trt.init_libnvinfer_plugins before parsing (dittofx.exporters.tensorrt does):
  warning. ScatterND with a reduction is refused by the importer ("Attribute reduction is not
  supported", 10.1 GA; "`reduction` other than `none` is not supported", 10.15): error.
- Data-dependent output shapes (NonZero, NonMaxSuppression, or graph outputs whose size is only
  known at run time): TensorRT supports them, but the runner needs an output allocator
  (dittofx.runtime.TensorRTRunner has one): warning.
- Attention (opset 23+): TensorRT wants Q, K, V and attn_mask 4-D: error otherwise.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from dittofx.errors import ExportError, first_line

# Opset limits (see the module docstring for the sources).
MIN_OPSET = 9
MAX_OPSET_TRT10_0 = 20  # TensorRT 10.0 / 10.1 GA
MAX_OPSET_TRT10_15 = 24  # TensorRT 10.15
MAX_OPSET_TRT11 = 25  # TensorRT 11.x
TOPK_MAX_K = 3840

# The "Y" rows of onnx-tensorrt docs/operators.md (TensorRT 10.15 revision), default ONNX domain.
TRT_SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape
    Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum
    Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
    GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
    ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
    RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
    Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile
    TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

# Operators whose output size depends on the data, not only on the input shapes.
DATA_DEPENDENT_OPS = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress"})

_UNBACKED = re.compile(r"^u\d+$")  # torch.export's name for a data-dependent size


@dataclass
class Finding:
    severity: str  # "error" or "warning"
    op: str
    node: str
    message: str

    def __str__(self) -> str:
        where = f"{self.op} {self.node!r}" if self.node else self.op
        return f"{self.severity}: {where}: {self.message}"


@dataclass
class TrtReport:
    """What check_tensorrt_readiness found; `ok` is False when any finding is an error."""

    path: str | None
    opset: int
    findings: list[Finding] = field(default_factory=list)
    trt_version: str | None = None  # the installed tensorrt, when it could be imported

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def __str__(self) -> str:
        name = os.path.basename(self.path) if self.path else "model"
        against = f"TensorRT {self.trt_version}" if self.trt_version else "TensorRT 10/11"
        if self.ok:
            head = f"{name} (opset {self.opset}): ready for {against}"
        else:
            head = f"{name} (opset {self.opset}): NOT ready for {against}"
        counts = f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        lines = [f"{head}: {counts}"]
        # One line per kind of finding: nodes with the same problem are listed together.
        groups: dict[tuple, list[str]] = {}
        for f in sorted(self.findings, key=lambda f: f.severity != "error"):
            groups.setdefault((f.severity, f.op, f.message), []).append(f.node)
        for (severity, op, message), nodes in groups.items():
            named = [repr(n) for n in nodes if n]
            if len(named) > 3:
                named = named[:3] + [f"and {len(named) - 3} more"]
            where = op if len(nodes) == 1 else f"{op} x{len(nodes)}"
            if named:
                where += f" {named[0]}" if len(nodes) == 1 else f" ({', '.join(named)})"
            lines.append(f"  {severity}: {where}: {message}")
        return "\n".join(lines)


def check_tensorrt_readiness(onnx_path_or_model, trt_version: str | None = "auto") -> TrtReport:
    """Check an ONNX file (path) or an onnx.ModelProto for what TensorRT's ONNX parser refuses.

    `trt_version`: a TensorRT version string ("10.8.0") to check the opset against, None to check
    against TensorRT 10 and 11 in general, or "auto" (default) for the installed tensorrt if it
    imports, else None.
    """
    import onnx

    path = None
    if isinstance(onnx_path_or_model, onnx.ModelProto):
        model = onnx_path_or_model
    else:
        path = os.fspath(onnx_path_or_model)
        if not os.path.isfile(path):
            raise ExportError(f"no such ONNX file: {path}")
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as e:  # noqa: BLE001 - a corrupt file is the user's input
            raise ExportError(f"{path} is not a readable ONNX model: {first_line(e)}") from None
    if trt_version == "auto":
        trt_version = _installed_trt_version()

    opset = _default_opset(model)
    report = TrtReport(path=path, opset=opset, trt_version=trt_version)
    add = report.findings.append

    _check_opset(opset, trt_version, add)

    try:
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    except Exception:  # noqa: BLE001 - checking the un-inlined graph is still useful
        pass
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - no shapes: the checks that need them degrade to warnings
        inferred = model
    consts = _Constants(inferred)

    for node in _all_nodes(inferred.graph):
        _check_node(node, consts, add)
    _check_outputs(inferred.graph, add)
    return report


# -- checks ----------------------------------------------------------------------------------------


def _check_opset(opset: int, trt_version: str | None, add) -> None:
    if opset < MIN_OPSET:
        add(Finding("error", "opset", "", f"opset {opset} is below {MIN_OPSET}, the oldest TensorRT's parser reads"))
        return
    major, minor = _version_tuple(trt_version)
    if major is not None:
        if major >= 11:
            limit, certain = MAX_OPSET_TRT11, True
        elif major == 10 and minor >= 15:
            limit, certain = MAX_OPSET_TRT10_15, True
        elif major == 10 and minor <= 1:
            limit, certain = MAX_OPSET_TRT10_0, True
        elif major == 10:
            limit, certain = MAX_OPSET_TRT10_15, False
        else:
            limit, certain = 17, True  # TensorRT 8.5/8.6 read up to opset 17
        if opset > limit:
            add(Finding("error", "opset", "",
                        f"opset {opset} is beyond TensorRT {trt_version}, which reads up to opset {limit}: "
                        f"export with opset={min(limit, 18)}"))
        elif not certain and opset > MAX_OPSET_TRT10_0:
            add(Finding("warning", "opset", "",
                        f"opset {opset}: TensorRT 10.0 reads up to {MAX_OPSET_TRT10_0}, "
                        f"10.15 up to {MAX_OPSET_TRT10_15}; TensorRT {trt_version} may not read it: opset 18 is safe"))
        return
    if opset > MAX_OPSET_TRT11:
        add(Finding("error", "opset", "",
                    f"opset {opset} is beyond every TensorRT release (TensorRT 11 reads up to {MAX_OPSET_TRT11}): "
                    "export with opset=18"))
    elif opset > MAX_OPSET_TRT10_0:
        add(Finding("warning", "opset", "",
                    f"opset {opset} needs a recent TensorRT (10.0 reads up to {MAX_OPSET_TRT10_0}, "
                    f"10.15 up to {MAX_OPSET_TRT10_15}, 11 up to {MAX_OPSET_TRT11}): "
                    "opset 18 is safe for every TensorRT 10"))


def _check_node(node, consts: _Constants, add) -> None:
    op, name = node.op_type, node.name
    if node.domain not in ("", "ai.onnx"):
        add(Finding("error", f"{node.domain}.{op}", name,
                    f"operator of domain {node.domain!r} is not an ONNX standard operator: "
                    "TensorRT needs a plugin for it "
                    "(was the file optimized for onnxruntime? export without --optimize for TensorRT)"))
        return
    if op not in TRT_SUPPORTED_OPS:
        add(Finding("error", op, name,
                    "not supported by TensorRT's ONNX parser (onnx-tensorrt operator support matrix)"))
        return
    attrs = {a.name: a for a in node.attribute}
    if op == "TopK":
        _check_topk(node, attrs, consts, add)
    elif op == "ScatterElements":
        reduction = _attr_str(attrs.get("reduction"), "none")
        if reduction != "none":
            add(Finding("warning", op, name,
                        f"reduction={reduction!r} is imported through TensorRT's ScatterElements plugin: "
                        "call trt.init_libnvinfer_plugins(logger, '') before parsing (dittofx build-engine does)"))
    elif op == "ScatterND":
        reduction = _attr_str(attrs.get("reduction"), "none")
        if reduction != "none":
            add(Finding("error", op, name,
                        f"reduction={reduction!r} is not supported by TensorRT's ScatterND importer: "
                        "use ScatterElements (torch scatter_add / scatter_reduce over one axis) instead"))
    elif op in DATA_DEPENDENT_OPS:
        add(Finding("warning", op, name,
                    "output shape depends on the data: the TensorRT runner needs an output allocator "
                    "(IOutputAllocator; dittofx.runtime.TensorRTRunner sets one)"))
    elif op == "Attention":
        for i, role in ((0, "Q"), (1, "K"), (2, "V"), (3, "attn_mask")):
            if i < len(node.input) and node.input[i]:
                rank = consts.rank(node.input[i])
                if rank is not None and rank != 4:
                    add(Finding("error", op, name,
                                f"{role} is {rank}-D; TensorRT's Attention importer needs Q, K, V and attn_mask 4-D: "
                                "export at opset 18 (SDPA becomes MatMul/Softmax)"))


def _check_topk(node, attrs, consts: _Constants, add) -> None:
    name = node.name
    if "sorted" in attrs and attrs["sorted"].i == 0:
        add(Finding("error", "TopK", name, "sorted=0 is not supported by TensorRT (needs sorted=1)"))
    if len(node.input) > 1 and node.input[1]:
        k = consts.value(node.input[1])
    elif "k" in attrs:  # opset < 10
        k = np.array(attrs["k"].i)
    else:
        k = None
    if k is None:
        add(Finding("warning", "TopK", name,
                    f"K is computed at run time: TensorRT supports K <= {TOPK_MAX_K} only, make sure it stays below"))
        return
    k = int(np.asarray(k).reshape(-1)[0])
    if k > TOPK_MAX_K:
        add(Finding("error", "TopK", name,
                    f"K={k} is beyond TensorRT's TopK limit of {TOPK_MAX_K} (argsort/sort/topk over {k} elements): "
                    "sort fewer elements, or split the sort"))


def _check_outputs(graph, add) -> None:
    for out in graph.output:
        t = out.type.tensor_type
        if not t.HasField("shape"):
            continue
        for i, d in enumerate(t.shape.dim):
            if d.HasField("dim_param") and _UNBACKED.match(d.dim_param):
                add(Finding("warning", "output", out.name,
                            f"dim {i} ({d.dim_param}) depends on the data: "
                            "the TensorRT runner needs an output allocator (dittofx.runtime.TensorRTRunner sets one)"))
                break


# -- constants and shapes --------------------------------------------------------------------------


class _Constants:
    """Values that are known before running: initializers, Constant nodes, and small shape arithmetic
    (Shape, Gather, Slice, Concat, Reshape, Squeeze, Unsqueeze, Cast, Identity, + - * /) over the
    dims that shape inference knows."""

    _ARITH = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide}

    def __init__(self, model):
        import onnx

        self._onnx = onnx
        g = model.graph
        self.init = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.types = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            self.types[vi.name] = vi.type
        self._cache: dict[str, object] = {}

    def rank(self, name: str) -> int | None:
        t = self.types.get(name)
        if t is not None and t.tensor_type.HasField("shape"):
            return len(t.tensor_type.shape.dim)
        return None

    def dims(self, name: str) -> list | None:
        """The shape of `name` with ints where known and None elsewhere; None if the rank is unknown."""
        if name in self.init:
            return list(self.init[name].dims)
        t = self.types.get(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]

    def value(self, name: str, depth: int = 0):
        if name in self._cache:
            return self._cache[name]
        v = self._value(name, depth)
        self._cache[name] = v
        return v

    def _value(self, name: str, depth: int):
        numpy_helper = self._onnx.numpy_helper
        if name in self.init:
            init = self.init[name]
            if init.data_location == self._onnx.TensorProto.EXTERNAL:
                return None
            return numpy_helper.to_array(init)
        node = self.producer.get(name)
        if node is None or depth > 32:
            return None
        attrs = {a.name: a for a in node.attribute}
        op = node.op_type
        if op == "Constant":
            if "value" in attrs:
                return numpy_helper.to_array(attrs["value"].t)
            if "value_int" in attrs:
                return np.array(attrs["value_int"].i)
            if "value_ints" in attrs:
                return np.array(list(attrs["value_ints"].ints))
            return None
        if op == "Shape":
            dims = self.dims(node.input[0])
            if dims is None:
                return None
            start = attrs["start"].i if "start" in attrs else 0
            end = attrs["end"].i if "end" in attrs else len(dims)
            return _PartialShape(dims[start:end])
        ins = [self.value(i, depth + 1) if i else None for i in node.input]
        if op in ("Identity", "Cast"):
            return ins[0]
        if op == "Gather" and ins[1] is not None:
            axis = attrs["axis"].i if "axis" in attrs else 0
            data = ins[0]
            if isinstance(data, _PartialShape) and axis == 0:
                idx = np.asarray(ins[1])
                picked = [data.dims[int(i)] for i in idx.reshape(-1)]
                if any(p is None for p in picked):
                    return None
                return np.array(picked, dtype=np.int64).reshape(idx.shape)
            if data is not None and not isinstance(data, _PartialShape):
                return np.take(data, np.asarray(ins[1]), axis=axis)
            return None
        if any(isinstance(v, _PartialShape) for v in ins):
            ins = [v.full() if isinstance(v, _PartialShape) else v for v in ins]
        if any(v is None for v, i in zip(ins, node.input) if i):
            return None
        try:
            if op == "Reshape":
                data = np.asarray(ins[0])
                shape = [int(s) for s in np.asarray(ins[1]).reshape(-1)]
                shape = [data.shape[i] if s == 0 and i < data.ndim else s for i, s in enumerate(shape)]
                return data.reshape(shape)
            if op == "Squeeze":
                return np.squeeze(ins[0]) if len(ins) < 2 else np.squeeze(ins[0], axis=tuple(int(a) for a in ins[1]))
            if op == "Unsqueeze":
                out = np.asarray(ins[0])
                for a in sorted(int(a) for a in np.asarray(ins[1]).reshape(-1)):
                    out = np.expand_dims(out, a)
                return out
            if op == "Concat":
                return np.concatenate([np.atleast_1d(v) for v in ins], axis=attrs["axis"].i if "axis" in attrs else 0)
            if op == "Slice":
                data, starts, ends = ins[0], ins[1], ins[2]
                if len(ins) > 3 and ins[3] is not None and np.asarray(ins[3]).size != 1:
                    return None
                steps = int(np.asarray(ins[4]).reshape(-1)[0]) if len(ins) > 4 and ins[4] is not None else 1
                return np.asarray(data)[int(np.asarray(starts).reshape(-1)[0]) :
                                        int(np.asarray(ends).reshape(-1)[0]) : steps]
            if op in self._ARITH:
                a, b = np.asarray(ins[0]), np.asarray(ins[1])
                if op == "Div" and not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)):
                    return np.divide(a, b)
                return self._ARITH[op](a, b)
        except Exception:  # noqa: BLE001 - anything odd: unknown
            return None
        return None


class _PartialShape:
    def __init__(self, dims):
        self.dims = list(dims)

    def full(self):
        return None if any(d is None for d in self.dims) else np.array(self.dims, dtype=np.int64)


# -- helpers ---------------------------------------------------------------------------------------


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.g is not None and a.g.node:
                yield from _all_nodes(a.g)
            for sub in a.graphs:
                yield from _all_nodes(sub)


def _default_opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def _attr_str(attr, default: str) -> str:
    if attr is None:
        return default
    v = attr.s
    return v.decode() if isinstance(v, bytes) else str(v)


def _version_tuple(version: str | None) -> tuple[int | None, int]:
    if not version:
        return None, 0
    m = re.match(r"(\d+)(?:\.(\d+))?", str(version))
    if not m:
        return None, 0
    return int(m.group(1)), int(m.group(2) or 0)


def _installed_trt_version() -> str | None:
    try:
        import tensorrt
    except Exception:  # noqa: BLE001 - not installed (the usual case on CPU machines)
        return None
    return getattr(tensorrt, "__version__", None)

