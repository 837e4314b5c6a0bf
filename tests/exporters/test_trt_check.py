"""TensorRT readiness on hand-built ONNX models: one model per kind of finding, and a clean one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dittofx.errors import ExportError
from dittofx.exporters.trt_check import TOPK_MAX_K, check_tensorrt_readiness

F = TensorProto.FLOAT
I64 = TensorProto.INT64


def _model(nodes, inputs, outputs, initializers=(), opset=18, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _clean(opset=18):
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return _model(nodes, [_vi("x", F, ["batch", 4])], [_vi("y", F, ["batch", 3])], [w], opset=opset)


def _topk(k_source: str, k: int = 10, n: int = 8000, sorted_=1):
    """TopK over n elements with K from an initializer, a Constant node, a graph input, or Shape arithmetic."""
    nodes, inits, inputs = [], [], [_vi("x", F, ["batch", n])]
    if k_source == "initializer":
        inits.append(numpy_helper.from_array(np.array([k], np.int64), "k"))
    elif k_source == "constant":
        nodes.append(helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([k], np.int64)),
                                      name="kconst"))
    elif k_source == "input":
        inputs.append(_vi("k", I64, [1]))
    elif k_source == "shape":  # argsort: K = x.shape[-1], as torch.onnx writes it
        inits += [numpy_helper.from_array(np.array(-1, np.int64), "last"),
                  numpy_helper.from_array(np.array([1], np.int64), "one")]
        nodes += [
            helper.make_node("Shape", ["x"], ["shape"], name="shape"),
            helper.make_node("Gather", ["shape", "last"], ["n"], axis=0, name="gather"),
            helper.make_node("Reshape", ["n", "one"], ["k"], name="reshape"),
        ]
    nodes.append(helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1, sorted=sorted_, name="topk"))
    outputs = [_vi("values", F, ["batch", None]), _vi("indices", I64, ["batch", None])]
    return _model(nodes, inputs, outputs, inits)


def _scatter(op: str, reduction: str):
    nodes = [helper.make_node(op, ["data", "idx", "upd"], ["y"], reduction=reduction, name="scatter")]
    idx_type = [2, 3] if op == "ScatterElements" else [2, 1]
    upd_shape = [2, 3] if op == "ScatterElements" else [2]
    inputs = [_vi("data", F, [4, 3]), _vi("idx", I64, idx_type), _vi("upd", F, upd_shape)]
    return _model(nodes, inputs, [_vi("y", F, [4, 3])])


def test_clean_model_is_ready(tmp_path):
    path = tmp_path / "clean.onnx"
    onnx.save(_clean(), path)
    report = check_tensorrt_readiness(path, trt_version=None)
    assert report.ok and report.findings == [] and report.opset == 18
    assert "ready" in str(report) and "NOT" not in str(report)
    # the same from a ModelProto, and against a given TensorRT
    assert check_tensorrt_readiness(_clean(), trt_version="10.0.1").ok


@pytest.mark.parametrize(
    "opset, trt_version, severity",
    [
        (18, None, None),
        (22, None, "warning"),  # TensorRT 10.0 reads 20, 10.15 reads 24, 11 reads 25
        (22, "10.0.1", "error"),
        (22, "10.8.0", "warning"),  # a 10.x between the documented limits: may or may not
        (24, "10.15.1", None),
        (25, "10.15.1", "error"),
        (25, "11.0.0", None),
        (26, None, "error"),
        (8, None, "error"),
    ],
)
def test_opset_limits(opset, trt_version, severity):
    report = check_tensorrt_readiness(_clean(opset), trt_version=trt_version)
    found = [f.severity for f in report.findings if f.op == "opset"]
    assert found == ([severity] if severity else [])


def test_unsupported_and_foreign_operators():
    nodes = [
        helper.make_node("Unique", ["x"], ["u"], name="unique"),
        helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft", name="fused"),
        helper.make_node("BitShift", ["i", "i"], ["s"], direction="LEFT", name="shift"),
    ]
    inputs = [_vi("x", F, [4, 4]), _vi("i", TensorProto.UINT32, [4])]
    outputs = [_vi("u", F, [None]), _vi("y", F, [4, 4]), _vi("s", TensorProto.UINT32, [4])]
    report = check_tensorrt_readiness(_model(nodes, inputs, outputs, domains=["com.microsoft"]), trt_version=None)
    assert not report.ok
    errors = {f.node: f for f in report.errors}
    assert set(errors) == {"unique", "fused", "shift"}
    assert "com.microsoft" in errors["fused"].op and "onnxruntime" in errors["fused"].message
    assert "not supported" in errors["unique"].message


@pytest.mark.parametrize(
    "source, k, severity",
    [
        ("initializer", 10, None),
        ("initializer", TOPK_MAX_K, None),
        ("initializer", TOPK_MAX_K + 1, "error"),
        ("constant", 5000, "error"),
        ("input", 0, "warning"),  # K only known at run time
        ("shape", 0, "error"),  # argsort over 8000 elements: K = 8000 through Shape/Gather/Reshape
    ],
)
def test_topk_k_limit(source, k, severity):
    report = check_tensorrt_readiness(_topk(source, k), trt_version=None)
    found = [(f.severity, f.message) for f in report.findings if f.op == "TopK"]
    assert [s for s, _ in found] == ([severity] if severity else [])
    if source == "shape":
        assert "K=8000" in found[0][1]


def test_topk_argsort_over_few_tokens_is_fine():
    report = check_tensorrt_readiness(_topk("shape", n=197), trt_version=None)
    assert report.ok and report.findings == []


def test_topk_unsorted_is_an_error():
    report = check_tensorrt_readiness(_topk("initializer", 4, sorted_=0), trt_version=None)
    assert [f.severity for f in report.findings] == ["error"] and "sorted" in report.findings[0].message


def test_scatter_reductions():
    plain = check_tensorrt_readiness(_scatter("ScatterElements", "none"), trt_version=None)
    assert plain.ok and plain.findings == []
    add = check_tensorrt_readiness(_scatter("ScatterElements", "add"), trt_version=None)
    assert add.ok and [f.severity for f in add.findings] == ["warning"]
    assert "init_libnvinfer_plugins" in add.findings[0].message
    nd = check_tensorrt_readiness(_scatter("ScatterND", "add"), trt_version=None)
    assert not nd.ok and nd.errors[0].op == "ScatterND"


def test_data_dependent_shapes_need_an_output_allocator():
    nodes = [helper.make_node("NonZero", ["x"], ["nz"], name="nonzero")]
    model = _model(nodes, [_vi("x", F, [4, 4])], [_vi("nz", I64, [2, None])])
    report = check_tensorrt_readiness(model, trt_version=None)
    assert report.ok
    assert [(f.severity, f.op) for f in report.findings] == [("warning", "NonZero")]
    assert "output allocator" in report.findings[0].message
    # torch.export names a data-dependent size u0, u1, ...: an output with such a dim is flagged too
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    model = _model(nodes, [_vi("x", F, ["u0", 4])], [_vi("y", F, ["u0", 4])])
    assert [f.op for f in check_tensorrt_readiness(model, trt_version=None).warnings] == ["output"]


def test_attention_needs_4d_inputs():
    def attention(rank):
        shape = [2, 4, 10, 8][-rank:] if rank <= 4 else [2, 4, 10, 8]
        nodes = [helper.make_node("Attention", ["q", "k", "v"], ["y"], name="attn", q_num_heads=4, kv_num_heads=4)]
        io = [_vi(n, F, shape) for n in ("q", "k", "v")]
        return _model(nodes, io, [_vi("y", F, shape)], opset=23)

    assert [f.op for f in check_tensorrt_readiness(attention(4), trt_version="11.0").findings] == []
    bad = check_tensorrt_readiness(attention(3), trt_version="11.0")
    assert not bad.ok and bad.errors[0].op == "Attention" and "4-D" in bad.errors[0].message


def test_report_text_groups_repeated_findings():
    nodes = [helper.make_node("Unique", ["x"], [f"u{i}"], name=f"unique{i}") for i in range(5)]
    model = _model(nodes, [_vi("x", F, [4])], [_vi(f"u{i}", F, [None]) for i in range(5)])
    text = str(check_tensorrt_readiness(model, trt_version=None))
    lines = text.splitlines()
    assert "NOT ready" in lines[0] and "5 error(s)" in lines[0]
    assert len(lines) == 2 and "x5" in lines[1] and "and 2 more" in lines[1]


def test_missing_or_corrupt_file(tmp_path):
    with pytest.raises(ExportError, match="no such ONNX file"):
        check_tensorrt_readiness(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a model")
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        check_tensorrt_readiness(bad)


def test_cli_check_trt_exit_codes(tmp_path, capsys):
    from tests.exporters.test_onnx import run_cli

    clean, broken = tmp_path / "clean.onnx", tmp_path / "broken.onnx"
    onnx.save(_clean(), clean)
    onnx.save(_topk("initializer", 5000), broken)
    assert run_cli(["check-trt", str(clean)]) == 0
    assert "ready" in capsys.readouterr().out
    assert run_cli(["check-trt", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "NOT ready" in out and "K=5000" in out
    assert run_cli(["check-trt", str(broken), "--quiet"]) == 1
    assert capsys.readouterr().out == ""
    assert run_cli(["check-trt", str(tmp_path / "missing.onnx")]) == 2
    assert "no such ONNX file" in capsys.readouterr().err
