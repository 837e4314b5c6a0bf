"""`dittofx bench`, `dittofx tune` and `dittofx demo`, and the pieces under them: agreement metrics, FLOP
counts, workloads (the denoising loop, calibration inputs), sweeps and the tune search."""

import json
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F

from dittofx.cli import main
from dittofx.errors import DittoError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# bench, end to end


def test_bench_sweep_writes_json_table_and_png(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "sweep.png"
    code, stdout, err = cli(capsys, "bench", "zoo:vit", "--pass", "tome", "--sweep", "r=0:8:8", "--rounds", 1,
                            "--warmup", 0, "--batch", 2, "--json", out, "--plot", png, "--quiet")
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["kind"] == "classifier" and data["batch"] == 2 and data["sweep"] == "r" and data["metric"] == "cosine"
    assert [r["sweep_value"] for r in data["results"]] == ["0", "8"]
    r0, r8 = data["results"]
    assert r8["spec"] == "tome:r=8"
    # r=0 merges nothing: same outputs, same FLOPs
    assert r0["agreement"]["cosine"] == pytest.approx(1.0, abs=1e-6) and r0["agreement"]["top1"] == 1.0
    assert r0["flop_ratio"] == pytest.approx(1.0)
    # r=8 over 4 blocks of 65 tokens: fewer FLOPs, outputs close but not equal
    assert 1.2 < r8["flop_ratio"] < 2.0
    assert 0.9 < r8["agreement"]["cosine"] < 1.0
    for r in data["results"]:
        assert len(r["seconds"]) == 1 and r["latency_ms"] > 0 and r["speedup"] > 0
    assert data["baseline"]["flops"] > 0 and data["machine"]["torch"] == torch.__version__
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "tome:r=8" in stdout and "FLOP bound" in stdout


def test_bench_diffusion_model_runs_a_denoising_loop_with_psnr(tmp_path, capsys):
    out = tmp_path / "pab.json"
    code, stdout, err = cli(capsys, "bench", "zoo:dit", "--pass", "pab", "--sweep", "spatial=1,2", "--steps", 4,
                            "--rounds", 1, "--warmup", 0, "--json", out, "--plot", tmp_path / "pab.png", "--quiet")
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["kind"] == "diffusion" and data["metric"] == "psnr"
    assert data["steps"] == 4 and data["timesteps"] == [999, 666, 333, 0]
    never, every_other = data["results"]
    # spatial=1 computes every call (DiT has only spatial attention): identical to the untouched loop
    assert never["agreement"]["identical"] and never["agreement"]["psnr"] is None
    # spatial=2 reuses attention at t=666 (inside the window, call 1): close, not equal, fewer FLOPs
    assert not every_other["agreement"]["identical"] and 10 < every_other["agreement"]["psnr"] < 150
    assert every_other["flop_ratio"] > 1.0
    assert (tmp_path / "pab.png").read_bytes()[:8] == PNG_MAGIC
    assert "PSNR" in stdout and "4-step loop" in stdout


def test_bench_times_a_forward_at_batch_8_and_warns_when_it_is_too_short(tmp_path, capsys, monkeypatch):
    from dittofx.measure import timing

    monkeypatch.setattr(timing, "MIN_TIMED_SECONDS", 1e3)  # every run is "too short": the warning must show
    out = tmp_path / "bench.json"
    code, _, err = cli(capsys, "bench", "zoo:vit", "--pass", "tome:r=8", "--rounds", 1, "--warmup", 0,
                       "--json", out, "--quiet")
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["batch"] == 8 and data["agreement_samples"] == 8
    warning = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warning) == 1 and "a forward at batch 8" in warning[0] and "--batch " in warning[0], err


def test_bench_rlt_says_when_no_tubelet_was_dropped(capsys):
    code, _, err = cli(capsys, "bench", "zoo:videomae", "--pass", "rlt:tau=0.1", "--rounds", 1, "--warmup", 0,
                       "--batch", 2, "--quiet")
    assert code == 0, err
    assert "rlt dropped no tubelet" in err and "random noise has no static tubelets" in err and "--inputs" in err
    # the real clip shipped for the RLT benchmark (a slow pan): RLT drops tubelets, nothing to warn about
    clips = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "data")
    code, _, err = cli(capsys, "bench", "zoo:videomae", "--pass", "rlt:tau=0.1", "--rounds", 1, "--warmup", 0,
                       "--batch", 2, "--inputs", clips, "--quiet")
    assert code == 0, err
    assert "no tubelet" not in err, err


