"""Exports under bad input and faults: tolerances checked up front, an elementwise parity gate (and RLT
checked where it drops tubelets), a full disk, an unwritable folder, SIGTERM, symbolic links, the PAB
folder's permissions and progress, damaged PAB folders. Each failure is one line and leaves nothing."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import dittofx
from dittofx.cli import main
from dittofx.errors import ExportError
from dittofx.exporters import onnx as onnx_exporter
from dittofx.exporters.onnx import export_onnx
from dittofx.exporters.onnx_pab import export_pab_onnx
from dittofx.exporters.verify import worst_element
from dittofx.models import zoo
from dittofx.runtime import OnnxRuntimeRunner
from dittofx.runtime.onnxruntime import OnnxPABRunner

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BAD_TOLERANCES = ["x", -1.0, float("nan"), float("inf"), True, None]


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dittofx: error: ") and "Traceback" not in err, err
    return err


class _Explodes(nn.Module):
    def forward(self, x):
        raise AssertionError("the export must not start")


MODEL_FILE = '''
import os
import torch
from torch import nn

def build():
    if os.environ.get("DITTOFX_TEST_MARKER"):
        open(os.environ["DITTOFX_TEST_MARKER"], "w").close()
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 3)).eval(), (torch.randn(2, 12),)
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(textwrap.dedent(MODEL_FILE))
    return f"{path}:build"


# -- tolerances ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_TOLERANCES)
def test_bad_tolerances_are_refused_before_any_work(tmp_path, bad):
    from dittofx.exporters.tensorrt import export_tensorrt

    x = torch.randn(1, 3)
    for kwargs in ({"rtol": bad}, {"atol": bad}):
        name = next(iter(kwargs))
        with pytest.raises(ExportError, match=f"^{name} must be a finite number >= 0") as e:
            export_onnx(_Explodes(), tmp_path / "m.onnx", (x,), **kwargs)
        assert "\n" not in str(e.value)
        with pytest.raises(ExportError, match=f"^{name} must be a finite number >= 0"):
            export_pab_onnx(_Explodes(), tmp_path / "pab", (x,), **kwargs)  # before looking at the module
        with pytest.raises(ExportError, match=f"^{name} must be a finite number >= 0"):
            export_tensorrt(_Explodes(), tmp_path / "m.plan", (x,), **kwargs)  # before looking for TensorRT
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flag, value", [("--rtol", "-1"), ("--rtol", "nan"), ("--atol", "inf"), ("--atol", "-0.5")])
def test_cli_refuses_bad_tolerances_before_loading_the_model(tmp_path, model_file, monkeypatch, capsys, flag,
                                                             value):
    marker = tmp_path / "loaded"
    monkeypatch.setenv("DITTOFX_TEST_MARKER", str(marker))
    for extra in ([], ["--pass", "pab"]):
        assert main(["export", model_file, "-o", str(tmp_path / "m.onnx"), f"{flag}={value}", "--quiet", *extra]) == 2
        assert f"{flag[2:]} must be a finite number >= 0" in _one_line_error(capsys)
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


# -- the parity gate -------------------------------------------------------------------------------


def test_worst_element_is_numpy_allclose_elementwise():
    rng = np.random.default_rng(0)
    for trial in range(200):
        ref = rng.standard_normal((4, 5)) * 10.0 ** rng.integers(-3, 7, (4, 5))  # mixed scales
        got = ref + rng.standard_normal((4, 5)) * 10.0 ** rng.integers(-9, 1)
        rtol, atol = 10.0 ** rng.integers(-6, -2), 10.0 ** rng.integers(-8, -3)
        found = worst_element(got, ref, rtol, atol)
        assert (found is None) == np.allclose(got, ref, rtol=rtol, atol=atol), trial
        if found is not None:
            ratio = np.abs(got - ref) / (atol + rtol * np.abs(ref))
            index = np.unravel_index(np.argmax(ratio), ref.shape)
            assert found == (tuple(int(i) for i in index), got[index], ref[index])
    # NaN where PyTorch has NaN and the same infinity agree; NaN elsewhere is the worst element
    ref = np.array([np.nan, np.inf, 1.0, 2.0])
    assert worst_element(np.array([np.nan, np.inf, 1.0, 2.0]), ref, 0.0, 0.0) is None
    assert worst_element(np.array([np.nan, np.inf, 1.5, np.nan]), ref, 1e-4, 1e-4)[0] == (3,)
    assert worst_element(np.array([1.0, -np.inf, 1.0, 2.0]), ref, 1e-4, 1e-4)[0] == (0,)


class _MixedScale(nn.Module):
    """One 1e6 element next to torch's scatter_reduce(mean), which onnxruntime computes wrongly (torch
    exports it as ScatterElements(reduction="none")): the old max-scaled gate saw 2 / 1e6."""

    def forward(self, x, index):
        mean = torch.zeros(x.shape[0], 4, x.shape[2]).scatter_reduce(1, index, x, reduce="mean", include_self=False)
        return torch.cat([torch.full((x.shape[0], 1), 1e6), mean.flatten(1)], dim=1)


def test_a_wrong_element_beside_a_large_one_is_refused(tmp_path):
    torch.manual_seed(0)
    x, index = torch.randn(2, 16, 8), torch.randint(0, 4, (2, 16, 8))
    unchecked = export_onnx(_MixedScale(), tmp_path / "unchecked.onnx", (x, index), check=False)
    got = OnnxRuntimeRunner(unchecked.path)(x, index)[0]
    ref = _MixedScale()(x, index)
    assert float((got - ref).abs().max()) > 0.1 and float(ref.abs().max()) == 1e6  # wrong, hidden by the scale
    with pytest.raises(ExportError) as e:
        export_onnx(_MixedScale(), tmp_path / "mixed.onnx", (x, index))
    text = str(e.value)
    assert "\n" not in text and "differs from PyTorch on output 'output'" in text and "not written" in text
    worst = np.abs(got.numpy() - ref.numpy()) / (1e-4 + 1e-4 * ref.abs().numpy())  # the default tolerances
    b, i = np.unravel_index(np.argmax(worst), worst.shape)
    assert f"at index [{b}, {i}] onnx gives {float(got[b, i]):.6g}, torch {float(ref[b, i]):.6g}" in text
    assert not (tmp_path / "mixed.onnx").exists() and _leftovers(tmp_path) == []


def _keep_every_tubelet(path) -> None:
    """Break an RLT export the way a wrong tokenizer would: its first NonZero (the tokens kept) reads
    `keep OR true`, so the file keeps every token, as on random clips, whatever the input."""
    model = onnx.load(path, load_external_data=False)
    graph = model.graph
    node = next(n for n in graph.node if n.op_type == "NonZero")
    graph.initializer.append(onnx.helper.make_tensor("keep_all", onnx.TensorProto.BOOL, [], [True]))
    graph.node.insert(list(graph.node).index(node), onnx.helper.make_node("Or", [node.input[0], "keep_all"],
                                                                          ["kept_or_all"]))
    node.input[0] = "kept_or_all"
    onnx.save(model, path)


def test_rlt_export_is_checked_where_tubelets_are_dropped(tmp_path, monkeypatch):
    """The zoo VideoMAE's example is noise, on which RLT drops nothing: the check also runs the example
    with static clips, so an export that drops nothing is refused."""
    zm = zoo.build("videomae", batch=2)
    opt = dittofx.optimize(zm.model, ["rlt"], zm.example_inputs)
    with torch.no_grad():
        opt(*zm.example_inputs)
    assert opt.report.stats["rlt"].kept == [64, 64]  # nothing dropped on the example
    check = onnx_exporter.check_in_onnxruntime
    seen = []

    def broken_check(path, in_names, out_names, checks, rtol, atol, rerun=None):
        seen.extend(what for what, _, _ in checks)
        _keep_every_tubelet(path)
        assert rerun is not None  # RLT chooses: static clips perturbed keep failing, the refusal stands
        return check(path, in_names, out_names, checks, rtol, atol, rerun)

    monkeypatch.setattr(onnx_exporter, "check_in_onnxruntime", broken_check)
    with pytest.raises(ExportError, match=r"differs from PyTorch on output 'logits' on the example with static "
                                          r"clips.*not written"):
        export_onnx(opt, tmp_path / "rlt.onnx", zm.example_inputs)
    assert seen == ["the example", "the example with static clips"]  # the example itself passed
    assert os.listdir(tmp_path) == []
    assert opt.report.stats["rlt"].kept == [64, 64]  # the report still shows the user's last forward


# -- files: a full disk, symbolic links, signals ---------------------------------------------------


def _full_disk(monkeypatch):
    """ONNXProgram.save writes part of the file, then the disk is full."""

    def save(self, destination, *args, **kwargs):
        with open(destination, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination))

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", save)


def test_full_disk_during_export_is_one_error_and_leaves_nothing(tmp_path, model_file, monkeypatch, capsys):
    _full_disk(monkeypatch)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous export")
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ExportError, match=f"cannot write {out}: No space left on device; nothing was written"):
        export_onnx(model, out, (torch.randn(2, 4),))
    assert out.read_bytes() == b"previous export" and _leftovers(tmp_path) == []
    assert main(["export", model_file, "-o", str(tmp_path / "cli.onnx"), "--quiet"]) == 2
    assert "No space left on device" in _one_line_error(capsys)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "mymodel.py"]


def test_export_to_a_symbolic_link_writes_through_it(tmp_path):
    real = tmp_path / "real.onnx"
    real.write_bytes(b"previous export")
    link = tmp_path / "link.onnx"
    link.symlink_to(real)
    model = nn.Sequential(nn.Linear(4, 2))
    result = export_onnx(model, link, (torch.randn(2, 4),))
    assert link.is_symlink() and os.readlink(link) == str(real) and result.path == str(real)
    x = torch.randn(3, 4)
    torch.testing.assert_close(OnnxRuntimeRunner(link)(x)[0], model(x).detach(), rtol=1e-4, atol=1e-5)
    assert real.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert sorted(os.listdir(tmp_path)) == ["link.onnx", "real.onnx"]


def _unwritable_dir(tmp_path) -> str:
    """A folder this process cannot write in (as root: sysfs, where even root cannot create files)."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return str(ro)
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except PermissionError:
        return "/sys"
    except OSError:
        pytest.skip("no folder here refuses root")
    os.close(fd)
    os.remove(probe)
    pytest.skip("no folder here refuses root")


