"""ONNX export: onnxruntime agrees with PyTorch, the batch is dynamic, nothing is left behind on failure."""

from __future__ import annotations

import dataclasses
import logging
import os
import textwrap

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from dittofx.errors import ExportError
from dittofx.exporters import onnx as onnx_exporter
from dittofx.exporters.onnx import export_onnx
from dittofx.exporters.verify import compare
from dittofx.runtime import OnnxRuntimeRunner

timm = pytest.importorskip("timm")


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _leftovers(directory) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(".")]


def _dims(model_path):
    m = onnx.load(model_path, load_external_data=False)
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(m.graph.input) + list(m.graph.output)}


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10).eval()


def test_timm_vit_export_checks_and_runs_at_any_batch(vit, tmp_path):
    x = torch.randn(1, 3, 64, 64)  # batch 1: captured at batch 2, checked at batch 1
    out = tmp_path / "vit.onnx"
    result = export_onnx(vit, out, (x,))
    assert result.path == str(out) and out.is_file()
    assert result.opset == 18 and result.dynamic_batch
    assert result.max_rel_diff is not None and result.max_rel_diff <= 1e-4
    assert result.input_names == ["x"] and result.output_names == ["output"]
    assert _dims(out)["x"] == ["batch", 3, 64, 64]
    assert result.trt_report.ok, str(result.trt_report)
    assert _leftovers(tmp_path) == []
    # a deployable file: no stack traces with this machine's source paths (timm's, torch's)
    assert os.path.dirname(torch.__file__).encode() not in out.read_bytes()

    runner = OnnxRuntimeRunner(out, threads=2)
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 64, 64)
        (got,) = runner(xb)
        with torch.no_grad():
            ref = vit(xb)
        assert isinstance(got, torch.Tensor) and got.shape == ref.shape
        assert _rel(got, ref) <= 1e-4


def test_graph_module_of_torch_export(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    gm = torch.export.export(vit, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False).module()
    out = tmp_path / "gm.onnx"
    result = export_onnx(gm, out, (x,))
    assert result.max_rel_diff <= 1e-4 and result.dynamic_batch
    assert result.input_names == ["x"]
    runner = OnnxRuntimeRunner(out)
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 64, 64)
        assert _rel(runner(xb)[0], gm(xb).detach()) <= 1e-4


@dataclasses.dataclass
class _Out:
    sample: torch.Tensor
    extra: tuple
    unused: torch.Tensor | None = None


