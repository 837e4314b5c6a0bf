"""Threads: captures run one at a time in the process, each new call form is captured once, and
quieting torch leaves every other thread's output (prints, logs, sys.stdout/sys.stderr) alone."""

import logging
import sys
import threading

import pytest
import torch
from torch import nn

import dittofx
from dittofx.errors import CaptureError
from dittofx.models import zoo
from dittofx.rewriter.capture import capture
from dittofx.rewriter.quiet import quiet_export


def _call(opt, zm):
    with torch.no_grad():
        out = opt(*zm.example_inputs, **zm.example_kwargs)
    return out.sample if hasattr(out, "sample") else out


def test_four_threads_making_the_first_call_of_a_form_at_once_capture_it_once():
    # a static batch: batch 3 is a new call form; a PAB and a ToMe model, four threads each, all at once,
    # so that two captures are due at the same moment
    models = {"latte": ["pab"], "vit": ["tome:r=4"]}
    opts = {}
    for name, passes in models.items():
        zm = zoo.build(name)
        opts[name] = dittofx.optimize(zm.model, passes, zm.example_inputs, zm.example_kwargs, dynamic_batch=False,
                                      check=False)
    calls = {name: zoo.build(name, batch=3, seed=5) for name in models}  # their inputs (other weights: unused)
    stdout, stderr = sys.stdout, sys.stderr
    start = threading.Barrier(8)
    outs, errors = {}, []

    def first_call(name, i):
        start.wait()
        try:
            outs[name, i] = _call(opts[name], calls[name])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=first_call, args=(name, i)) for name in models for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sys.stdout is stdout and sys.stderr is stderr
    for name, opt in opts.items():
        assert len(opt.variants) == 2  # the example's form and batch 3: captured once
        single = _call(opt, calls[name])  # this thread's first call: a new PAB generation too
        for i in range(4):  # not bitwise: while torch.export runs (the other model's build) it switches
            # mkldnn off for the whole process, so a forward in another thread may take other kernels
            torch.testing.assert_close(outs[name, i], single, rtol=1e-5, atol=1e-6)
    # and PAB computes every attention on a generation's first step: what the original computes
    torch.testing.assert_close(outs["latte", 0], _call(opts["latte"].original, calls["latte"]))


def test_output_of_another_thread_is_kept_during_an_optimize(capsys):
    zm = zoo.build("vit")
    user = logging.getLogger("tests.threads.user")
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    user.addHandler(handler)
    stdout, stderr = sys.stdout, sys.stderr
    done, lines = threading.Event(), []

    def chatter():
        while not done.is_set() or len(lines) < 20:
            n = len(lines)
            print(f"line {n}")
            print(f"error line {n}", file=sys.stderr)
            user.warning("record %d", n)
            lines.append(n)
            done.wait(0.002)

    thread = threading.Thread(target=chatter)
    thread.start()
    try:
        dittofx.optimize(zm.model, ["tome:r=4"], zm.example_inputs, check=False)
    finally:
        done.set()
        thread.join()
        user.removeHandler(handler)
    assert sys.stdout is stdout and sys.stderr is stderr
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"line {n}" for n in lines]
    assert err.splitlines() == [f"error line {n}" for n in lines]
    assert logged == [f"record {n}" for n in lines]


class ValueBranch(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_torch_chatter_is_dropped_in_the_capturing_thread_only():
    torch_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")  # warns with whole graphs
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    torch_log.addHandler(handler)
    try:
        with pytest.raises(CaptureError):
            capture(ValueBranch(), (torch.randn(2, 3),))
        assert not records  # the graph dumps on the way to the failure: reported in one line instead
        with quiet_export():
            other = threading.Thread(target=torch_log.warning, args=("another thread's warning",))
            other.start()
            other.join()
            torch_log.warning("this thread's warning")
            torch_log.error("this thread's error")
    finally:
        torch_log.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["another thread's warning", "this thread's error"]
