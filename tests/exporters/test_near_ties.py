"""A graph that chooses by comparing values (ToMe's matching, RLT's kept tubelets) may meet a near tie
on the export's example: PyTorch and onnxruntime round two scores differently and choose differently.
Such a graph, refused on the example, is checked on three perturbations of it and passes when two do;
a graph that chooses nothing, or fails on the perturbations too, is refused as before."""

import pytest
import torch
from torch import nn

from dittofx.errors import ExportError
from dittofx.exporters import verify
from dittofx.exporters.onnx import export_onnx


class TopHalf(nn.Module):
    """Keeps the rows with the largest means: a choice by comparing values."""

    def forward(self, x):
        order = x.mean(-1).argsort(dim=-1, descending=True)[:, : x.shape[1] // 2]
        return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1])) * 2


class Plain(nn.Module):
    def forward(self, x):
        return torch.tanh(x) * 2


def refuse(calls: list, when):
    """verify's check of one input refusing the calls `when(call number)` says, else the real check."""
    real = verify._check_one

    def check_one(sess, in_names, out_names, what, *rest):
        calls.append(what)
        if when(len(calls)):
            raise ExportError(f"onnxruntime differs from PyTorch on {what} (simulated)")
        return real(sess, in_names, out_names, what, *rest)

    return check_one


def test_a_choosing_graph_refused_on_the_example_only_is_checked_on_perturbations(tmp_path, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(verify, "_check_one", refuse(calls, lambda n: n == 1))
    result = export_onnx(TopHalf(), tmp_path / "top.onnx", (torch.randn(2, 8, 4),))
    assert calls == ["the example"] + [f"the example, perturbed ({k})" for k in (1, 2, 3)]
    assert (tmp_path / "top.onnx").exists() and result.max_rel_diff < 1e-5
    assert "near tie" in caplog.text


def test_one_failing_perturbation_of_three_still_passes(tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "_check_one", refuse([], lambda n: n in (1, 3)))
    export_onnx(TopHalf(), tmp_path / "top.onnx", (torch.randn(2, 8, 4),))
    assert (tmp_path / "top.onnx").exists()


def test_a_choosing_graph_that_fails_on_the_perturbations_too_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "_check_one", refuse([], lambda n: n != 2))
    with pytest.raises(ExportError, match="on the example \\(simulated\\)"):  # the example's refusal
        export_onnx(TopHalf(), tmp_path / "top.onnx", (torch.randn(2, 8, 4),))
    assert not (tmp_path / "top.onnx").exists()


def test_a_graph_that_chooses_nothing_gets_no_second_chance(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(verify, "_check_one", refuse(calls, lambda n: n == 1))
    with pytest.raises(ExportError, match="simulated"):
        export_onnx(Plain(), tmp_path / "plain.onnx", (torch.randn(2, 8, 4),))
    assert calls == ["the example"] and not (tmp_path / "plain.onnx").exists()
