"""What keeps the ONNX export fast, checked by structure (not timing): torch.onnx's decomposition
retrace is skipped where it has nothing to do, kept where it has, and folded constants are named
after their content (the PAB export shares weights by name)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from dittofx.exporters.onnx import export_onnx
from dittofx.runtime.onnxruntime import import_onnxruntime

_fx_passes = pytest.importorskip("torch.onnx._internal.exporter._fx_passes")


@pytest.fixture
def retraces(monkeypatch):
    """How many times torch.onnx's own decomposition (the retrace) ran."""
    calls = []
    full = _fx_passes.decompose_with_registry

    def counted(ep, registry):
        calls.append(1)
        return full(ep, registry)

    monkeypatch.setattr(_fx_passes, "decompose_with_registry", counted)
    return calls


def _run(path, x):
    ort = import_onnxruntime()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


class TopRows(nn.Module):
    """ToMe's composite ops: argsort (no ONNX kernel of its own), a cast (`to`), a boolean `|`."""

    def forward(self, x):
        order = x.mean(-1).argsort(dim=-1, descending=True)
        rows = x.gather(1, order[:, :3, None].expand(-1, -1, x.shape[-1]))
        flag = ((x.sum(-1) > 0) | (x.amax(-1) > 1)).to(torch.float32)
        return rows.to(torch.float64).to(torch.float32) * 2 + flag[:, :3, None]


def _top_rows_reference(x):
    out = []
    for row in x:
        idx = sorted(range(row.shape[0]), key=lambda i: -float(row[i].mean()))[:3]
        flag = [float(row[k].sum() > 0 or row[k].max() > 1) for k in range(3)]  # of the first 3 positions
        out.append(torch.stack([row[i] * 2 + f for i, f in zip(idx, flag)]))
    return torch.stack(out)


def test_graph_of_onnx_ops_skips_the_retrace_and_computes_the_same(tmp_path, retraces):
    x = torch.randn(2, 7, 5)
    path = tmp_path / "top.onnx"
    export_onnx(TopRows(), path, (x,))
    assert retraces == []
    x3 = torch.randn(3, 7, 5)  # another batch: the graph is dynamic in it
    np.testing.assert_allclose(_run(path, x3), _top_rows_reference(x3).numpy(), rtol=1e-6, atol=1e-6)


class InPlace(nn.Module):
    def forward(self, x):
        y = x.clone()
        y.add_(1.0)  # a mutating op: functionalization (the retrace) has work to do
        return y * x


def test_mutating_graph_keeps_the_retrace(tmp_path, retraces):
    x = torch.randn(2, 4)
    path = tmp_path / "inplace.onnx"
    export_onnx(InPlace(), path, (x,))
    assert retraces == [1]
    np.testing.assert_allclose(_run(path, x), ((x + 1) * x).numpy(), rtol=1e-6, atol=1e-6)


class Project(nn.Module):
    def __init__(self, weight, prelude: int):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.prelude = prelude

    def forward(self, x):
        for _ in range(self.prelude):  # shifts the exporter's value counter
            x = torch.tanh(x) + 1
        return nn.functional.linear(x, self.weight)  # its transposed weight is folded into a new initializer


def test_folded_constants_are_named_after_their_content(tmp_path):
    weight = torch.randn(16, 32)
    names = []
    for prelude in (0, 3):
        path = tmp_path / f"p{prelude}.onnx"
        export_onnx(Project(weight, prelude), path, (torch.randn(2, 5, 32),))
        model = onnx.load(str(path))
        folded = [t for t in model.graph.initializer if t.dims == [32, 16]]
        assert len(folded) == 1
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(folded[0]), weight.t().numpy())
        names.append(folded[0].name)
    assert names[0] == names[1]