# ---------------------------------------------------------------------------------------------
# demo


def _demo_rows(out: str) -> dict:
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in ln.split("│")[1:-1]] for ln in out.splitlines()
                                              if ln.startswith("│"))}


def test_demo_is_reproducible_with_its_spread_and_says_random_weights_mean_little(capsys):
    argv = ["demo", "--model", "test_vit", "--r", "16", "--batch", "2", "--rounds", "2", "--no-onnx", "--quiet"]
    runs = []
    for _ in range(2):
        code, out, err = cli(capsys, *argv)
        assert code == 0, err
        runs.append(out)
    first, second = (_demo_rows(out) for out in runs)
    assert set(first) == {"eager untouched", "eager ToMe r=16"}
    # same seeded weights and inputs: the same agreement (cosine, top-1) in both runs
    assert [first[k][3:] for k in first] == [second[k][3:] for k in first]
    assert float(first["eager ToMe r=16"][3]) < 1.0
    assert "±" in first["eager ToMe r=16"][2]  # speed-up with its spread
    assert "median of 2 interleaved rounds" in runs[0] and "random weights" in runs[0]


def test_demo_inputs_are_the_tome_benchmarks():
    from dittofx.cli.demo import _benchmark_inputs

    example = (torch.randn(4, 3, 224, 224),)
    # benchmarks/tome.py: x = torch.rand(batch, 3, img, img, generator=torch.Generator().manual_seed(1))
    want = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_benchmark_inputs(example, seed=0)[0], want)
    latent = (torch.randn(2, 4, 16, 16),)  # not an image: the model's own example inputs
    assert _benchmark_inputs(latent, seed=0)[0] is latent[0]


def test_demo_runs_a_diffusion_transformer_with_its_keyword_inputs(capsys):
    code, out, err = cli(capsys, "demo", "--model", "zoo:dit", "--batch", "1", "--rounds", "1", "--no-onnx",
                         "--quiet")
    assert code == 0, err
    rows = _demo_rows(out)
    assert set(rows) == {"eager untouched", "eager ToMe ratio=0.5"}
    assert 0.9 < float(rows["eager ToMe ratio=0.5"][3]) < 1.0 and rows["eager ToMe ratio=0.5"][4] == "-"


# ---------------------------------------------------------------------------------------------
# tune, end to end


def test_tune_tome_meets_the_budget_and_the_next_setting_does_not(tmp_path, capsys):
    import dittofx
    from dittofx.models import zoo

    budget = 0.997
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "calibration.pt")
    out = tmp_path / "tune.json"
    code, stdout, err = cli(capsys, "tune", "zoo:vit", "--pass", "tome", "--min-agreement", budget,
                            "--inputs", tmp_path / "calibration.pt", "--batch", 3, "--json", out, "--quiet")
    assert code == 0, err
    data = json.loads(out.read_text())
    chosen, following = data["chosen"], data["next"]
    assert stdout.strip() == chosen  # --quiet: only the spec, ready for `dittofx export --pass`
    assert chosen.startswith("tome:r=") and following == f"tome:r={int(chosen.split('=')[1]) + 1}"
    assert data["samples"] == 6

    # an independent check of both settings on the same inputs
    model = zoo.build("vit").model
    with torch.no_grad():
        reference = model(x)
        cos = {}
        for spec in (chosen, following):
            opt = dittofx.optimize(model, [spec], example_inputs=(x[:2],))
            cos[spec] = F.cosine_similarity(opt(x), reference, dim=1).mean().item()
    assert cos[chosen] >= budget - 1e-5
    assert cos[following] < budget + 1e-5
    reported = {t["spec"]: t["metric"] for t in data["tried"]}
    assert reported[chosen] == pytest.approx(cos[chosen], abs=1e-4)
    assert reported[following] == pytest.approx(cos[following], abs=1e-4)


def test_search_picks_the_last_rung_within_and_measures_the_one_above():
    from dittofx.measure.tune import search

    values = [0.999, 0.998, 0.9985, 0.996, 0.994, 0.997, 0.98]  # not monotone: rung 5 passes again
    seen = []

    def evaluate(i):
        seen.append(i)
        return values[i] >= 0.995

    chosen, above = search(list(range(len(values))), evaluate)
    assert values[chosen] >= 0.995 and above == chosen + 1 and values[above] < 0.995
    assert chosen in seen and above in seen
    assert search([0, 1], lambda i: False) == (-1, 0)
    assert search([0, 1], lambda i: True) == (1, None)


