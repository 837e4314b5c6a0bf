"""PAB: the decision rule against a plain reference and diffusers' hook, state (generations, guidance
branches, reset), and broadcast steps that really skip attention eagerly, compiled and in ONNX."""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dittofx
from dittofx.errors import PassSpecError, UnsupportedModelError
from dittofx.models import zoo
from dittofx.passes.pab import PAB
from dittofx.passes.spec import parse_pass, pass_name
from dittofx.runtime.pab import MAX_UNNAMED, BroadcastState, Rule

STEPS = 30
WINDOW = (100, 800)
RANGES = {"spatial": 2, "temporal": 4, "cross": 6}
# the attention modules of the zoo models and their kinds, written out by hand (names are only used
# here, by the reference; the pass classifies from the graph)
KINDS = {
    "latte": {"transformer_blocks.0.attn1": "spatial", "transformer_blocks.0.attn2": "cross",
              "temporal_transformer_blocks.0.attn1": "temporal", "transformer_blocks.1.attn1": "spatial",
              "transformer_blocks.1.attn2": "cross", "temporal_transformer_blocks.1.attn1": "temporal"},
    "cogvideox": {"transformer_blocks.0.attn1": "joint", "transformer_blocks.1.attn1": "joint"},
}
RANGE_OF = {"spatial": "spatial", "joint": "spatial", "temporal": "temporal", "cross": "cross", "mlp": "mlp"}


# ---------------------------------------------------------------------------------------------
# helpers


def sample(out):
    return out.sample if hasattr(out, "sample") else out[0]


def timesteps(steps=STEPS):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    return scheduler


def denoise(model, zm, steps=STEPS, guidance: str | None = None):
    """A 30-step DDIM loop. guidance: None, "batched" (uncond+cond in one call of batch 2B) or
    "separate" (one call each, same timestep)."""
    scheduler = timesteps(steps)
    x = zm.example_inputs[0].clone()
    cond = zm.example_kwargs["encoder_hidden_states"]
    uncond = torch.zeros_like(cond)
    with torch.no_grad():
        for t in scheduler.timesteps:
            if guidance == "batched":
                out = sample(model(torch.cat([x, x]), encoder_hidden_states=torch.cat([uncond, cond]),
                                   timestep=t.expand(2 * x.shape[0])))
                u, c = out.chunk(2)
                out = u + 4.0 * (c - u)
            elif guidance == "separate":
                c = sample(model(x, encoder_hidden_states=cond, timestep=t.expand(x.shape[0])))
                u = sample(model(x, encoder_hidden_states=uncond, timestep=t.expand(x.shape[0])))
                out = u + 4.0 * (c - u)
            else:
                out = sample(model(x, encoder_hidden_states=cond, timestep=t.expand(x.shape[0])))
            if out.shape != x.shape:  # Latte predicts the variance too: (B, 2C, F, H, W)
                out = out[:, :x.shape[1]]
            x = scheduler.step(out, t, x).prev_sample
    return x


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


class ReferencePAB(nn.Module):
    """PAB written plainly over the untouched model: each named attention module's forward computes on
    its first call, outside the open window or on call index % range == 0, else returns its cache.
    One instance = one cache per module (use one instance per guidance branch)."""

    def __init__(self, model, kinds: dict[str, str], ranges=RANGES, window=WINDOW):
        super().__init__()
        self.model = copy.deepcopy(model)
        self.t = None
        self.calls = {}
        for name, module in self.model.named_modules():
            if name in kinds and ranges.get(RANGE_OF[kinds[name]]) is not None:
                self._wrap(name, module, ranges[RANGE_OF[kinds[name]]], window)

    def _wrap(self, name, module, every, window):
        original, state = module.forward, {"calls": 0, "cache": None}

        def forward(*args, **kwargs):
            inside = window[0] < self.t < window[1]
            if state["cache"] is None or not inside or state["calls"] % every == 0:
                state["cache"] = original(*args, **kwargs)
                self.calls[name] = self.calls.get(name, 0) + 1
            state["calls"] += 1
            return state["cache"]

        module.forward = forward

    def forward(self, x=None, **kwargs):
        if x is None:  # pipelines call with keywords
            x = kwargs.pop("hidden_states")
        self.t = float(kwargs["timestep"].reshape(-1)[0])
        return self.model(x, **kwargs)

    def __getattr__(self, name):  # config, dtype, device: what a pipeline asks of its transformer
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["model"], name)