class _DiffusersStyle(nn.Module):
    """hidden_states + timestep + keyword conditioning, returning a dataclass with nested outputs."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, return_dict=True):
        h = self.drop(self.proj(hidden_states)) + timestep[:, None, None] + encoder_hidden_states.mean(1, keepdim=True)
        if not return_dict:
            return (h,)
        return _Out(sample=h, extra=(h.sum(-1), {"doubled": h * 2}))


def test_dataclass_output_and_keyword_inputs(tmp_path):
    torch.manual_seed(0)
    model = _DiffusersStyle().train()  # exported in eval mode, train mode restored afterwards
    args = (torch.randn(2, 4, 8), torch.tensor([1.0, 2.0]))
    kwargs = {"encoder_hidden_states": torch.randn(2, 3, 8), "return_dict": True}
    out = tmp_path / "d.onnx"
    result = export_onnx(model, out, args, kwargs)
    assert model.training and model.drop.training
    assert result.input_names == ["hidden_states", "timestep", "encoder_hidden_states"]
    assert result.output_names == ["sample", "extra.0", "extra.1.doubled"]
    dims = _dims(out)
    assert dims["timestep"] == ["batch"] and dims["sample"] == ["batch", 4, 8]

    model.eval()
    runner = OnnxRuntimeRunner(out)
    xb, tb, eb = torch.randn(3, 4, 8), torch.tensor([1.0, 5.0, 9.0]), torch.randn(3, 3, 8)
    got = runner(xb.numpy(), tb, encoder_hidden_states=eb)  # numpy or torch, positional or by name
    with torch.no_grad():
        ref = model(xb, tb, encoder_hidden_states=eb)
    assert [tuple(g.shape) for g in got] == [(3, 4, 8), (3, 4), (3, 4, 8)]
    for g, r in zip(got, [ref.sample, ref.extra[0], ref.extra[1]["doubled"]]):
        assert _rel(g, r) <= 1e-5


def test_transformers_model_output(tmp_path):
    modeling_outputs = pytest.importorskip("transformers.modeling_outputs")

    class HF(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 5)

        def forward(self, pixel_values):
            h = self.fc(pixel_values)
            return modeling_outputs.BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=h[:, 0],
                                                               hidden_states=(pixel_values, h))

    x = torch.randn(2, 7, 6)
    result = export_onnx(HF(), tmp_path / "hf.onnx", (x,))
    assert result.input_names == ["pixel_values"]
    assert result.output_names == ["last_hidden_state", "pooler_output", "hidden_states.0", "hidden_states.1"]
    assert result.max_rel_diff <= 1e-5


class _MergeOps(nn.Module):
    """The ops token merging inserts: argsort, gather, scatter_add, index_select, topk, sort."""

    def forward(self, x):
        _, n, c = x.shape
        a, b = x[:, ::2], x[:, 1::2]
        scores = (a / a.norm(dim=-1, keepdim=True)) @ (b / b.norm(dim=-1, keepdim=True)).transpose(-1, -2)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[:, 3:], edge_idx[:, :3]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        unm = a.gather(dim=-2, index=unm_idx.expand(-1, -1, c))
        src = a.gather(dim=-2, index=src_idx.expand(-1, -1, c))
        dst = b.scatter_add(-2, dst_idx.expand(-1, -1, c), src)
        top, _ = torch.topk(scores.flatten(1), 4, dim=-1)
        sorted_max, _ = torch.sort(node_max, dim=-1)
        picked = torch.index_select(x, 1, torch.arange(0, n, 2))
        return torch.cat([unm, dst], dim=1), top, sorted_max, picked


def test_merge_ops_export_with_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "merge.onnx"
    result = export_onnx(_MergeOps(), out, (torch.randn(2, 16, 8),))
    assert result.dynamic_batch and result.max_rel_diff <= 1e-5
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"ScatterElements", "GatherElements", "TopK"} <= ops
    # scatter_add is ScatterElements(reduction="add"): TensorRT needs its plugin registry
    assert [f.op for f in result.trt_report.warnings] == ["ScatterElements"]
    assert result.trt_report.ok
    runner = OnnxRuntimeRunner(out)
    for batch in (1, 3):
        x = torch.randn(batch, 16, 8)
        for got, ref in zip(runner(x), _MergeOps()(x)):
            assert got.shape == ref.shape and _rel(got, ref) <= 1e-5


class _NonZero(nn.Module):
    def forward(self, x):
        return x * 2, torch.nonzero(x[0] > 0)


def test_data_dependent_output_exports_and_is_flagged_for_tensorrt(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 16)
    result = export_onnx(_NonZero(), tmp_path / "nz.onnx", (x,), dynamic_batch=False)
    assert result.max_rel_diff == 0.0 and not result.dynamic_batch
    flagged = {f.op for f in result.trt_report.warnings}
    assert {"NonZero", "output"} <= flagged and result.trt_report.ok
    got = OnnxRuntimeRunner(result.path)(x)[1]
    assert torch.equal(got, torch.nonzero(x[0] > 0))


class _BoolMask(nn.Module):
    """A boolean masked_fill (HunyuanVideo builds its attention mask so): ONNX Where over booleans."""

    def forward(self, x, keep):
        mask = keep.masked_fill(x[:, :1] > 0, False)
        return x.masked_fill(mask, 0.0)


def test_boolean_masked_fill_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    x, keep = torch.randn(2, 8), torch.rand(2, 8) > 0.3
    result = export_onnx(_BoolMask(), tmp_path / "mask.onnx", (x, keep))
    assert result.max_rel_diff == 0.0
    got = OnnxRuntimeRunner(result.path)(x, keep)
    assert torch.equal(got if isinstance(got, torch.Tensor) else got[0], _BoolMask()(x, keep))


class _FixedBatch(nn.Module):
    def forward(self, x):
        return x.reshape(2, -1).sum(-1)  # the batch is hard-coded: it cannot be dynamic


def test_model_with_a_fixed_batch_falls_back_to_the_example_batch(tmp_path, caplog):
    x = torch.randn(2, 3, 4)
    with caplog.at_level(logging.WARNING, logger="dittofx"):
        result = export_onnx(_FixedBatch(), tmp_path / "fixed.onnx", (x,))
    assert not result.dynamic_batch and result.max_rel_diff <= 1e-6
    assert _dims(result.path)["x"] == [2, 3, 4]
    warned = [r for r in caplog.records if r.name == "dittofx" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "fixed batch of 2" in warned[0].getMessage()  # the library warns through logging


class _Wrapper(nn.Module):
    """A drop-in wrapper with forward(*args, **kwargs), like dittofx's OptimizedModule."""

    def __init__(self, inner):
        super().__init__()
        self.__dict__["_inner"] = inner

    @property
    def original(self):
        return self.__dict__["_inner"]

    def forward(self, *args, **kwargs):
        return self.original(*args, **kwargs)


