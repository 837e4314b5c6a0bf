"""Every script in examples/ runs in its --fast mode (a tiny random model), as a user would run it."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

# script -> (pass modules it needs, what its output must contain, slow?)
CASES = {
    "timm_vit_tome_onnx.py": (["tome"], ["ToMe r=8", "onnxruntime ToMe vs PyTorch untouched: cosine",
                                          "onnxruntime ToMe r=8"], True),
    "hf_vit_tome.py": (["tome"], ["tome: merged 8 tokens", "ToMe r=8 vs untouched: cosine"], False),
    "diffusers_dit_pab.py": (["pab"], ["timestep input 'timestep'", "PAB vs untouched over 10 steps: PSNR"], False),
    "videomae_rlt_tome.py": (["rlt", "tome"], ["rlt:tau=0.1: cosine", "RLT kept", "tome:r=4"], False),
    "videomae_rlt_finetune.py": (["rlt"], ["(the labels)", "step 8/8  RLT: loss", "kept", "(stride 1 ",
                                           "RLT loss: first", "(down)", "time per training step: RLT speed-up",
                                           "length embedding (4, 32)"], False),
    "timm_vit_tome_train.py": (["tome"], ["tokens entering each block [65, 57, 49, 41]", "step 8/8  ToMe r=8: loss",
                                          "ToMe loss: first", "(down)", "time per training step: ToMe speed-up",
                                          "same prediction"], False),
}
# tensorrt_engine.py: test_tensorrt_example below (its output depends on what the machine has)


def _missing(passes):
    return [p for p in passes if importlib.util.find_spec(f"dittofx.passes.{p}") is None]


def _run(script):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--fast"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_every_example_is_covered():
    scripts = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py") and not f.startswith("_"))
    assert scripts == sorted([*CASES, "tensorrt_engine.py"])


@pytest.mark.parametrize("script", [
    pytest.param(name, marks=pytest.mark.slow) if slow else name for name, (_, _, slow) in CASES.items()
])
def test_example_runs_in_fast_mode(script):
    passes, expected, _ = CASES[script]
    missing = _missing(passes)
    if missing:
        pytest.skip(f"{script} needs dittofx.passes.{', dittofx.passes.'.join(missing)}, not in this checkout yet")
    result = _run(script)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stdout, f"{script}: {text!r} not in its output:\n{result.stdout[-3000:]}"


def _tensorrt_and_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    import torch

    return torch.cuda.is_available()


def test_tensorrt_example():
    """With tensorrt and a GPU it builds and runs engines; without, it says what it needs and exits 0."""
    if _missing(["tome"]):
        pytest.skip("tensorrt_engine.py needs dittofx.passes.tome, not in this checkout yet")
    result = _run("tensorrt_engine.py")
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    if _tensorrt_and_gpu():
        assert "engine:" in result.stdout and "TensorRT ToMe vs PyTorch untouched: cosine" in result.stdout
    else:
        assert "TensorRT engine skipped" in result.stdout and "NVIDIA GPU" in result.stdout


def test_dit_pab_full_mode_says_which_phase_and_step(tmp_path):
    """Full mode (minutes on a real DiT) announces each phase and shows step k of n of every generation."""
    if _missing(["pab"]):
        pytest.skip("diffusers_dit_pab.py needs dittofx.passes.pab, not in this checkout yet")
    spec = importlib.util.spec_from_file_location("diffusers_dit_pab", os.path.join(EXAMPLES, "diffusers_dit_pab.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.tiny_pipeline().save_pretrained(tmp_path / "dit")  # a local pipeline folder, as full mode takes
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "2")
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, "diffusers_dit_pab.py"), "--model-dir",
                             str(tmp_path / "dit"), "--steps", "3", "--labels", "1,2"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    for text in ("loading the pipeline", "capturing the transformer", "8 generations of 2 images, 3 steps each"):
        assert text in result.stdout, result.stdout
    for what in ("1/8 untouched (reference)", "2/8 PAB", "3/8 timing round 1/3: untouched",
                 "8/8 timing round 3/3: PAB"):
        assert what in result.stderr, result.stderr[-3000:]
    assert "| 3/3 [" in result.stderr  # step 3 of 3 on a generation's bar