class Separate(nn.Module):
    """Two references, one per guidance branch, for loops that call cond then uncond."""

    def __init__(self, model, kinds):
        super().__init__()
        self.branches = nn.ModuleList([ReferencePAB(model, kinds), ReferencePAB(model, kinds)])
        self.n = 0

    def forward(self, x, **kwargs):
        out = self.branches[self.n % 2](x, **kwargs)
        self.n += 1
        return out


class CountAttention(TorchDispatchMode):
    """Counts attention kernels actually run."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.name():
            self.calls += 1
        return func(*args, **(kwargs or {}))


def with_hook(model, name, default_identifiers=False):
    """The untouched model with diffusers' hook, same schedule, correct layer identifiers."""
    from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    hooked = copy.deepcopy(model)
    ids = {}
    if name == "latte" and not default_identifiers:  # the defaults file Latte's temporal layers as spatial
        ids = dict(spatial_attention_block_identifiers=(r"^transformer_blocks",),
                   temporal_attention_block_identifiers=(r"^temporal_transformer_blocks",),
                   cross_attention_block_identifiers=(r"^transformer_blocks",))
    clock = {}
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=RANGES["spatial"], temporal_attention_block_skip_range=RANGES["temporal"],
        cross_attention_block_skip_range=RANGES["cross"], spatial_attention_timestep_skip_range=WINDOW,
        temporal_attention_timestep_skip_range=WINDOW, cross_attention_timestep_skip_range=WINDOW,
        current_timestep_callback=lambda: clock["t"], **ids)
    apply_pyramid_attention_broadcast(hooked, config)

    class Hooked(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = hooked

        def forward(self, x, **kwargs):
            clock["t"] = int(kwargs["timestep"].reshape(-1)[0])
            return self.model(x, **kwargs)

    return Hooked()


_CACHE = {}


def built(name):
    if name not in _CACHE:
        _CACHE[name] = zoo.build(name)
    return _CACHE[name]


def optimized(name, spec="pab", **kw):
    key = (name, spec, tuple(sorted(kw.items())))
    if key not in _CACHE:
        zm = built(name)
        _CACHE[key] = dittofx.optimize(zm.model, [spec], zm.example_inputs, zm.example_kwargs, **kw)
    opt = _CACHE[key]
    opt.reset()
    return opt


# ---------------------------------------------------------------------------------------------
# options and errors


def test_defaults_and_spec_round_trip():
    p = PAB()
    assert p.spec() == "pab:spatial=2,temporal=4,cross=6,timestep_window=(100,800)"
    q = parse_pass("pab:spatial=3,temporal=None,cross=6,timestep_window=(50,900),cross_window=(0,1000),mlp=2")
    assert (q.ranges, q.timestep_window) == ({"spatial": 3, "temporal": None, "cross": 6, "mlp": 2}, (50, 900))
    assert parse_pass(q.spec()).options() == q.options()
    assert q.rule("joint") == q.rule("spatial") == Rule(3, (50.0, 900.0))
    assert q.rule("cross").window == (0.0, 1000.0) and q.rule("temporal") is None
    assert pass_name(" PAB : spatial=3") == "pab" and isinstance(parse_pass("PAB:spatial=3"), PAB)


@pytest.mark.parametrize("spec, words", [
    ("pab:spatial=0", "spatial must be an integer >= 1"),
    ("pab:cross=-2", "cross must be an integer >= 1"),
    ("pab:temporal=1.5", "temporal must be an integer >= 1"),
    ("pab:mlp=True", "mlp must be an integer >= 1"),
    ("pab:timestep_window=(-1,800)", "0 <= lo < hi <= 1000"),
    ("pab:timestep_window=(100,1200)", "0 <= lo < hi <= 1000"),
    ("pab:spatial_window=(800,100)", "spatial_window"),
    ("pab:timestep_window=100", "timestep_window"),
])
def test_bad_options_are_one_line(spec, words):
    with pytest.raises(PassSpecError) as e:
        parse_pass(spec)
    assert words in str(e.value) and "\n" not in str(e.value)


class NoTimestep(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return x + self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_no_timestep_input():
    model = NoTimestep().eval()
    with pytest.raises(UnsupportedModelError) as e:
        dittofx.optimize(model, ["pab"], (torch.randn(2, 8, 16),))
    assert "no timestep input" in str(e.value) and "\n" not in str(e.value)
    opt = dittofx.optimize(model, ["sdpa"], (torch.randn(2, 8, 16),))
    assert "pab" not in opt.report.blocks[0].applicable


def test_export_errors_are_one_line(tmp_path):
    from dittofx.errors import ExportError
    from dittofx.exporters.onnx import export_onnx
    from dittofx.exporters.onnx_pab import export_pab_onnx
    from dittofx.runtime.onnxruntime import OnnxPABRunner

    plain = dittofx.optimize(NoTimestep().eval(), ["sdpa"], (torch.randn(2, 8, 16),))
    with pytest.raises(ExportError, match="no PAB pass applied"):
        export_pab_onnx(plain, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_pab_onnx(optimized("cogvideox"), tmp_path / "full")
    with pytest.raises(ExportError, match="no manifest.json"):
        OnnxPABRunner(tmp_path / "full")
    assert not (tmp_path / "out").exists()
    # one ONNX model cannot hold the caches: export_onnx refuses instead of dropping the broadcast
    with pytest.raises(ExportError, match="PAB caches.*export_pab_onnx"):
        export_onnx(optimized("cogvideox"), tmp_path / "one.onnx")
    assert not (tmp_path / "one.onnx").exists()


# ---------------------------------------------------------------------------------------------
# the schedule state, without a model


def test_rule_is_diffusers_rule():
    rule = Rule(3, (100.0, 800.0))
    for index in range(12):
        for t in (0.0, 100.0, 101.0, 500.0, 799.0, 800.0, 999.0):
            expected = index == 0 or not (100 < t < 800) or index % 3 == 0
            assert rule.computes(index, t) == expected


def test_generations_branches_batch_and_reset():
    """The state rules of runtime/pab.py: generations from the direction of the timesteps, guidance
    branches from the conditioning inputs (never call order), batch changes, mixed timesteps."""
    state = BroadcastState([Rule(2, (100.0, 800.0))])
    cond, uncond = torch.randn(3, 5), torch.zeros(3, 5)

    def call(t, batch=2, text=cond):
        step = state.begin(torch.tensor([t] * batch), batch, [text[:batch]])  # a new view each call: same branch
        step.caches.setdefault(0, ("x",))
        return step.computes[0]

    assert [call(t) for t in (700, 600, 500, 400)] == [True, False, True, False]
    assert call(450) and not call(300)  # 450 > 400 goes against a falling generation: a new one (img2img)
    assert call(700) and not call(650, text=cond.clone())  # the same values in another tensor: the same branch
    assert state.branches == 1
    # rising timesteps (flow-matching pipelines such as Mochi's): broadcast; going down starts over
    state = BroadcastState([Rule(2, (100.0, 800.0))])
    assert [call(t) for t in (200, 300, 400, 500)] == [True, False, True, False]
    assert call(250) and not call(350)
    # separate guidance calls, in either order per step: each branch its own counter
    state = BroadcastState([Rule(2, (100.0, 800.0))])
    order = [(700, cond), (700, uncond), (600, uncond), (600, cond), (500, cond), (500, uncond)]
    assert [call(t, text=text) for t, text in order] == [True, True, False, False, True, True]
    assert state.branches == 2
    assert not call(400, text=uncond) and call(400, batch=3, text=uncond)  # a new batch size starts over
    assert state.branches == 3
    # at 300, cond (last called at 500) is dropped; the one blind spot: a generation that continues the
    # last one's direction (uncond at batch 3 goes on); new_generation() marks it
    assert not call(300, batch=3, text=uncond) and state.branches == 2
    state.new_generation()
    assert state.branches == 0 and call(300, batch=3, text=uncond)
    # mixed timesteps in one batch: computes
    assert state.begin(torch.tensor([500, 400]), 2, [cond[:2]]).computes == (True,)
    computed = sum(state.computed)
    state.reset()
    assert sum(state.computed) == 0 < computed and call(250)
    # calls at one timestep with ever new conditioning: at most MAX_UNNAMED branches are kept
    for k in range(MAX_UNNAMED + 3):
        assert call(240, text=cond + k + 1)
    assert state.branches == MAX_UNNAMED and not call(240, text=cond + MAX_UNNAMED + 3)
    # the window reads the timestep input times timestep_scale (Flux feeds t / 1000)
    state = BroadcastState([Rule(2, (100.0, 800.0))], timestep_scale=1000)
    assert [call(t) for t in (0.7, 0.6, 0.5, 0.4, 0.09, 0.08)] == [True, False, True, False, True, True]


# ---------------------------------------------------------------------------------------------
# the models


def test_kinds_come_from_the_graph():
    for name in ("latte", "cogvideox"):
        opt = optimized(name)
        sites = {s.module: s.kind for s in opt.graph_module.pab.sites}
        assert sites == KINDS[name]
        for site in opt.graph_module.pab.sites:
            assert site.rule == Rule(RANGES[RANGE_OF[site.kind]], (100.0, 800.0))
        text = str(opt.report)
        assert "pab: transformer_blocks.0.attn1" in text and "site calls broadcast" in text
    # no SDPA is left in the main graph: each attention runs inside its site's subgraph
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    assert not any(n.target is sdpa for n in opt.graph_module.graph.nodes)


@pytest.mark.parametrize("name", ["latte", "cogvideox"])
def test_ranges_of_one_equal_the_untouched_model(name):
    zm = built(name)
    opt = optimized(name, "pab:spatial=1,temporal=1,cross=1")
    torch.testing.assert_close(denoise(opt, zm), denoise(zm.model, zm), rtol=1e-5, atol=1e-6)
    assert sum(opt.graph_module.pab.state.broadcast) == 0


@pytest.mark.parametrize("name", ["latte", "cogvideox"])
def test_loop_equals_reference_and_diffusers_hook(name):
    zm = built(name)
    opt = optimized(name)
    got = denoise(opt, zm)
    reference = ReferencePAB(zm.model, KINDS[name])
    expected = denoise(reference, zm)
    assert rel(got, expected) <= 1e-5
    assert rel(got, denoise(with_hook(zm.model, name), zm)) <= 1e-5
    # the same number of computed calls per module as the reference, and real skipping
    state = opt.graph_module.pab.state
    for i, site in enumerate(opt.graph_module.pab.sites):
        assert state.computed[i] == reference.calls[site.module]
        assert state.broadcast[i] == STEPS - reference.calls[site.module] > 0
    assert rel(got, denoise(zm.model, zm)) > 1e-3  # and broadcasting did change the result
    if name == "latte":  # with its default name patterns, the hook runs Latte's temporal layers at range 2
        assert rel(denoise(with_hook(zm.model, name, default_identifiers=True), zm), expected) > 1e-3


def test_graph_module_path_equals_the_runner():
    """opt(...) runs one flat program per pattern; the graph itself (call_module per site) is the same."""
    zm = built("latte")
    opt = optimized("latte")
    got = denoise(opt, zm)
    opt.reset()
    with CountAttention() as counted:
        direct = denoise(opt.graph_module, zm)
    assert rel(direct, got) <= 1e-6
    assert counted.calls == sum(opt.graph_module.pab.state.computed) < STEPS * len(opt.graph_module.pab.sites)


def test_new_generation_and_reset_start_over():
    zm = built("cogvideox")
    opt = optimized("cogvideox")
    first = denoise(opt, zm)
    torch.testing.assert_close(denoise(opt, zm), first, rtol=0, atol=0)  # timestep went up: fresh caches
    denoise(opt, zm, steps=7)
    opt.reset()
    torch.testing.assert_close(denoise(opt, zm), first, rtol=0, atol=0)


def test_separate_guidance_calls_get_separate_caches():
    zm = built("latte")
    opt = optimized("latte")
    got = denoise(opt, zm, guidance="separate")
    assert opt.graph_module.pab.state.branches == 2
    assert rel(got, denoise(Separate(zm.model, KINDS["latte"]), zm, guidance="separate")) <= 1e-5


def test_batched_guidance_is_one_branch():
    zm = built("latte")
    opt = optimized("latte")
    got = denoise(opt, zm, guidance="batched")
    assert opt.graph_module.pab.state.branches == 1
    assert rel(got, denoise(ReferencePAB(zm.model, KINDS["latte"]), zm, guidance="batched")) <= 1e-5


def test_eager_broadcast_steps_do_not_run_attention():
    zm = built("latte")
    opt = optimized("latte")
    with CountAttention() as counted:
        denoise(opt, zm)
    state = opt.graph_module.pab.state
    assert counted.calls == sum(state.computed) < STEPS * len(state.rules)
    with CountAttention() as untouched:
        denoise(zm.model, zm)
    assert untouched.calls == STEPS * len(state.rules)


def test_mlp_broadcast_caches_each_feed_forward():
    zm = built("latte")
    opt = optimized("latte", "pab:mlp=3")
    feed_forwards = {f"{block}.ff": "mlp" for block in ("transformer_blocks.0", "transformer_blocks.1",
                                                         "temporal_transformer_blocks.0",
                                                         "temporal_transformer_blocks.1")}
    assert {s.module: s.kind for s in opt.graph_module.pab.sites} == {**KINDS["latte"], **feed_forwards}
    reference = ReferencePAB(zm.model, {**KINDS["latte"], **feed_forwards}, ranges={**RANGES, "mlp": 3})
    assert rel(denoise(opt, zm), denoise(reference, zm)) <= 1e-5
    assert all(b > 0 for b in opt.graph_module.pab.state.broadcast)


@pytest.mark.slow
def test_in_a_diffusers_pipeline():
    from diffusers import DDIMScheduler, LattePipeline

    zm = built("latte")
    cond = zm.example_kwargs["encoder_hidden_states"][:1]
    latents = zm.example_inputs[0][:1]

    def generate(transformer, pipe_ref=None):
        pipe = LattePipeline(tokenizer=None, text_encoder=None, vae=None, transformer=zm.model,
                             scheduler=DDIMScheduler(num_train_timesteps=1000))
        pipe.transformer = transformer(pipe)
        pipe.set_progress_bar_config(disable=True)
        return pipe(negative_prompt=None, prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond),
                    num_inference_steps=STEPS,
                    video_length=latents.shape[2], height=latents.shape[3] * 8, width=latents.shape[4] * 8,
                    latents=latents.clone(), output_type="latent", mask_feature=False, return_dict=False)[0]

    opt = optimized("latte")
    got = generate(lambda pipe: opt)
    expected = generate(lambda pipe: ReferencePAB(zm.model, KINDS["latte"]))
    assert rel(got, expected) <= 1e-5
    assert sum(v.gm.pab.state.broadcast[0] for v in opt.variants) > 0


@pytest.mark.slow
def test_compiled_broadcast_steps_do_not_run_attention():
    zm = built("cogvideox")
    opt = optimized("cogvideox", compile=True)
    eager = optimized("cogvideox")
    expected = denoise(eager, zm)
    got = denoise(opt, zm)  # compiles one program per pattern
    assert rel(got, expected) <= 1e-4
    runner = opt.variants[-1].runner
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    for computes, (prog, _, _) in runner._programs.items():  # a broadcast site's attention is not in its program
        assert sum(n.target is sdpa for n in prog._orig_mod.graph.nodes) == sum(computes)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        denoise(opt, zm)
    kernels = sum(e.count for e in prof.key_averages() if "scaled_dot_product" in e.key)
    state = opt.graph_module.pab.state
    assert kernels == sum(state.computed) // 2 < STEPS * len(state.rules)  # computed counts both loops


@pytest.mark.slow
def test_onnx_loop_equals_eager_loop(tmp_path):
    import onnx

    from dittofx.exporters.onnx_pab import export_pab_onnx
    from dittofx.runtime.onnxruntime import OnnxPABRunner

    zm = built("cogvideox")
    opt = optimized("cogvideox")
    export = export_pab_onnx(opt, tmp_path / "pab", timesteps=timesteps().timesteps)
    assert sorted(export.patterns) == [(False, False), (True, True)]
    softmax = {}
    for f, computes in zip(export.files, export.patterns):
        nodes = onnx.load(str(tmp_path / "pab" / f)).graph.node
        softmax[computes] = sum(n.op_type in ("Softmax", "Attention") for n in nodes)
    assert softmax[(True, True)] == 2 and softmax[(False, False)] == 0  # broadcast: no attention in the file
    # the weights are stored once for all patterns, and each file still loads on its own
    weights = (tmp_path / "pab" / "weights.bin").stat().st_size
    params = sum(p.numel() * p.element_size() for p in [*zm.model.parameters(), *zm.model.buffers()])
    assert 0.5 * params < weights < 1.5 * params
    assert all((tmp_path / "pab" / f).stat().st_size < params for f in export.files)
    from dittofx.runtime import OnnxRuntimeRunner

    alone = OnnxRuntimeRunner(tmp_path / "pab" / export.files[0], providers=["CPUExecutionProvider"])
    assert export.patterns[0] == (True, True)  # computes everything: returns the sample and 2 x 2 caches
    assert len(alone(*zm.example_inputs, *zm.example_kwargs.values())) == 5

    runner = OnnxPABRunner(tmp_path / "pab")

    class Drive(nn.Module):
        def forward(self, x, encoder_hidden_states, timestep):
            return runner(x, encoder_hidden_states, timestep)

    expected = denoise(opt, zm)
    got = denoise(Drive(), zm)
    assert rel(got, expected) <= 1e-4
    assert runner.state.broadcast == opt.graph_module.pab.state.broadcast
    runner.reset()
    assert rel(denoise(Drive(), zm), got) == 0
