"""Runners: OnnxRuntimeRunner and TensorRTRunner share `runner(*inputs) -> list[torch.Tensor]`."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from dittofx.cli import progress
from dittofx.errors import ExportError
from dittofx.exporters.onnx import export_onnx
from dittofx.runtime import TENSORRT_MISSING, OnnxRuntimeRunner, TensorRTRunner


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x, scale):
        return self.fc(x) * scale[:, None], x.sum(-1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    progress.set_quiet(True)
    torch.manual_seed(0)
    model = _TwoInputs().eval()
    path = tmp_path_factory.mktemp("runtime") / "two.onnx"
    export_onnx(model, path, (torch.randn(2, 6), torch.rand(2)))
    progress.set_quiet(False)
    return model, path


def test_onnxruntime_runner_takes_torch_or_numpy_and_returns_torch(exported):
    model, path = exported
    runner = OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"], threads=1)
    assert runner.input_names == ["x", "scale"] and runner.output_names == ["output_0", "output_1"]
    x, scale = torch.randn(4, 6), torch.rand(4)
    ref = model(x, scale)
    for call in (
        lambda: runner(x, scale),
        lambda: runner(x.numpy(), scale.numpy()),
        lambda: runner(x.double().numpy(), scale=scale),  # float64 is cast to the model's float32
        lambda: runner(scale=scale, x=x),
    ):
        outs = call()
        assert all(isinstance(o, torch.Tensor) for o in outs)
        assert [o.shape for o in outs] == [r.shape for r in ref]
        for o, r in zip(outs, ref):
            assert torch.allclose(o, r.detach(), atol=1e-5)


def test_onnxruntime_runner_input_errors(exported, tmp_path):
    _, path = exported
    runner = OnnxRuntimeRunner(path)
    with pytest.raises(ExportError, match="missing input 'scale'"):
        runner(torch.randn(2, 6))
    with pytest.raises(ExportError, match="takes 2 input"):
        runner(torch.randn(2, 6), torch.rand(2), torch.rand(2))
    with pytest.raises(ExportError, match="no input"):
        runner(torch.randn(2, 6), torch.rand(2), bogus=1)
    with pytest.raises(ExportError, match="no such ONNX file"):
        OnnxRuntimeRunner(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ExportError, match="cannot load"):
        OnnxRuntimeRunner(tmp_path / "junk.onnx")


@pytest.mark.parametrize("inputs, message", [
    ((torch.randn(2, 7), torch.rand(2)), r"^two.onnx: input 'x' has shape \(2, 7\), the model expects \(batch, 6\)$"),
    ((torch.randn(6), torch.rand(2)), r"input 'x' has shape \(6,\), the model expects \(batch, 6\)$"),
    ((torch.randn(2, 6), torch.rand(3)), r"input 'scale' has batch = 3 \(shape \(3,\)\), but input 'x' has batch = 2"),
    ((torch.randn(2, 6), torch.rand(2, 1)), r"input 'scale' has shape \(2, 1\), the model expects \(batch,\)"),
    ((torch.randn(2, 6, dtype=torch.complex64), torch.rand(2)), r"input 'x' is complex64, the model takes float32"),
    ((None, torch.rand(2)), r"input 'x' must be a tensor or an array, got NoneType"),
    (("abc", torch.rand(2)), r"input 'x' must be a tensor or an array, got str"),
])
def test_onnxruntime_runner_wrong_inputs_are_one_line_naming_the_input(exported, inputs, message):
    _, path = exported
    with pytest.raises(ExportError, match=message) as e:
        OnnxRuntimeRunner(path)(*inputs)
    assert "\n" not in str(e.value)


def test_onnxruntime_runner_converts_only_without_loss(tmp_path):
    class Index(nn.Module):
        def forward(self, table, index):
            return table.index_select(1, index[0])

    path = tmp_path / "index.onnx"
    export_onnx(Index(), path, (torch.randn(2, 5), torch.tensor([[0, 3]])))
    runner = OnnxRuntimeRunner(path)
    table = torch.randn(2, 5)
    assert torch.equal(runner(table, np.array([[4.0, 1.0]]))[0], table[:, [4, 1]])  # integral floats: indices
    with pytest.raises(ExportError, match=r"input 'index' is float64, the model takes int64"):
        runner(table, np.array([[4.5, 1.0]]))


def test_onnxruntime_runner_failure_inside_the_model_is_one_line(exported, tmp_path):
    class Gather(nn.Module):
        def forward(self, table, index):
            return table[:, index]

    path = tmp_path / "gather.onnx"
    export_onnx(Gather(), path, (torch.randn(2, 5), torch.tensor([1, 3])), dynamic_batch=False)
    with pytest.raises(ExportError, match=r"^onnxruntime failed to run gather.onnx on inputs table \(2, 5\), "
                                          r"index \(2,\): .*Gather") as e:
        OnnxRuntimeRunner(path)(torch.randn(2, 5), torch.tensor([1, 9]))  # index 9 out of range
    assert "\n" not in str(e.value)


def test_tensorrt_runner_without_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails as if not installed
    with pytest.raises(ExportError) as exc:
        TensorRTRunner(tmp_path / "m.plan")
    assert str(exc.value) == TENSORRT_MISSING


def test_tensorrt_runner_without_gpu(tmp_path, monkeypatch):
    from tests.exporters.test_tensorrt import make_fake_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt("10.8.0", True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExportError, match="needs an NVIDIA GPU"):
        TensorRTRunner(tmp_path / "m.plan")


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_runners_agree_on_the_gpu(exported, tmp_path):
    from tests.exporters.test_tensorrt import needs_real_tensorrt

    needs_real_tensorrt()
    from dittofx.exporters.tensorrt import build_engine

    model, path = exported
    built = build_engine(path, tmp_path / "two.plan", batch=(1, 4, 8))
    trt_runner, ort_runner = TensorRTRunner(built.path), OnnxRuntimeRunner(path)
    assert trt_runner.input_names == ort_runner.input_names
    assert trt_runner.output_names == ort_runner.output_names
    x, scale = np.random.randn(5, 6).astype(np.float32), np.random.rand(5).astype(np.float32)
    for a, b in zip(trt_runner(x, scale), ort_runner(x, scale)):
        assert a.is_cuda and torch.allclose(a.cpu(), b, atol=1e-3)
