"""PAB equals diffusers' `apply_pyramid_attention_broadcast` on every diffusion transformer of the zoo:
the same ranges and window, the final latent of a 30-step loop within 1e-5 (relative), and the same
number of attention calls skipped.

The hook is given correct layer identifiers where its defaults misfile a layer (Latte's temporal blocks
match "transformer_blocks"; HunyuanVideo's text token refiner matches "blocks"; LTX-Video's `attn2`
lacks the `is_cross_attention` flag the hook reads, so its cross attention gets the spatial range);
the defaults are checked to misfile them, and dittofx's graph-based kinds are the correct ones.
Windows are in the units of the timestep each model receives, and dittofx
reads the model's own scaling: Flux is fed t / 1000 and multiplies it back, so the same (100, 800)
applies. Mochi's pipeline feeds reversed timesteps (its `current_timestep` is 1000 - t): for the hook's
(100, 800), dittofx is given (200, 900)."""

import copy

import pytest
import torch
from torch import nn

import dittofx
from dittofx.models import zoo

STEPS = 30
WINDOW = (100, 800)
RANGES = {"spatial": 2, "temporal": 4, "cross": 6}
MODELS = ["dit", "pixart", "latte", "cogvideox", "cogvideox5b", "cogvideox15", "wan", "hunyuanvideo", "mochi",
          "ltx_video", "allegro", "flux", "sd3", "easyanimate"]
SLOW = {"hunyuanvideo", "mochi", "easyanimate", "cogvideox15"}  # the longest builds and loops

# what the model receives for the pipeline's timestep t (0-1000, falling), and dittofx's window for it
FEED = {"flux": lambda t: t / 1000, "mochi": lambda t: 1000 - t}
DITTOFX_WINDOW = {"mochi": (200, 900)}
# correct identifiers where diffusers' defaults misfile a layer
IDENTIFIERS = {
    "latte": dict(spatial_attention_block_identifiers=(r"^transformer_blocks",),
                  temporal_attention_block_identifiers=(r"^temporal_transformer_blocks",),
                  cross_attention_block_identifiers=(r"^transformer_blocks",)),
    "hunyuanvideo": dict(spatial_attention_block_identifiers=(r"^transformer_blocks", r"^single_transformer_blocks"),
                         cross_attention_block_identifiers=(r"^transformer_blocks",)),
}


def mark_cross(model):
    """LTX-Video's attention class has no `is_cross_attention`: tell the hook which modules are cross."""
    for name, module in model.named_modules():
        if name.endswith("attn2"):
            module.is_cross_attention = True


FIXES = {"ltx_video": mark_cross}


def timesteps():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS)
    return [float(t) for t in scheduler.timesteps]


def sample(out):
    return out.sample if hasattr(out, "sample") else out[0]


def loop(model, zm, on_step=lambda t: None):
    """30 Euler steps over the zoo model's example inputs; the latent is args[0] or hidden_states."""
    args, kwargs = list(zm.example_inputs), dict(zm.example_kwargs)
    x = (args[0] if args else kwargs["hidden_states"]).clone()
    feed = FEED.get(zm.name, lambda t: t)
    like = kwargs["timestep"]
    with torch.no_grad():
        for t in timesteps():
            on_step(t)
            kwargs["timestep"] = torch.full_like(like, feed(t), dtype=like.dtype if feed(t) == int(feed(t))
                                                 else torch.float32)
            if args:
                args[0] = x
            else:
                kwargs["hidden_states"] = x
            out = sample(model(*args, **kwargs))
            if out.shape != x.shape:  # Latte and PixArt predict the variance too
                out = out[:, :x.shape[1]]
            x = x - out / STEPS
    return x


def hooked(zm, identifiers=None):
    """A copy of the model with diffusers' hook (its defaults with `identifiers={}`; else correct ones);
    returns (module, clock setter, computed-call counter)."""
    from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
    from diffusers.hooks import HookRegistry

    model = copy.deepcopy(zm.model)
    if identifiers is None and zm.name in FIXES:
        FIXES[zm.name](model)
    clock = {"t": 999.0}
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=RANGES["spatial"], temporal_attention_block_skip_range=RANGES["temporal"],
        cross_attention_block_skip_range=RANGES["cross"], spatial_attention_timestep_skip_range=WINDOW,
        temporal_attention_timestep_skip_range=WINDOW, cross_attention_timestep_skip_range=WINDOW,
        current_timestep_callback=lambda: clock["t"], **(IDENTIFIERS.get(zm.name, {}) if identifiers is None
                                                         else identifiers))
    apply_pyramid_attention_broadcast(model, config)
    computed = {}
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry) and "pyramid_attention_broadcast" in registry.hooks:
            first = next(m for m in module.modules() if isinstance(m, nn.Linear))  # runs only when it computes
            computed[name] = 0
            first.register_forward_pre_hook(lambda *_, name=name: computed.__setitem__(name, computed[name] + 1))
    return model, (lambda t: clock.__setitem__("t", t)), computed


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS])
def test_pab_equals_diffusers_hook(name):
    zm = zoo.build(name)
    lo, hi = DITTOFX_WINDOW.get(name, WINDOW)
    spec = f"pab:spatial=2,temporal=4,cross=6,timestep_window=({lo},{hi})"
    opt = dittofx.optimize(zm.model, [spec], zm.example_inputs, zm.example_kwargs)
    model, set_clock, computed = hooked(zm)
    expected = loop(model, zm, set_clock)
    got = loop(opt, zm)
    assert rel(got, expected) <= 1e-5
    # the same modules, the same calls skipped
    sites = opt.graph_module.pab.sites
    state = opt.graph_module.pab.state
    assert sorted(s.module for s in sites) == sorted(computed)
    assert sum(state.broadcast) == STEPS * len(computed) - sum(computed.values()) > 0
    for i, site in enumerate(sites):
        assert state.computed[i] == computed[site.module], site.module


@pytest.mark.parametrize("name", ["latte", "ltx_video", pytest.param("hunyuanvideo", marks=pytest.mark.slow)])
def test_diffusers_defaults_misfile_a_layer(name):
    """Latte's temporal attention and LTX's cross attention get the spatial range (computed more often);
    HunyuanVideo's text refiner gets broadcast."""
    zm = zoo.build(name)
    _, _, correct = hooked(zm)
    _, _, default = hooked(zm, identifiers={})
    if name == "hunyuanvideo":
        refiner = set(default) - set(correct)
        assert refiner and all("refiner" in m for m in refiner)
        return
    assert set(correct) == set(default)  # the same modules, at the wrong range
    model, set_clock, computed = hooked(zm, identifiers={})
    loop(model, zm, set_clock)
    model, set_clock, right = hooked(zm)
    loop(model, zm, set_clock)
    misfiled = [m for m in computed if m.startswith("temporal" if name == "latte" else "transformer_blocks")
                and m.endswith("attn1" if name == "latte" else "attn2")]
    assert misfiled and all(computed[m] > right[m] for m in misfiled)
