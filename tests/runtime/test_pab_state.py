"""PAB's generation and guidance state (runtime/pab.py) on a model, against a plain-PyTorch reference that
is told explicitly which guidance branch each call is and where each generation starts: falling and
rising schedules, a second generation starting anywhere, cond/uncond in either order, diffusers'
cache_context / _reset_stateful_cache protocol, threads, mixed timesteps in a batch."""

import copy
import threading

import pytest
import torch
from torch import nn

import dittofx
from dittofx.models import zoo
from dittofx.runtime.stateful import current_context

SPEC = "pab:spatial=3"  # CogVideoX's joint attention takes the spatial range: 3 tells counter phases apart
RANGE, WINDOW = 3, (100, 800)
SITES = ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1")


class Reference:
    """PAB written plainly over a copy of the untouched model: each attention module computes on its
    branch's first call, outside the open window, or on call index % RANGE == 0, else returns its
    cache. The caller names the branch of each call and starts generations (`new_generation`)."""

    def __init__(self, model, timestep_scale=1.0):
        self.model = copy.deepcopy(model)
        self.scale = timestep_scale
        self.state: dict = {}  # branch -> module -> [calls, cache]
        self.computed = dict.fromkeys(SITES, 0)
        self.branch, self.t = None, None
        modules = dict(self.model.named_modules())
        for name in SITES:
            self._wrap(name, modules[name])

    def _wrap(self, name, module):
        original = module.forward

        def forward(*args, **kwargs):
            st = self.state.setdefault(self.branch, {}).setdefault(name, [0, None])
            if st[1] is None or not WINDOW[0] < self.t * self.scale < WINDOW[1] or st[0] % RANGE == 0:
                st[1] = original(*args, **kwargs)
                self.computed[name] += 1
            st[0] += 1
            return st[1]

        module.forward = forward

    def new_generation(self):
        self.state = {}

    def __call__(self, branch, x, **kwargs):
        self.branch, self.t = branch, float(kwargs["timestep"].reshape(-1)[0])
        return self.model(x, **kwargs).sample


@pytest.fixture(scope="module")
def setup():
    zm = zoo.build("cogvideox")
    opt = dittofx.optimize(zm.model, [SPEC], zm.example_inputs, zm.example_kwargs)
    assert [s.module for s in opt.graph_module.pab.sites] == list(SITES)
    return zm, opt


def schedule(start, stop, steps):
    return torch.linspace(start, stop, steps).round().long()


def texts(zm):
    cond = zm.example_kwargs["encoder_hidden_states"]
    return {"cond": cond, "uncond": torch.zeros_like(cond)}


def loop(call, zm, ts, branches=("cond",), order=None, x=None, text=None):
    """A denoising-like loop: each step calls the model once per branch (in `order(i)` if given) and
    moves x by the guided output. call(branch, i, x, **kwargs) -> sample."""
    x = (zm.example_inputs[0] if x is None else x).clone()
    text = text or texts(zm)
    with torch.no_grad():
        for i, t in enumerate(ts):
            outs = {}
            for b in (order(i) if order else branches):
                outs[b] = call(b, i, x, encoder_hidden_states=text[b], timestep=t.expand(x.shape[0]))
            guided = outs["cond"] if len(outs) == 1 else outs["uncond"] + 2.0 * (outs["cond"] - outs["uncond"])
            x = x - 0.1 * guided
    return x


def by_dittofx(opt):
    return lambda b, i, x, **kw: opt(x, **kw).sample


def by_reference(ref):
    return lambda b, i, x, **kw: ref(b, x, **kw)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def fresh(setup, ts, **kw):
    """A fresh module's run of one generation (the dittofx module reset), and the reference's."""
    zm, opt = setup
    opt.reset()
    got = loop(by_dittofx(opt), zm, ts, **kw)
    ref = Reference(zm.model)
    return got, loop(by_reference(ref), zm, ts, **kw), ref