def test_ladders_go_from_mild_to_aggressive():
    from dittofx.measure.tune import PAB_LADDER, ladder
    from dittofx.passes.spec import parse_pass

    image = types.SimpleNamespace(timestep_input=None, blocks=[types.SimpleNamespace(tokens=65, prefix=1)])
    what, rungs = ladder(parse_pass("tome:prop_attn=False"), image, None)
    assert what == "r" and [r.spec for r in rungs[:2]] == ["tome:r=1,prop_attn=False", "tome:r=2,prop_attn=False"]
    assert len(rungs) == 32
    _, rungs = ladder(parse_pass("tome"), image, -0.5)
    assert rungs[15].spec == "tome:r=(16,-0.5)"
    diffusion = types.SimpleNamespace(timestep_input="timestep", blocks=[])
    _, rungs = ladder(parse_pass("tome"), diffusion, None)
    assert rungs[0].spec == "tome:ratio=0.1" and rungs[-1].spec == "tome:ratio=0.9"
    _, rungs = ladder(parse_pass("rlt"), image, None)
    assert rungs[0].spec == "rlt:tau=0.0" and rungs[10].spec == "rlt:tau=0.1"
    _, rungs = ladder(parse_pass("pab:timestep_window=(50,900)"), diffusion, None)
    assert all("timestep_window=(50,900)" in r.spec for r in rungs)
    for mild, strong in zip(PAB_LADDER, PAB_LADDER[1:]):
        assert all((a or 1) <= (b or 1) for a, b in zip(mild, strong)) and mild != strong


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2, before any work


@pytest.mark.parametrize("argv, says", [
    (["bench", "zoo:vit"], "--pass"),
    (["bench", "zoo:vit", "--pass", "tome:q=1"], "unknown option 'q'"),
    (["bench", "zoo:vit", "--pass", "tome", "--sweep", "q=1:3:1"], "no pass in tome has option 'q'"),
    (["bench", "zoo:vit", "--pass", "tome", "--sweep", "r=8:0:1"], "START <= STOP"),
    (["bench", "zoo:vit", "--pass", "tome", "--sweep", "r=x:3:1"], "must be numbers"),
    (["bench", "zoo:vit", "--pass", "tome", "--sweep", "r=-1,2"], "tome: r must be"),
    (["bench", "zoo:vit", "--pass", "tome", "--sweep", "r=4,4"], "twice"),
    (["bench", "zoo:vit", "--pass", "tome", "--plot", "out.jpg"], "PNG"),
    (["bench", "zoo:vit", "--pass", "tome", "--json", "/no/such/dir/x.json"], "does not exist"),
    (["bench", "zoo:vit", "--pass", "tome", "--rounds", "0"], "--rounds"),
    (["bench", "zoo:vit", "--pass", "tome", "--batch", "0"], "--batch must be at least 1"),
    (["demo", "--model", "zoo:vit", "--ratio", "1.5"], "--ratio must be in [0, 1)"),
    (["bench", "zoo:vit", "--pass", "tome", "--runtime", "tvm"], "invalid choice"),
    (["tune", "zoo:vit", "--pass", "sdpa"], "tune searches tome, rlt, pab"),
    (["tune", "zoo:dit", "--pass", "pab", "--metric", "psnr", "--min-agreement", "0.99"], "PSNR is in dB"),
    (["tune", "zoo:vit", "--pass", "tome", "--inputs", "/no/such/inputs.pt"], "no such file or folder"),
    (["tune", "zoo:vit", "--pass", "tome", "--steps", "0"], "--steps"),
])
def test_bad_options_are_one_line_with_exit_code_2(capsys, argv, says):
    code, out, err = cli(capsys, *argv)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in err, err


def test_tensorrt_runtime_without_tensorrt_is_one_line(capsys):
    try:
        import tensorrt  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("tensorrt and a GPU are present")
    except ImportError:
        pass
    code, _, err = cli(capsys, "bench", "zoo:vit", "--pass", "tome:r=4", "--runtime", "tensorrt")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "tensorrt" in err.lower()


# ---------------------------------------------------------------------------------------------
# sweeps