def test_wrapper_inputs_are_named_after_the_wrapped_forward(tmp_path):
    torch.manual_seed(0)
    inner = _DiffusersStyle().eval()
    args = (torch.randn(2, 4, 8), torch.tensor([1.0, 2.0]))
    result = export_onnx(_Wrapper(inner), tmp_path / "w.onnx", args, {"encoder_hidden_states": torch.randn(2, 3, 8)})
    assert result.input_names == ["hidden_states", "timestep", "encoder_hidden_states"]
    assert result.max_rel_diff <= 1e-5


class _ScatterMean(nn.Module):
    def forward(self, x, index):
        return torch.zeros(x.shape[0], 4, x.shape[2]).scatter_reduce(1, index, x, reduce="mean", include_self=False)


def test_scatter_reduce_mean_is_refused_and_nothing_is_written(tmp_path):
    torch.manual_seed(0)
    x, index = torch.randn(2, 16, 8), torch.randint(0, 4, (2, 16, 8))
    # What onnxruntime computes: torch exports reduce="mean" as ScatterElements(reduction="none").
    unchecked = tmp_path / "unchecked.onnx"
    export_onnx(_ScatterMean(), unchecked, (x, index), check=False)
    reductions = {a.s.decode() for n in onnx.load(unchecked).graph.node if n.op_type == "ScatterElements"
                  for a in n.attribute if a.name == "reduction"}
    assert reductions == {"none"}
    got = OnnxRuntimeRunner(unchecked)(x, index)[0]
    ref = _ScatterMean()(x, index)
    assert float((got - ref).abs().max()) > 0.1  # onnxruntime computes something else (about 2 here)

    out = tmp_path / "mean.onnx"
    out.write_bytes(b"previous export")  # a failed export leaves an existing file untouched
    with pytest.raises(ExportError, match=r"differs from PyTorch on output 'output'.*not written"):
        export_onnx(_ScatterMean(), out, (x, index))
    assert out.read_bytes() == b"previous export"
    with pytest.raises(ExportError):
        export_onnx(_ScatterMean(), tmp_path / "new.onnx", (x, index))
    assert not (tmp_path / "new.onnx").exists()
    assert _leftovers(tmp_path) == []


class _Explodes(nn.Module):
    def forward(self, x):
        raise AssertionError("the export must not start")


def test_unwritable_output_fails_before_any_work(tmp_path):
    x = torch.randn(1, 3)
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(_Explodes(), tmp_path / "missing" / "m.onnx", (x,))
    with pytest.raises(ExportError, match="is a directory"):
        export_onnx(_Explodes(), tmp_path, (x,))
    (tmp_path / "afile").write_text("")
    with pytest.raises(ExportError, match="not a directory"):
        export_onnx(_Explodes(), tmp_path / "afile" / "m.onnx", (x,))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(ExportError, match="cannot write"):
            export_onnx(_Explodes(), ro / "m.onnx", (x,))
    with pytest.raises(ExportError, match="opset 30"):
        export_onnx(_Explodes(), tmp_path / "m.onnx", (x,), opset=30)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 16)


@pytest.mark.parametrize("opset, fused", [(18, False), (23, True)])
def test_sdpa_becomes_matmul_softmax_at_18_and_attention_at_23(tmp_path, opset, fused):
    torch.manual_seed(0)
    out = tmp_path / f"attn{opset}.onnx"
    result = export_onnx(_Attention(), out, (torch.randn(2, 10, 16),), opset=opset)
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert ("Attention" in ops) == fused
    assert ("Softmax" in ops) == (not fused)
    assert result.max_rel_diff <= 1e-5
    opset_findings = [f for f in result.trt_report.findings if f.op == "opset"]
    assert bool(opset_findings) == (opset > 20)  # 23 needs TensorRT 10.15+ / 11