@pytest.mark.parametrize("ts", [schedule(950, 50, 8), schedule(50, 950, 8)], ids=["falling", "rising"])
def test_falling_and_rising_schedules_broadcast_as_the_rule_says(setup, ts):
    zm, opt = setup
    got, expected, ref = fresh(setup, ts)
    assert rel(got, expected) <= 1e-5
    state = opt.graph_module.pab.state
    assert state.computed == [ref.computed[s] for s in SITES]
    assert all(b > 0 for b in state.broadcast)  # rising timesteps broadcast too


def test_a_second_generation_starting_anywhere_equals_a_fresh_run(setup):
    zm, opt = setup
    cut_short = schedule(900, 400, 4)  # 4 calls: the next call index, 4 % 3, would broadcast
    starts = {"above": schedule(950, 50, 8), "same start": schedule(900, 50, 8),
              "below the first's start (img2img)": schedule(600, 50, 8)}
    for what, ts in starts.items():
        clean, expected, _ = fresh(setup, ts)
        assert rel(clean, expected) <= 1e-5
        opt.reset()
        loop(by_dittofx(opt), zm, cut_short)
        torch.testing.assert_close(loop(by_dittofx(opt), zm, ts), clean, rtol=0, atol=0, msg=what)
    # rising: a generation that starts below where the last one started
    clean, _, _ = fresh(setup, schedule(150, 950, 8))
    loop(by_dittofx(opt), zm, schedule(300, 700, 5))
    torch.testing.assert_close(loop(by_dittofx(opt), zm, schedule(150, 950, 8)), clean, rtol=0, atol=0)
    # below where the last one stopped, the same direction: the documented blind spot, marked explicitly
    ts = schedule(300, 50, 6)
    clean, expected, _ = fresh(setup, ts)
    for mark in ("new_generation", "generation", "_reset_stateful_cache"):
        opt.reset()
        loop(by_dittofx(opt), zm, cut_short)
        if mark == "generation":
            with opt.generation():
                got = loop(by_dittofx(opt), zm, ts)
        else:
            getattr(opt, mark)()
            got = loop(by_dittofx(opt), zm, ts)
        torch.testing.assert_close(got, clean, rtol=0, atol=0, msg=mark)


def test_cond_and_uncond_in_either_order_equal_per_branch_references(setup):
    zm, opt = setup
    ts = schedule(950, 50, 10)
    order = lambda i: ("uncond", "cond") if i % 3 == 1 or i == 4 else ("cond", "uncond")  # noqa: E731
    got, expected, ref = fresh(setup, ts, order=order)
    assert rel(got, expected) <= 1e-5
    state = opt.graph_module.pab.state
    assert state.branches == 2 and state.computed == [ref.computed[s] for s in SITES]
    assert sum(state.broadcast) > 0
    # a loop that always calls cond first gives the same result (caches follow the branch, not the order)
    opt.reset()
    assert rel(loop(by_dittofx(opt), zm, ts, branches=("cond", "uncond")), got) <= 1e-5


def test_cache_context_names_are_the_branches(setup):
    """diffusers' protocol (Wan's loop): each call inside cache_context(name, step_index=i)."""
    zm, opt = setup
    ts = schedule(950, 50, 8)

    def named(b, i, x, **kw):
        with opt.cache_context(b, step_index=i, num_inference_steps=len(ts), sigma=0.5):
            return opt(x, **kw).sample

    # two names with the same inputs: two branches (by their inputs alone they would be one)
    same = {"cond": texts(zm)["cond"], "uncond": texts(zm)["cond"]}
    got, expected, ref = fresh(setup, ts, branches=("cond", "uncond"), text=same)
    opt.reset()
    got = loop(named, zm, ts, branches=("cond", "uncond"), text=same)
    state = opt.graph_module.pab.state
    assert rel(got, expected) <= 1e-5 and state.computed == [ref.computed[s] for s in SITES]
    assert current_context() is None  # cleared on leaving the context
    # a name keeps its branch while its conditioning changes every step; without a name each step is new
    drifting = texts(zm)["cond"]

    def drift(call):
        def run(b, i, x, **kw):
            kw["encoder_hidden_states"] = drifting + 0.01 * i
            return call(b, i, x, **kw)
        return run

    _, expected, _ = fresh(setup, ts)
    opt.reset()
    ref = Reference(zm.model)
    assert rel(loop(drift(named), zm, ts), loop(drift(by_reference(ref)), zm, ts)) <= 1e-5
    opt.reset()
    untouched = loop(drift(lambda b, i, x, **kw: zm.model(x, **kw).sample), zm, ts)
    assert rel(loop(drift(by_dittofx(opt)), zm, ts), untouched) <= 1e-5
    assert sum(opt.graph_module.pab.state.broadcast) == 0
    # step_index 0 starts a generation, even one that continues the last one's direction
    first = loop(named, zm, schedule(300, 50, 6), branches=("cond", "uncond"))
    opt.reset()
    loop(named, zm, schedule(900, 400, 4), branches=("cond", "uncond"))
    torch.testing.assert_close(loop(named, zm, schedule(300, 50, 6), branches=("cond", "uncond")), first,
                               rtol=0, atol=0)
    # a named branch whose batch size changes starts over
    opt.reset()
    x3 = torch.cat([zm.example_inputs[0], zm.example_inputs[0][:1]])
    text3 = {"cond": torch.cat([texts(zm)["cond"], texts(zm)["cond"][:1]])}
    loop(named, zm, schedule(700, 500, 2))
    before = list(opt.graph_module.pab.state.computed)
    loop(named, zm, schedule(400, 300, 1), x=x3, text=text3)
    assert opt.graph_module.pab.state.computed == [c + 1 for c in before]


