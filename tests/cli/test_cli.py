"""The command line: inspect, errors as one line with exit code 2 and no traceback."""

import subprocess
import sys
import textwrap

import pytest

from dittofx.cli import main


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_names_every_block(capsys):
    code, out, _ = cli(capsys, "inspect", "zoo:latte", "--quiet")
    assert code == 0
    lines = out.splitlines()
    for i in range(2):
        assert any(ln.startswith(f"transformer_blocks.{i} ") and "spatial+cross" in ln for ln in lines)
        assert any(ln.startswith(f"temporal_transformer_blocks.{i} ") and "temporal" in ln for ln in lines)
    assert "timestep input: timestep" in out


@pytest.mark.slow
def test_inspect_timm_vit_small_names_all_12_blocks(capsys):
    code, out, _ = cli(capsys, "inspect", "timm:vit_small_patch16_224", "--quiet")
    assert code == 0
    for i in range(12):
        assert any(ln.startswith(f"blocks.{i} ") and "tokens=197" in ln and "prefix=1" in ln
                   for ln in out.splitlines()), i


MODELS = textwrap.dedent("""
    import torch
    from torch import nn

    def mlp():
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval(), (torch.randn(2, 8),)

    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x

    def data_dependent():
        return DataDependent(), (torch.randn(2, 8),)

    def exits():
        import sys
        sys.exit(3)

    def coloured():
        raise ValueError("\\x1b[31mno such layer\\x1b[0m\\nsecond line")
""")


@pytest.fixture
def models_file(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path


@pytest.mark.parametrize("argv, words", [
    (["inspect", "{file}:mlp"], ["no attention found"]),
    (["inspect", "{file}:data_dependent"], ["could not capture", "control flow"]),
    (["inspect", "zoo:vit", "--pass", "nope"], ["unknown pass 'nope'"]),
    (["inspect", "zoo:vit", "--pass", "sdpa:bogus=1"], ["unknown option 'bogus'"]),
    (["inspect", "nope:thing"], ["nope:thing"]),
    (["inspect", "zoo:not_a_model"], ["unknown zoo model"]),
    (["inspect", "{file}:missing_function"], ["missing_function"]),
    (["inspect", "zoo:vit", "--input-shape", "3,x"], ["--input-shape"]),
    (["inspect", "zoo:vit", "--input-shape", "3,99999999,99999999"], ["(1, 3, 99999999, 99999999)", "2^31"]),
    (["inspect", "zoo:vit", "--pass", "sdpa:args=1"], ["unknown option 'args' for pass sdpa; accepted: none"]),
    (["inspect", "zoo:vit", "--pass", "tome:r=4,r=8"], ["option 'r' is given twice"]),
    (["inspect", "zoo:latte", "--pass", "pab", "--pass", "pab"], ["pass pab is given twice"]),
    (["inspect", "zoo:videomae", "--pass", "rlt:tau=1e309"], ["tau=1e309 is not a finite number"]),
    (["inspect", "{file}:exits"], ["exits() called sys.exit(3)"]),
    (["inspect", "hf:nobody-here/no-such-model"], ["nor in the local Hugging Face cache", "--pretrained"]),
])
def test_user_errors_are_one_line_exit_2(capsys, models_file, argv, words):
    argv = [a.format(file=models_file) for a in argv]
    code, out, err = cli(capsys, *argv, "--quiet")
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]


