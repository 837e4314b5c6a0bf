"""TensorRT engines.

Real builds need the tensorrt package and an NVIDIA GPU: those tests skip (with the reason) where
either is missing. Everywhere else, build_engine's logic (TensorRT 10 builder flags vs TensorRT 11
strong typing, profiles, timing cache, parser errors, atomic writes) runs against a stand-in
`tensorrt` module that records the calls, and the float16 conversion for TensorRT 11 is checked in
onnxruntime.
"""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from dittofx.cli import progress
from dittofx.errors import ExportError
from dittofx.exporters import tensorrt as trt_exporter
from dittofx.exporters.onnx import export_onnx
from dittofx.exporters.tensorrt import (
    _profile_shapes,
    build_engine,
    convert_onnx_to_fp16,
    parse_range,
    trt_capabilities,
)
from dittofx.runtime import TENSORRT_MISSING, OnnxRuntimeRunner


def _real_tensorrt_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"tensorrt cannot be imported ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False: TensorRT needs an NVIDIA GPU"
    return None


def needs_real_tensorrt():
    reason = _real_tensorrt_reason()
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    progress.set_quiet(True)
    torch.manual_seed(0)
    model = _MLP().eval()
    path = tmp_path_factory.mktemp("onnx") / "mlp.onnx"
    export_onnx(model, path, (torch.randn(2, 16),))
    return model, path


# -- a stand-in tensorrt module -------------------------------------------------------------------


def make_fake_tensorrt(version: str, weak_typing: bool, parse_errors=()):
    """The part of the tensorrt API that build_engine and TensorRTRunner use, recording calls."""
    calls: list = []
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = calls

    class Logger:
        WARNING = 2

        def __init__(self, level=2):
            self.level = level

    def init_libnvinfer_plugins(logger, namespace):
        calls.append(("init_plugins", namespace))
        return True

    class _Input:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self):
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class ParserError:
        def __init__(self, node_name, op, desc):
            self._n, self._o, self._d = node_name, op, desc

        def node_name(self):
            return self._n

        def node_operator(self):
            return self._o

        def node(self):
            return 0

        def desc(self):
            return self._d

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.errors = [ParserError(*e) for e in parse_errors]

        def parse_from_file(self, path):
            model = onnx.load(path)
            calls.append(("parse", path, [i.data_type for i in model.graph.initializer]))
            for vi in model.graph.input:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
                self.network.inputs.append(_Input(vi.name, dims))
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return b"CACHE:" + self.data

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache, self.pool = [], [], None, {}

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return 0

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            calls.append(("builder",))

        def create_network(self, flags=0):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build", list(config.flags), [p.shapes for p in config.profiles], dict(config.pool)))
            return b"ENGINE"

    flags = types.SimpleNamespace(TF32="TF32")
    if weak_typing:
        flags.FP16, flags.BF16 = "FP16", "BF16"
    trt.Logger, trt.init_libnvinfer_plugins, trt.Builder, trt.OnnxParser = (
        Logger, init_libnvinfer_plugins, Builder, OnnxParser
    )
    trt.BuilderFlag = flags
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    def install(version="10.8.0", weak_typing=True, parse_errors=()):
        trt = make_fake_tensorrt(version, weak_typing, parse_errors)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        return trt

    return install


def test_tensorrt10_fp16_uses_the_builder_flag(fake_trt, mlp_onnx, tmp_path):
    trt = fake_trt("10.8.0", weak_typing=True)
    _, onnx_path = mlp_onnx
    engine, cache = tmp_path / "mlp.plan", tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    result = build_engine(onnx_path, engine, fp16=True, batch=(1, 2, 8), timing_cache=cache, workspace_gb=0.5)
    assert engine.read_bytes() == b"ENGINE"
    assert cache.read_bytes() == b"CACHE:old"  # loaded, then saved
    assert result.precision == "fp16" and not result.strongly_typed and result.trt_version == "10.8.0"
    assert result.profile == {"x": ((1, 16), (2, 16), (8, 16))}
    kinds = [c[0] for c in trt.calls]
    assert kinds.index("init_plugins") < kinds.index("parse") < kinds.index("build")
    parse = next(c for c in trt.calls if c[0] == "parse")
    assert parse[1] == str(onnx_path)  # TensorRT 10 parses the float32 file itself
    build = next(c for c in trt.calls if c[0] == "build")
    assert build[1] == ["FP16"] and build[3] == {"WORKSPACE": 1 << 29}
    assert sorted(os.listdir(tmp_path)) == ["mlp.plan", "timing.cache"]