def test_protocol_methods_are_no_ops_without_a_stateful_pass():
    class Plain(nn.Module):  # no diffusers methods to fall back to
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x)

    model = Plain().eval()
    x = torch.randn(2, 8)
    opt = dittofx.optimize(model, [], (x,))
    assert not opt.stateful
    with opt.cache_context("cond", step_index=0), opt.generation():
        out = opt(x)
    opt.new_generation()
    opt._reset_stateful_cache()
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_two_threads_running_generations_on_one_module(setup):
    zm, opt = setup
    jobs = {"falling": (schedule(950, 50, 8), texts(zm)["cond"], zm.example_inputs[0]),
            "rising": (schedule(50, 950, 8), texts(zm)["uncond"] + 0.5, zm.example_inputs[0].flip(0))}
    expected = {}
    for name, (ts, text, x) in jobs.items():
        ref = Reference(zm.model)
        expected[name] = loop(by_reference(ref), zm, ts, x=x, text={"cond": text})
    opt.reset()
    barrier = threading.Barrier(len(jobs))
    got, errors = {}, []

    def lockstep(b, i, x, **kw):
        barrier.wait()  # both threads are at step i: their calls interleave
        return opt(x, **kw).sample

    def run(name):
        ts, text, x = jobs[name]
        try:
            got[name] = loop(lockstep, zm, ts, x=x, text={"cond": text})
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for name in jobs:
        assert rel(got[name], expected[name]) <= 1e-5, name
    assert sum(opt.graph_module.pab.state.broadcast) > 0


def test_mixed_timesteps_in_a_batch_compute_everything(setup):
    zm, opt = setup
    opt.reset()
    x, text = zm.example_inputs[0], texts(zm)["cond"]
    state = opt.graph_module.pab.state
    with torch.no_grad():
        for t in (700, 600):  # a generation under way: the next uniform call would broadcast
            opt(x, encoder_hidden_states=text, timestep=torch.full((2,), t))
        broadcast = list(state.broadcast)
        mixed = torch.tensor([500, 450])
        got = opt(x, encoder_hidden_states=text, timestep=mixed).sample
        expected = zm.model(x, encoder_hidden_states=text, timestep=mixed).sample
    assert state.broadcast == broadcast
    assert rel(got, expected) <= 1e-5