def test_console_script_runs_without_traceback(models_file):
    proc = subprocess.run([sys.executable, "-m", "dittofx", "inspect", f"{models_file}:mlp", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("dittofx: error: no attention found")


def test_demo_runs_the_main_job_on_a_small_model(capsys):
    code, out, _ = cli(capsys, "demo", "--model", "zoo:vit", "--r", "8", "--batch", "2", "--rounds", "1", "--quiet")
    assert code == 0
    rows = {ln.split("│")[1].strip(): ln for ln in out.splitlines() if ln.startswith("│")}
    assert set(rows) == {"eager untouched", "eager ToMe r=8", "onnxruntime untouched", "onnxruntime ToMe r=8"}
    # the untouched ONNX agrees with PyTorch; ToMe changes the output a little
    assert "1.0000" in rows["onnxruntime untouched"] and "100%" in rows["onnxruntime untouched"]


def test_export_pab_writes_a_folder_of_patterns(capsys, tmp_path):
    import json

    code, _, _ = cli(capsys, "export", "zoo:cogvideox", "--pass", "pab", "-o", str(tmp_path / "pab"), "--quiet")
    assert code == 0
    manifest = json.loads((tmp_path / "pab" / "manifest.json").read_text())
    assert len(manifest["patterns"]) >= 2 and all((tmp_path / "pab" / p["file"]).exists() for p in manifest["patterns"])
    code, _, err = cli(capsys, "export", "zoo:cogvideox", "--pass", "pab", "-o", str(tmp_path / "pab.plan"), "--quiet")
    assert code == 2 and "one per broadcast pattern" in err and "Traceback" not in err
    assert not (tmp_path / "pab.plan").exists()


def test_error_lines_are_plain_text(capsys, models_file):
    code, _, err = cli(capsys, "inspect", f"{models_file}:coloured", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "\x1b" not in err, repr(err)
    assert err.endswith("raised ValueError: no such layer\n")
    code, _, err = cli(capsys, "inspect", "zoo:\x1b[2Jvit", "--quiet")  # the user's own input, quoted
    assert code == 2 and err.count("\n") == 1 and "\x1b" not in err, repr(err)


def test_file_model_exiting_at_import_is_one_line(capsys, tmp_path):
    (tmp_path / "script.py").write_text("import sys\nsys.exit('done')\n")
    code, _, err = cli(capsys, "inspect", f"{tmp_path / 'script.py'}:build", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "called sys.exit('done')" in err and "__main__" in err


def test_inspect_without_passes_shows_what_the_passes_accept(capsys):
    # hf_vit's attention carries an all-true mask: the canonicalisation every pass starts from drops it
    code, out, _ = cli(capsys, "inspect", "zoo:hf_vit", "--quiet")
    blocks = [ln for ln in out.splitlines() if ln.startswith("vit.layers.")]
    assert code == 0 and len(blocks) == 4 and all("passes=tome" in ln for ln in blocks), out
    assert "passes:" not in out  # nothing was asked for


def test_a_pass_that_changed_nothing_is_said(capsys):
    code, out, err = cli(capsys, "inspect", "zoo:vit", "--pass", "tome:r=0", "--quiet")
    said = "pass 'tome:r=0' changed nothing: "
    assert code == 0 and said in out
    assert [ln for ln in err.splitlines() if "changed nothing" in ln] == [
        "dittofx: warning: " + next(ln for ln in out.splitlines() if ln.startswith(said))]


def test_tune_suggests_an_export_of_the_same_model(tmp_path):
    import shlex

    from dittofx.cli import build_parser
    from dittofx.cli.tune import export_command

    weights = tmp_path / "my weights.safetensors"
    tuned = build_parser().parse_args(["tune", "timm:vit_tiny_patch16_224", "--weights", str(weights),
                                       "--input-shape", "3,64,64", "--pass", "tome"])
    words = shlex.split(export_command(tuned, "tome:r=(8,-0.5)"))
    assert words[:2] == ["dittofx", "export"]
    exported = build_parser().parse_args(words[1:])
    for flag in ("model", "weights", "pretrained", "input_shape"):  # everything that selects the model
        assert getattr(exported, flag) == getattr(tuned, flag), flag
    assert exported.passes == ["tome:r=(8,-0.5)"] and exported.output == "model.onnx"

    tuned = build_parser().parse_args(["tune", "timm:vit_tiny_patch16_224", "--pretrained", "--pass", "pab"])
    exported = build_parser().parse_args(shlex.split(export_command(tuned, "pab:spatial=2"))[1:])
    assert exported.pretrained and exported.weights is None
    assert exported.output.endswith("/")  # a PAB export is a folder