def test_sweep_ranges_include_stop_and_lists_keep_tuples():
    from dittofx.measure.bench import parse_sweep

    key, index, points = parse_sweep("r=0:24:4", ["tome"])
    assert key == "r" and index == 0 and [p[0] for p in points] == ["0", "4", "8", "12", "16", "20", "24"]
    assert points[1][1] == ["tome:r=4"]
    _, _, points = parse_sweep("tau=0:0.3:0.1", ["rlt"])
    assert [p[0] for p in points] == ["0", "0.1", "0.2", "0.3"]
    _, index, points = parse_sweep("r=(8,-0.5),(16,-0.5)", ["rlt:tau=0.1", "tome"])
    assert index == 1 and points[1][1] == ["rlt:tau=0.1", "tome:r=(16,-0.5)"]
    _, _, points = parse_sweep("spatial=1,3", ["pab:cross=None"])
    assert points[1][1][0].startswith("pab:spatial=3,temporal=4,cross=None")


# ---------------------------------------------------------------------------------------------
# agreement, FLOPs, workloads


def test_agreement_metrics():
    from dittofx.measure.agreement import Agreement, agreement, cosine, psnr, top1

    ref = torch.tensor([[1.0, -1.0], [0.5, -0.5]])
    assert psnr(ref, ref) == math.inf
    assert psnr(ref + 0.1, ref) == pytest.approx(10 * math.log10(4 / 0.01))  # range 2, MSE 0.01
    assert cosine(2 * ref, ref) == pytest.approx(1.0)
    assert top1(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), ref) == 0.5
    a = agreement(ref, ref, "diffusion")
    assert a.as_dict()["identical"] and a.as_dict()["psnr"] is None and a.meets("psnr", 1000)
    with pytest.raises(DittoError, match="does not apply"):
        Agreement("features", 1.0).value("top1")


def test_flops_of_a_linear():
    from dittofx.measure.flops import count_flops

    layer = torch.nn.Linear(8, 4)
    assert count_flops(lambda: layer(torch.randn(3, 8))) == 2 * 3 * 8 * 4


def test_workload_loop_and_noise_prediction():
    from dittofx.measure.workload import Workload, noise_prediction

    latent = torch.randn(2, 4, 8, 8)
    assert noise_prediction(torch.randn(2, 8, 8, 8), latent).shape == latent.shape
    with pytest.raises(DittoError, match="noise prediction"):
        noise_prediction(torch.randn(2, 3, 8, 8), latent)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x, timestep):
            self.seen.append(int(timestep[0]))
            return 0.1 * x

    model = Model()
    wl = Workload.of(model, (latent,), {"timestep": torch.tensor([5, 5])}, timestep_input="timestep", steps=4)
    out = wl.run(lambda a, k: model(*a, **k))
    assert model.seen == [999, 666, 333, 0] and out.shape == latent.shape and torch.isfinite(out).all()
    assert Workload.of(model, (latent, torch.tensor([1, 1])), {}, timestep_input="timestep").timestep == ("arg", 1)


def test_calibration_inputs_from_files_and_image_folders(tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    from dittofx.measure.inputs import load_inputs
    from dittofx.measure.workload import Workload
    from dittofx.models import zoo

    z = zoo.build("vit", batch=2)
    wl = Workload.of(z.model, z.example_inputs, {})
    torch.save(torch.randn(5, 3, 64, 64), tmp_path / "x.pt")
    assert load_inputs(tmp_path / "x.pt", wl, z.model).batch == 5
    assert load_inputs(tmp_path / "x.pt", wl, z.model, max_inputs=3).batch == 3
    save_file({"x": torch.randn(4, 3, 64, 64)}, str(tmp_path / "x.safetensors"))
    assert load_inputs(tmp_path / "x.safetensors", wl, z.model).batch == 4
    torch.save(torch.randn(5, 3, 32, 32), tmp_path / "small.pt")
    with pytest.raises(DittoError, match="takes \\(N, 3, 64, 64\\)"):
        load_inputs(tmp_path / "small.pt", wl, z.model)

    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(80, 50), (64, 64), (30, 90)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(images / f"{i}.png")
    (images / "notes.txt").write_text("not an image")
    loaded = load_inputs(images, wl, z.model, family="timm")
    assert loaded.main_input.shape == (3, 3, 64, 64) and torch.isfinite(loaded.main_input).all()
    with pytest.raises(DittoError, match="no videos"):
        load_inputs(images, Workload.of(z.model, (torch.randn(1, 8, 3, 32, 32),), {}), z.model)