@pytest.mark.slow
def test_the_window_reads_the_timestep_in_the_analysis_units(setup, monkeypatch):
    """A model fed t / 1000 (Flux): the pass gives the schedule the analysis' timestep_scale."""
    from dittofx.passes import manager

    zm, _ = setup
    analyze = manager.analyze

    def scaled(*args, **kwargs):
        analysis = analyze(*args, **kwargs)
        analysis.timestep_scale = 1000.0
        return analysis

    monkeypatch.setattr(manager, "analyze", scaled)
    kwargs = dict(zm.example_kwargs, timestep=zm.example_kwargs["timestep"] / 1000)
    opt = dittofx.optimize(zm.model, [SPEC], zm.example_inputs, kwargs)
    assert opt.graph_module.pab.timestep_scale == 1000.0
    ts = schedule(950, 50, 8) / 1000
    ref = Reference(zm.model, timestep_scale=1000.0)
    assert rel(loop(by_dittofx(opt), zm, ts), loop(by_reference(ref), zm, ts)) <= 1e-5
    assert opt.graph_module.pab.state.computed == [ref.computed[s] for s in SITES]
    assert sum(opt.graph_module.pab.state.broadcast) > 0


@pytest.mark.slow
def test_two_pipeline_calls_are_two_generations_each_equal_to_the_hook(setup):
    """`pipe.transformer = optimize(...)`: CogVideoXPipeline wraps each call in
    cache_context("cond_uncond") and calls _reset_stateful_cache at the end of every pipe(...)."""
    from diffusers import (
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        PyramidAttentionBroadcastConfig,
        apply_pyramid_attention_broadcast,
    )

    zm, _ = setup
    opt = dittofx.optimize(zm.model, ["pab"], zm.example_inputs, zm.example_kwargs)
    hooked = copy.deepcopy(zm.model)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=zm.model,
                             scheduler=CogVideoXDDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    apply_pyramid_attention_broadcast(hooked, PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=WINDOW,
        current_timestep_callback=lambda: pipe.current_timestep))
    cond = texts(zm)["cond"][:1]
    latents = zm.example_inputs[0][:1]

    def generate(transformer, steps, stop_after=None):
        pipe.transformer = transformer

        def interrupt(p, i, t, kw):  # a loop cut short (as a user's callback does)
            p._interrupt = stop_after is not None and i + 1 >= stop_after
            return {}

        return pipe(prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond), num_inference_steps=steps,
                    num_frames=9, height=latents.shape[3] * 8, width=latents.shape[4] * 8, latents=latents.clone(),
                    output_type="latent", use_dynamic_cfg=False, callback_on_step_end=interrupt,
                    return_dict=False)[0]

    for steps, stop_after in ((12, None), (10, 4), (12, None)):
        got = generate(opt, steps, stop_after)
        expected = generate(hooked, steps, stop_after)
        assert rel(got, expected) <= 1e-5
    assert sum(opt.graph_module.pab.state.broadcast) > 0


@pytest.mark.slow
def test_onnx_runner_drives_the_same_state(setup, tmp_path):
    """OnnxPABRunner: branches by their inputs in either order, by name, and declared generations, as
    the graph."""
    from dittofx.exporters.onnx_pab import export_pab_onnx
    from dittofx.runtime.onnxruntime import OnnxPABRunner

    zm, opt = setup
    export_pab_onnx(opt, tmp_path / "pab")
    runner = OnnxPABRunner(tmp_path / "pab", providers=["CPUExecutionProvider"])
    ts = schedule(950, 50, 8)
    order = lambda i: ("uncond", "cond") if i % 2 else ("cond", "uncond")  # noqa: E731
    opt.reset()
    expected = loop(by_dittofx(opt), zm, ts, order=order)
    by_onnx = lambda b, i, x, **kw: runner(x, **kw)[0]  # noqa: E731
    assert rel(loop(by_onnx, zm, ts, order=order), expected) <= 1e-4
    assert runner.state.broadcast == opt.graph_module.pab.state.broadcast and runner.state.branches == 2

    def named(b, i, x, **kw):
        with runner.cache_context(b, step_index=i):
            return runner(x, **kw)[0]

    same = {"cond": texts(zm)["cond"], "uncond": texts(zm)["cond"]}
    _, reference, _ = fresh(setup, ts, order=order, text=same)
    assert rel(loop(named, zm, ts, order=order, text=same), reference) <= 1e-4
    loop(by_onnx, zm, schedule(900, 400, 4))
    with runner.generation():  # declared: the cut-short loop before it does not leak in
        assert rel(loop(by_onnx, zm, ts, order=order), expected) <= 1e-4