def test_unwritable_pab_folder_is_refused_before_loading(tmp_path, capsys):
    parent = _unwritable_dir(tmp_path)
    start = time.perf_counter()
    assert main(["export", "zoo:latte", "--pass", "pab", "-o", os.path.join(parent, "x"), "--quiet"]) == 2
    assert f"cannot write to {parent}" in _one_line_error(capsys)
    assert time.perf_counter() - start < 5  # refused before the model is built
    assert not os.path.exists(os.path.join(parent, "x"))


RUNNER = '''
import os, sys, time
from dittofx.exporters import onnx as onnx_exporter

def stalled(path, *args, **kwargs):  # the export is mid-way: its file is in the staging folder
    open(os.environ["DITTOFX_TEST_STALLED"], "w").close()
    time.sleep(120)

onnx_exporter.check_tensorrt_readiness = stalled
from dittofx.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_export_leaves_nothing_behind(tmp_path, model_file, sig, status):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script = tmp_path / "run.py"
    script.write_text(RUNNER)
    marker = tmp_path / "stalled"
    env = dict(os.environ, DITTOFX_TEST_STALLED=str(marker), PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), "export", model_file, "-o", str(out_dir / "m.onnx")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() or not _leftovers(out_dir):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        staged = _leftovers(out_dir)
        assert len(staged) == 1 and staged[0].startswith(".m.onnx.") and staged[0].endswith(".tmp")
        assert os.listdir(out_dir / staged[0]) == ["m.onnx"]  # the file being checked
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, err
    assert "Traceback" not in err
    assert os.listdir(out_dir) == []


# -- PAB folders -----------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.titles: list[str] = []

    def emit(self, record):
        if getattr(record, "dittofx_stage", None) == "done":
            self.titles.append(record.title)


@pytest.fixture(scope="module")
def pab(tmp_path_factory):
    """A PAB CogVideoX exported through a dangling symbolic link (to a folder not yet there), with the
    stages it logged."""
    zm = zoo.build("cogvideox")
    opt = dittofx.optimize(zm.model, ["pab"], zm.example_inputs, zm.example_kwargs)
    root = tmp_path_factory.mktemp("pab")
    link = root / "link"
    link.symlink_to(root / "real")
    records = _Records()
    log = logging.getLogger("dittofx")
    level = log.level
    log.addHandler(records)
    log.setLevel(logging.DEBUG)
    try:
        export = export_pab_onnx(opt, link, timesteps=[900, 500, 450, 400])
    finally:
        log.removeHandler(records)
        log.setLevel(level)
    return zm, opt, root, export, records.titles


def test_pab_folder_follows_the_umask_and_the_link_stays(pab):
    _, _, root, export, _ = pab
    real = root / "real"
    assert (root / "link").is_symlink() and export.directory == os.path.realpath(real)
    assert real.stat().st_mode & 0o777 == 0o777 & ~_umask()
    files = sorted(os.listdir(real))
    assert files == sorted(["manifest.json", "weights.bin", *export.files]) and len(export.files) == 2
    for name in files:
        assert (real / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name
    assert _leftovers(root) == []


def test_pab_export_shows_which_pattern_it_writes(pab):
    *_, export, titles = pab
    n = len(export.files)
    for k, name in enumerate(export.files, 1):
        assert f"pattern {k}/{n} ({name}): export ONNX" in titles
        assert f"pattern {k}/{n} ({name}): check in onnxruntime" in titles


def test_pab_export_honours_the_tolerances(pab, tmp_path):
    _, opt, *_ = pab
    with pytest.raises(ExportError, match=r"differs from PyTorch.*beyond atol 0 \+ rtol 0 x"):
        export_pab_onnx(opt, tmp_path / "exact", timesteps=[900, 500], rtol=0.0, atol=0.0)
    assert os.listdir(tmp_path) == []


def test_pab_export_refuses_empty_timesteps(pab, tmp_path):
    _, opt, *_ = pab
    with pytest.raises(ExportError, match="timesteps is empty.*nothing to export"):
        export_pab_onnx(opt, tmp_path / "none", timesteps=[])
    assert os.listdir(tmp_path) == []


def test_full_disk_during_pab_export_is_one_error_and_leaves_nothing(pab, tmp_path, monkeypatch):
    _, opt, *_ = pab
    _full_disk(monkeypatch)
    out = tmp_path / "pab"
    with pytest.raises(ExportError, match=f"cannot write {out}: No space left on device; nothing was written"):
        export_pab_onnx(opt, out, timesteps=[900, 500])
    assert os.listdir(tmp_path) == []


def _damaged(pab, tmp_path, damage) -> str:
    folder = tmp_path / "damaged"
    shutil.copytree(pab[2] / "real", folder)
    damage(folder)
    return str(folder)


def _edit_manifest(edit):
    def damage(folder):
        data = json.loads((folder / "manifest.json").read_text())
        edit(data)
        (folder / "manifest.json").write_text(json.dumps(data))

    return damage


@pytest.mark.parametrize("damage, what", [
    (lambda f: (f / "manifest.json").unlink(), "has no manifest.json"),
    (lambda f: (f / "manifest.json").write_text('{"format": "dittofx-pab/1", "inputs": ['), "cannot be read"),
    (lambda f: (f / "manifest.json").write_bytes(b"\xff\xfe\x00"), "cannot be read"),
    (lambda f: (f / "manifest.json").write_text("[1, 2]"), "is not a dittofx-pab/1 manifest"),
    (_edit_manifest(lambda d: d.pop("patterns")), "is damaged (KeyError"),
    (_edit_manifest(lambda d: d["patterns"][0].pop("file")), "is damaged (TypeError"),
    (_edit_manifest(lambda d: d.update(patterns=[])), "lists no pattern file"),
    (_edit_manifest(lambda d: d["patterns"][0]["computes"].append(True)), "is inconsistent"),
    (_edit_manifest(lambda d: next(iter(d["weights"]["tensors"].values())).__setitem__(2, "bogus")),
     "is damaged (TypeError"),
    (_edit_manifest(lambda d: next(iter(d["weights"]["tensors"].values())).__setitem__(1, 3)), "do not hold"),
    (lambda f: (f / "pab_00.onnx").unlink(), "is missing pab_00.onnx"),
    (lambda f: (f / "weights.bin").unlink(), "is missing weights.bin"),
    (lambda f: os.truncate(f / "weights.bin", 100), "weights.bin is cut short"),
])
def test_damaged_pab_folder_is_one_line_naming_it(pab, tmp_path, damage, what):
    folder = _damaged(pab, tmp_path, damage)
    with pytest.raises(ExportError) as e:
        OnnxPABRunner(folder, providers=["CPUExecutionProvider"])
    text = str(e.value)
    assert "\n" not in text and folder in text and what in text, text


def test_pab_runner_refuses_a_wrong_input_without_moving_its_schedule(pab):
    zm, _, root, _, _ = pab
    (x,), kwargs = zm.example_inputs, zm.example_kwargs
    runner = OnnxPABRunner(root / "real", providers=["CPUExecutionProvider"])
    with pytest.raises(ExportError, match=r"input 'hidden_states' has shape \(2, 3, 4, 16\), the model expects "
                                          r"\(batch, 3, 4, 16, 16\)"):
        runner(x[..., 0], **kwargs)
    with pytest.raises(ExportError, match=r"input 'encoder_hidden_states' has batch = 1 .* but input "
                                          r"'hidden_states' has batch = 2"):
        runner(x, **{**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"][:1]})
    assert sum(runner.state.computed) == 0  # refused before the schedule counted a call
    fresh = OnnxPABRunner(root / "real", providers=["CPUExecutionProvider"])
    torch.testing.assert_close(runner(x, **kwargs)[0], fresh(x, **kwargs)[0], rtol=0, atol=0)