def test_tensorrt11_fp16_converts_the_onnx_and_refuses_bf16(fake_trt, mlp_onnx, tmp_path):
    trt = fake_trt("11.1.0", weak_typing=False)
    _, onnx_path = mlp_onnx
    result = build_engine(onnx_path, tmp_path / "a.plan", fp16=True)
    assert result.strongly_typed and result.precision == "fp16"
    parse = next(c for c in trt.calls if c[0] == "parse")
    assert parse[1] != str(onnx_path) and TensorProto_FLOAT16 in parse[2]
    build = next(c for c in trt.calls if c[0] == "build")
    assert build[1] == []  # no precision flags exist in TensorRT 11
    with pytest.raises(ExportError, match="strongly typed.*ModelOpt"):
        build_engine(onnx_path, tmp_path / "b.plan", bf16=True)
    assert not (tmp_path / "b.plan").exists()
    assert sorted(os.listdir(tmp_path)) == ["a.plan"]


TensorProto_FLOAT16 = onnx.TensorProto.FLOAT16


def test_parser_errors_one_line_each_and_no_engine(fake_trt, mlp_onnx, tmp_path):
    fake_trt(parse_errors=[("node_topk", "TopK", "K exceeds the maximum value"),
                           ("node_x", "Foo", "No importer registered\nfor op: Foo")])
    _, onnx_path = mlp_onnx
    with pytest.raises(ExportError) as exc:
        build_engine(onnx_path, tmp_path / "m.plan")
    lines = str(exc.value).splitlines()
    assert len(lines) == 3 and "refused" in lines[0]
    assert "'node_topk' (TopK): K exceeds" in lines[1] and lines[2].endswith("No importer registered for op: Foo")
    assert os.listdir(tmp_path) == []


def test_export_tensorrt_exports_checks_and_builds(tmp_path, monkeypatch):
    # The stand-in is handed to the exporter only: torch.export/torch.onnx probe `tensorrt` themselves.
    trt = make_fake_tensorrt("10.8.0", weak_typing=True)
    monkeypatch.setattr(trt_exporter, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_exporter, "require_cuda", lambda what: None)
    torch.manual_seed(0)
    built = trt_exporter.export_tensorrt(_MLP().eval(), tmp_path / "m.plan", (torch.randn(3, 16),), fp16=True,
                                         optimize=True)
    assert built.onnx.max_rel_diff <= 1e-4 and built.onnx.dynamic_batch
    assert built.profile == {"x": ((1, 16), (3, 16), (8, 16))}  # default batch range (1, B, max(8, B))
    assert [c[1] for c in trt.calls if c[0] == "build"] == [["FP16"]]
    assert os.listdir(tmp_path) == ["m.plan"]  # the intermediate ONNX is gone


def test_profiles_for_other_dynamic_dims(fake_trt, tmp_path):
    tokens = types.SimpleNamespace(name="tokens", shape=(-1, -1, 64))
    image = types.SimpleNamespace(name="image", shape=(-1, 3, 32, 32))
    fixed = types.SimpleNamespace(name="fixed", shape=(1, 4))
    network = types.SimpleNamespace(num_inputs=3, get_input=[tokens, image, fixed].__getitem__)
    with pytest.raises(ExportError, match=r"'tokens' has dynamic dim\(s\) \[1\].*shapes="):
        _profile_shapes(network, (1, 2, 4), {})
    shapes = {"tokens": ((1, 10, 64), (2, 50, 64), (4, 100, 64))}
    profile = _profile_shapes(network, (1, 2, 4), shapes)
    assert profile == {"tokens": shapes["tokens"], "image": ((1, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32))}
    with pytest.raises(ExportError, match="does not fit"):
        _profile_shapes(network, (1, 2, 4), {"tokens": ((1, 10, 65), (2, 50, 64), (4, 100, 64))})
    with pytest.raises(ExportError, match="unknown input"):
        _profile_shapes(network, (1, 2, 4), {"nope": ((1,), (1,), (1,))})


def test_trt_version_detection():
    ten = make_fake_tensorrt("10.3.0", weak_typing=True)
    eleven = make_fake_tensorrt("11.0.1", weak_typing=False)
    assert trt_capabilities(ten) == {"major": 10, "version": "10.3.0", "weak_typing": True}
    assert trt_capabilities(eleven) == {"major": 11, "version": "11.0.1", "weak_typing": False}


def test_parse_range():
    assert parse_range("1:4:16") == (1, 4, 16) and parse_range("8") == (8, 8, 8)
    for bad in ("4:2:8", "0:1:2", "a:b:c", "1:2"):
        with pytest.raises(ExportError):
            parse_range(bad)


def test_no_gpu_is_an_error(fake_trt, mlp_onnx, tmp_path, monkeypatch):
    fake_trt()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExportError, match="needs an NVIDIA GPU"):
        build_engine(mlp_onnx[1], tmp_path / "m.plan")


