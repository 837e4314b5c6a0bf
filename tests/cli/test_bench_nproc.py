"""`dittofx bench --nproc N`: the command runs itself in N processes for the sequence-parallel pass."""

import json

from dittofx.cli import main


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_nproc_2_splits_latte_with_pab(tmp_path, capsys):
    out = tmp_path / "sp.json"
    code, _, err = cli(capsys, "bench", "zoo:latte", "--pass", "sp", "--pass", "pab:temporal=1,cross=1",
                            "--sweep", "spatial=1,2", "--nproc", 2, "--steps", 6, "--rounds", 1, "--warmup", 0,
                            "--json", out, "--plot", tmp_path / "sp.png", "--quiet")
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["nproc"] == 2 and data["kind"] == "diffusion"
    every, pyramid = data["results"]
    assert every["agreement"]["psnr"] is None or every["agreement"]["psnr"] > 100  # ranges 1: split, exact
    assert pyramid["agreement"]["psnr"] < 100  # spatial=2 broadcasts: not the untouched output
    # each process computes about half the FLOPs; a broadcast step skips attention and its all_to_alls
    assert 1.7 < every["flop_ratio"] < 2.3 and pyramid["flop_ratio"] > every["flop_ratio"]
    assert every["comm"]["by_kind"]["all_to_all"][0] > 0
    assert 0 < pyramid["comm"]["bytes_per_call"] < every["comm"]["bytes_per_call"]
    assert (tmp_path / "sp.png").exists()  # rank 0 writes the files (the processes' output is their own)


def test_bench_nproc_without_sp_is_one_line(capsys):
    code, _, err = cli(capsys, "bench", "zoo:latte", "--pass", "pab", "--nproc", 2)
    assert code == 2 and err.count("\n") == 1 and "add --pass sp" in err


def test_bench_nproc_refuses_other_runtimes(capsys):
    code, _, err = cli(capsys, "bench", "zoo:latte", "--pass", "sp", "--nproc", 2, "--runtime", "onnxruntime")
    assert code == 2 and err.count("\n") == 1 and "--runtime onnxruntime" in err