class _MaskedAttention(nn.Module):
    """SDPA with a (B, 1, 1, N) additive bias, the shape of ToMe's proportional attention (log size)."""

    def forward(self, q, k, v, log_size):
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=log_size[:, None, None, :])


def test_broadcast_mask_runs_at_opset_18_but_not_in_onnxruntime_attention_at_23(tmp_path):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 10, 8) for _ in range(3))
    log_size = torch.rand(2, 10).log1p()
    ok = export_onnx(_MaskedAttention(), tmp_path / "m18.onnx", (q, k, v, log_size), opset=18)
    assert ok.max_rel_diff <= 1e-5
    with pytest.raises(ExportError, match="full query length: export with opset 18.*not written"):
        export_onnx(_MaskedAttention(), tmp_path / "m23.onnx", (q, k, v, log_size), opset=23)
    assert sorted(os.listdir(tmp_path)) == ["m18.onnx"]


def test_optimize_runs_onnxscript_and_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    plain = export_onnx(model, tmp_path / "plain.onnx", (x,))
    optimized = export_onnx(model, tmp_path / "opt.onnx", (x,), optimize=True)
    assert optimized.max_rel_diff <= 1e-4 and optimized.dynamic_batch
    nodes = lambda p: onnx.load(p).graph.node  # noqa: E731
    assert len(nodes(optimized.path)) < len(nodes(plain.path))
    # onnxruntime's offline optimizer writes its own fused operators, which TensorRT cannot parse
    contrib = [n.op_type for n in nodes(optimized.path) if n.domain == "com.microsoft"]
    assert contrib and not optimized.trt_report.ok
    assert plain.trt_report.ok
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 32, 32)
        assert _rel(OnnxRuntimeRunner(optimized.path)(xb)[0], model(xb).detach()) <= 1e-4


def test_external_data_moves_both_files(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_exporter, "EXTERNAL_DATA_BYTES", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    out = tmp_path / "big.onnx"
    result = export_onnx(model, out, (torch.randn(2, 64),))
    assert result.external_data
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    x = torch.randn(5, 64)
    assert _rel(OnnxRuntimeRunner(out)(x)[0], model(x).detach()) <= 1e-5


def test_compare_is_max_abs_diff_over_max_abs_reference():
    ref = torch.tensor([1.0, -4.0, 2.0])
    rel, max_diff, scale = compare(np.array([1.0, -4.0, 2.4]), ref)
    assert scale == 4.0 and max_diff == pytest.approx(0.4) and rel == pytest.approx(0.1)
    assert compare(np.zeros(3), torch.zeros(3))[0] == 0.0
    assert compare(np.array([np.nan]), torch.tensor([1.0]))[0] == float("inf")
    assert compare(np.zeros(2), torch.zeros(3))[0] == float("inf")


# -- the CLI ---------------------------------------------------------------------------------------


def run_cli(argv) -> int:
    """dittofx.cli.main's exit code, whether a usage error returns it or raises SystemExit."""
    from dittofx.cli import main

    try:
        return main(argv)
    except SystemExit as e:
        return e.code


MODEL_FILE = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 3)).eval()
    return model, (torch.randn(2, 12),)
'''


def test_cli_export_onnx(tmp_path, capsys):
    from dittofx.cli import main

    spec_file = tmp_path / "mymodel.py"
    spec_file.write_text(textwrap.dedent(MODEL_FILE))
    out = tmp_path / "out.onnx"
    assert main(["export", f"{spec_file}:build", "--format", "onnx", "-o", str(out), "--optimize"]) == 0
    printed = capsys.readouterr().out
    assert "max relative difference" in printed and str(out) in printed
    x = torch.randn(4, 12)
    assert OnnxRuntimeRunner(out)(x)[0].shape == (4, 3)

    assert main(["export", f"{spec_file}:build", "-o", str(tmp_path / "nodir" / "m.onnx"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err

    assert run_cli(["export", f"{spec_file}:build", "--format", "tflite", "-o", str(out)]) == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_cli_export_tensorrt_without_tensorrt_says_how_to_install(tmp_path, capsys):
    from dittofx.cli import main

    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    out = tmp_path / "m.plan"
    assert main(["export", "no-such-file.py:build", "-o", str(out), "--quiet"]) == 2  # fails before loading
    err = capsys.readouterr().err
    assert "pip install 'dittofx[tensorrt]'" in err and err.count("\n") == 1
    assert not out.exists()