def test_missing_tensorrt_says_how_to_install(mlp_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(ExportError) as exc:
        build_engine(mlp_onnx[1], tmp_path / "m.plan")
    assert str(exc.value) == TENSORRT_MISSING
    with pytest.raises(ExportError, match=r"pip install 'dittofx\[tensorrt\]'"):
        trt_exporter.export_tensorrt(_MLP(), tmp_path / "m.plan", (torch.randn(2, 16),))
    assert os.listdir(tmp_path) == []


def test_cli_build_engine_errors(mlp_onnx, tmp_path, capsys, monkeypatch):
    from tests.exporters.test_onnx import run_cli

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert run_cli(["build-engine", str(mlp_onnx[1]), "-o", str(tmp_path / "m.plan")]) == 2
    assert "pip install 'dittofx[tensorrt]'" in capsys.readouterr().err
    assert run_cli(["build-engine", str(mlp_onnx[1]), "-o", str(tmp_path / "m.plan"), "--batch", "8:1:2"]) == 2
    assert "MIN:OPT:MAX" in capsys.readouterr().err
    assert run_cli(["build-engine", str(mlp_onnx[1]), "-o", str(tmp_path / "m.plan"), "--fp16", "--bf16"]) == 2


def test_fp16_conversion_for_strongly_typed_builds_runs_in_onnxruntime(mlp_onnx, tmp_path):
    model, onnx_path = mlp_onnx
    out = tmp_path / "mlp16.onnx"
    convert_onnx_to_fp16(onnx_path, out)
    converted = onnx.load(out)
    assert {i.data_type for i in converted.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert converted.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # io kept float32
    x = torch.randn(3, 16)
    got = OnnxRuntimeRunner(out)(x)[0]
    ref = model(x).detach()
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-2


# -- real TensorRT (GPU) ---------------------------------------------------------------------------


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_engine_matches_pytorch_at_several_batches(mlp_onnx, tmp_path):
    needs_real_tensorrt()
    from dittofx.runtime import TensorRTRunner

    model, onnx_path = mlp_onnx
    cache = tmp_path / "timing.cache"
    built = build_engine(onnx_path, tmp_path / "mlp.plan", batch=(1, 2, 8), timing_cache=cache)
    assert cache.is_file() and os.path.getsize(built.path) > 0
    runner = TensorRTRunner(built.path)
    assert runner.input_names == ["x"] and runner.output_names == ["output"]
    for batch in (1, 3, 8):
        x = torch.randn(batch, 16)
        (got,) = runner(x)
        assert got.is_cuda and got.shape == (batch, 4)
        ref = model(x).detach()
        assert float((got.cpu() - ref).abs().max() / ref.abs().max()) < 1e-3
    # fp16 (TensorRT 10: builder flag; 11: converted ONNX), timing cache reused
    built16 = build_engine(onnx_path, tmp_path / "mlp16.plan", fp16=True, batch=(1, 2, 8), timing_cache=cache)
    (got,) = TensorRTRunner(built16.path)(np.random.randn(2, 16).astype(np.float32))
    assert got.shape == (2, 4)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_engine_with_scatter_add_and_data_dependent_output(tmp_path):
    needs_real_tensorrt()
    from dittofx.runtime import TensorRTRunner

    class M(nn.Module):
        def forward(self, x, index):
            merged = torch.zeros(x.shape[0], 4, x.shape[2]).scatter_add(1, index, x)
            return merged, torch.nonzero(x[0] > 0)

    x, index = torch.randn(2, 16, 8), torch.randint(0, 4, (2, 16, 8))
    exported = export_onnx(M(), tmp_path / "m.onnx", (x, index), dynamic_batch=False)
    built = build_engine(exported.path, tmp_path / "m.plan", batch=None)
    merged, nz = TensorRTRunner(built.path)(x, index)
    ref_merged, ref_nz = M()(x, index)
    assert torch.allclose(merged.cpu(), ref_merged, atol=1e-4)
    assert torch.equal(nz.cpu().long(), ref_nz)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_export_tensorrt(tmp_path):
    needs_real_tensorrt()
    from dittofx.exporters.tensorrt import export_tensorrt
    from dittofx.runtime import TensorRTRunner

    torch.manual_seed(0)
    model = _MLP().eval()
    built = export_tensorrt(model, tmp_path / "m.plan", (torch.randn(1, 16),))
    assert built.onnx.max_rel_diff <= 1e-4 and built.profile["x"] == ((1, 16), (1, 16), (8, 16))
    assert sorted(os.listdir(tmp_path)) == ["m.plan"]
    x = torch.randn(5, 16)
    assert float((TensorRTRunner(built.path)(x)[0].cpu() - model(x).detach()).abs().max()) < 1e-3
