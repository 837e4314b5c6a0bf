"""Pyramid Attention Broadcast on small Latte, CogVideoX, Wan and HunyuanVideo configs: speed-up next to
diffusers' hook and next to the bound, on this CPU, over a 30-step DDIM loop.

    python benchmarks/pab.py                 # every config, eager + onnxruntime, 5 rounds
    python benchmarks/pab.py --quick         # small configs and a reduced long one, 2 rounds
    python benchmarks/pab.py --configs wan-32,hunyuan-32 --rounds 5 --threads 1 --clock cpu
    python benchmarks/pab.py --export-check  # every zoo diffusion model: ONNX export, PAB folder export

For each config, in one run, interleaved (A B A B ...) after a warm-up, median of per-round ratios:
- none: the untouched diffusers model;
- dittofx: `dittofx.optimize(model, ["pab"])` (spatial 2, temporal 4, cross 6 in (100, 800));
- hook: diffusers' `apply_pyramid_attention_broadcast`, same schedule, with explicit layer
  identifiers (HOOK_LAYERS) and its state reset before each loop. diffusers' default identifiers
  misfile layers on two of these families: Latte's temporal blocks match "transformer_blocks" and
  are taken as spatial (range 2, not 4); on HunyuanVideo the pattern "blocks" also matches the text
  token refiner's `context_embedder.token_refiner.refiner_blocks.*.attn`, self-attention over the
  text tokens only (no latent token), which PAB has no rule for. The run prints what the defaults
  wrap beyond (or instead of) the explicit identifiers. On Wan the defaults are right (attn1 spatial,
  attn2 cross by its `is_cross_attention`), on CogVideoX too (joint attention, spatial range).
- graph: `dittofx.optimize(model, [])`, the captured graph without PAB. Eagerly it already runs
  faster than diffusers' modules (less Python per op), so `PAB alone` = graph time / dittofx time
  is what broadcasting itself gives, the figure to hold against the onnxruntime speed-up.
The bound is what skipping the broadcast calls can give at most: the loop time of the untouched
model over that time less the time its attention modules (those the hook wraps) spend in the calls
the hook broadcasts (timed with forward hooks on those modules over one loop; the broadcast share of
each module counted on the hook's loop). `attn share` is the share of the untouched loop spent in
all its attention modules. Quality: PSNR and max |diff| of the final latent against no caching;
`vs hook` is the max relative difference to the hook's final latent (the two implement the same
rule, so it should be ~0); `over hook` the median over rounds of hook time / dittofx time (above 1:
dittofx is faster). The run also prints where dittofx's sites differ from the hook's layers
(module, range) and the number of attention calls each skipped.

With onnxruntime (default; --no-onnx to skip): the untouched model exported with
`export_onnx` against the PAB export (one file per broadcast pattern, `export_pab_onnx`) driven by
`OnnxPABRunner`, also interleaved, both with the runner's session options (intra-op threads =
--threads, no spin-waiting: idle sessions that spin steal the cores of the running one).
--compile adds torch.compile (sdpa-only vs PAB, compiled).

--export-check: for every diffusion model of `dittofx.models.zoo` (its example inputs), whether
`export_onnx` exports the untouched model, whether `optimize(model, ["pab"])` and `export_pab_onnx`
(what `dittofx export`/`bench` use) give a folder, and the largest difference between
`OnnxPABRunner` and the eager PAB module over a short loop (each step fed the same latent; relative
to the output's largest value), with how many site calls that loop broadcast.

Threads and clock: on a shared, loaded 2-core machine, 2 intra-op threads per process oversubscribe
the cores and every timing swings by 10x or more; use `--threads 1 --clock cpu` there (CPU time of
this process: time spent waiting for a core is not counted), the defaults (OMP_NUM_THREADS or 2
threads, wall clock) on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import re
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import interleaved, machine, print_table, write_json

import dittofx
from dittofx.errors import first_line
from dittofx.measure.agreement import psnr
from dittofx.signature import input_names, tensor_leaves

RANGES = dict(spatial=2, temporal=4, cross=6)
WINDOW = (100, 800)
TEXT = 6
HOOK = "pyramid_attention_broadcast"  # diffusers' registry name of its PAB hook


def latte(size: int, frames: int, layers: int = 2, heads: int = 2, head_dim: int = 16, batch: int = 2):
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(0)
    model = LatteTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                    out_channels=8, num_layers=layers, sample_size=size, patch_size=2,
                                    cross_attention_dim=heads * head_dim, caption_channels=24, video_length=frames)
    x = torch.randn(batch, 4, frames, size, size)
    return _ready(model), x, _text(batch)


def cogvideox(size: int, frames: int, layers: int = 2, heads: int = 2, head_dim: int = 16, batch: int = 2):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                        out_channels=4, num_layers=layers, sample_width=size, sample_height=size,
                                        sample_frames=(frames - 1) * 4 + 1, patch_size=2, text_embed_dim=24,
                                        time_embed_dim=16, max_text_seq_length=TEXT)
    x = torch.randn(batch, frames, 4, size, size)
    return _ready(model), x, _text(batch)


def wan(size: int, frames: int, layers: int = 2, heads: int = 2, head_dim: int = 16, batch: int = 1):
    """Wan 2.x: self-attention (attn1, rotary written into q/k in place) and text cross-attention (attn2)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                  in_channels=4, out_channels=4, text_dim=24, freq_dim=32, ffn_dim=2 * heads * head_dim,
                                  num_layers=layers, rope_max_seq_len=max(32, size))
    x = torch.randn(batch, 4, frames, size, size)
    return _ready(model), x, _text(batch)


def hunyuan(size: int, frames: int, double: int = 1, single: int = 1, heads: int = 2, head_dim: int = 16,
            batch: int = 1, guidance: bool = True):
    """HunyuanVideo: dual-stream (video, text) blocks, then single-stream blocks over [video, text], and a
    token refiner over the text alone; guidance-distilled (a `guidance` input, guidance scale x 1000, as
    HunyuanVideoPipeline) unless guidance=False (`guidance_embeds=False`, as HunyuanVideo-I2V)."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=heads,
                                           attention_head_dim=head_dim, num_layers=double, num_single_layers=single,
                                           num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=24,
                                           pooled_projection_dim=8, rope_axes_dim=rope, guidance_embeds=guidance)
    x = torch.randn(batch, 4, frames, size, size)
    cond = dict(_text(batch), encoder_attention_mask=torch.ones(batch, TEXT),  # the pipeline casts it to float
                pooled_projections=torch.randn(batch, 8))
    if guidance:
        cond["guidance"] = torch.full((batch,), 6000.0)
    return _ready(model), x, cond


def _text(batch):
    return {"encoder_hidden_states": torch.randn(batch, TEXT, 24)}


def _ready(model):
    """Give zero-initialised parameters (output projections, gates) small values, as dittofx.models.zoo does."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and p.abs().max() < 1e-4:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


# name: (family, builder -> (model, latent, conditioning kwargs), description)
CONFIGS = {
    "latte-small": ("latte", lambda: latte(16, 4), "Latte 2 layers, 16x16 latents, 4 frames (64 tokens/frame)"),
    "latte-64": ("latte", lambda: latte(64, 4, head_dim=32, batch=1),
                 "Latte 2 layers, 64x64 latents, 4 frames (1024 tokens/frame), batch 1"),
    "cogvideox-small": ("cogvideox", lambda: cogvideox(16, 3),
                        "CogVideoX 2 layers, 16x16 latents, 3 frames (198 tokens)"),
    "cogvideox-64": ("cogvideox", lambda: cogvideox(64, 2, head_dim=32, batch=1),
                     "CogVideoX 2 layers, 64x64 latents, 2 frames (2054 joint tokens), batch 1"),
    "wan-32": ("wan", lambda: wan(32, 4), "Wan 2 layers, 32x32 latents, 4 frames (1024 tokens), batch 1"),
    "hunyuan-32": ("hunyuan", lambda: hunyuan(32, 4),
                   "HunyuanVideo 1 double + 1 single block, 32x32 latents, 4 frames (1024 + 6 text tokens), batch 1"),
    "hunyuan-32-noguidance": ("hunyuan", lambda: hunyuan(32, 4, guidance=False),
                              "hunyuan-32 without the guidance input (guidance_embeds=False, as HunyuanVideo-I2V)"),
}
QUICK = {
    "latte-small": CONFIGS["latte-small"],
    "latte-32": ("latte", lambda: latte(32, 4, head_dim=32, batch=1),
                 "Latte 2 layers, 32x32 latents, 4 frames (256 tokens/frame), batch 1"),
    "cogvideox-small": CONFIGS["cogvideox-small"],
    "wan-small": ("wan", lambda: wan(16, 3, batch=2), "Wan 2 layers, 16x16 latents, 3 frames (192 tokens)"),
    "hunyuan-small": ("hunyuan", lambda: hunyuan(16, 3, batch=2),
                      "HunyuanVideo 1 double + 1 single block, 16x16 latents, 3 frames (192 + 6 tokens)"),
}

# the hook's layer identifiers per family (regular expressions searched in module names; cross needs
# the module's `is_cross_attention`, spatial and temporal its absence)
HOOK_LAYERS = {
    "latte": dict(spatial=(r"^transformer_blocks\.",), temporal=(r"^temporal_transformer_blocks\.",),
                  cross=(r"^transformer_blocks\.",)),
    "cogvideox": dict(spatial=(r"^transformer_blocks\.",), temporal=(), cross=()),
    "wan": dict(spatial=(r"^blocks\.",), temporal=(), cross=(r"^blocks\.",)),
    "hunyuan": dict(spatial=(r"^transformer_blocks\.", r"^single_transformer_blocks\."), temporal=(), cross=()),
}


def scheduler(steps):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000)
    s.set_timesteps(steps)
    return s


def sample(out):
    if isinstance(out, (list, tuple)):
        return out[0]
    return out.sample if hasattr(out, "sample") else out[0]


def make_loop(call, x0, steps, start=None):
    """A DDIM loop over `steps` timesteps; `call(x, t)` returns the model output; `start()` runs first."""

    def run():
        if start is not None:
            start()
        s = scheduler(steps)
        x = x0.clone()
        for t in s.timesteps:
            out = sample(call(x, t.expand(x.shape[0])))
            if out.shape != x.shape:  # Latte predicts the variance too
                out = out[:, :x.shape[1]]
            x = s.step(out, t, x).prev_sample
        return x

    return run


def hooked(model, layers: dict | None):
    """A copy of the untouched model with diffusers' hook (layers: HOOK_LAYERS' entry, None for diffusers'
    default identifiers); returns (module, reset, clock, {wrapped module: range})."""
    from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
    from diffusers.hooks import HookRegistry

    model = copy.deepcopy(model)
    clock = {"t": 999}
    ids = {} if layers is None else {f"{kind}_attention_block_identifiers": ids for kind, ids in layers.items()}
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=RANGES["spatial"], temporal_attention_block_skip_range=RANGES["temporal"],
        cross_attention_block_skip_range=RANGES["cross"], spatial_attention_timestep_skip_range=WINDOW,
        temporal_attention_timestep_skip_range=WINDOW, cross_attention_timestep_skip_range=WINDOW,
        current_timestep_callback=lambda: clock["t"], **ids)
    apply_pyramid_attention_broadcast(model, config)
    wrapped = {name: h.block_skip_range for name, h in _hooks(model).items()}
    return model, lambda: HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(), clock, wrapped


def _hooks(model) -> dict:
    """{module name: diffusers' PAB hook on it}."""
    found = {}
    for name, m in model.named_modules():
        registry = getattr(m, "_diffusers_hook", None)
        hook = registry.get_hook(HOOK) if registry is not None else None
        if hook is not None:
            found[name] = hook
    return found


@contextlib.contextmanager
def counting(model):
    """Count, per hooked module, (calls, calls that computed) while inside; yields {name: [calls, computed]}."""
    counts, handles, restore = {}, [], []
    modules = dict(model.named_modules())
    for name, hook in _hooks(model).items():
        counts[name] = [0, 0]
        handles.append(modules[name].register_forward_pre_hook(
            lambda mod, args, c=counts[name]: c.__setitem__(0, c[0] + 1)))
        ref = hook.fn_ref
        original = ref.original_forward

        def computing(*a, c=counts[name], f=original, **k):
            c[1] += 1
            return f(*a, **k)

        ref.original_forward = computing
        restore.append((ref, original))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()
        for ref, original in restore:
            ref.original_forward = original


def attention_modules(model) -> list[str]:
    """Names of the model's attention modules (those diffusers' hooks can wrap)."""
    from diffusers.hooks._common import _ATTENTION_CLASSES
    from diffusers.models.attention import AttentionModuleMixin

    return [n for n, m in model.named_modules() if isinstance(m, (*_ATTENTION_CLASSES, AttentionModuleMixin))]


def module_seconds(model, loop, names, clock=time.perf_counter) -> tuple[dict, float]:
    """({module: seconds spent in it}, loop seconds) over one loop of the untouched model, after a warm one."""
    spent = {name: 0.0 for name in names}
    starts = {}
    handles = []
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: starts.__setitem__(name, clock())))
        handles.append(m.register_forward_hook(
            lambda mod, args, out, name=name: spent.__setitem__(name, spent[name] + clock() - starts[name])))
    try:
        with torch.inference_mode():
            loop()  # warm
            for k in spent:
                spent[k] = 0.0
            start = clock()
            loop()
            total = clock() - start
    finally:
        for h in handles:
            h.remove()
    return spent, total


def compare_sites(opt, wrapped: dict) -> list[str]:
    """Where dittofx's PAB sites differ from the hook's wrapped layers (module names and ranges)."""
    sites = {s.module: s.rule.range for s in opt.graph_module.pab.sites}
    notes = []
    only_d = {m: r for m, r in sites.items() if m not in wrapped}
    only_h = {m: r for m, r in wrapped.items() if m not in sites}
    other = {m: (r, wrapped[m]) for m, r in sites.items() if m in wrapped and wrapped[m] != r}
    if only_d:
        notes.append("dittofx wraps, the hook does not: " + ", ".join(f"{m} (range {r})" for m, r in only_d.items()))
    if only_h:
        notes.append("the hook wraps, dittofx does not: " + ", ".join(f"{m} (range {r})" for m, r in only_h.items()))
    if other:
        notes.append("ranges differ (dittofx, hook): " + ", ".join(f"{m} {r}" for m, r in other.items()))
    return notes


def run_config(name, family, build, description, args, rows):
    print(f"\n== {name}: {description}", flush=True)
    model, x, cond = build()
    t0 = torch.full((x.shape[0],), 500)
    kwargs = dict(cond, timestep=t0)
    start = time.perf_counter()
    opt = dittofx.optimize(model, ["pab"], (x,), kwargs)
    capture_s = time.perf_counter() - start
    graph = dittofx.optimize(model, [], (x,), kwargs)  # the same graph without PAB: PAB's share of the gain
    hook, hook_reset, clock, wrapped = hooked(model, HOOK_LAYERS[family])
    *_, default_wrapped = hooked(model, None)
    gm = opt.graph_module
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    timestep_input = placeholders[gm.pab.timestep_index]

    def call_hook(x, t):
        clock["t"] = int(t[0])
        return hook(x, timestep=t, **cond)

    fns = {
        "none": make_loop(lambda x, t: model(x, timestep=t, **cond), x, args.steps),
        "dittofx": make_loop(lambda x, t: opt(x, timestep=t, **cond), x, args.steps, start=opt.new_generation),
        "hook": make_loop(call_hook, x, args.steps, start=hook_reset),
        "graph": make_loop(lambda x, t: graph(x, timestep=t, **cond), x, args.steps),
    }
    with torch.inference_mode():
        final = {k: f() for k, f in fns.items() if k != "graph"}  # the graph's output is the model's
        opt.reset()
        fns["dittofx"]()
        with counting(hook) as counts:
            fns["hook"]()
    state = gm.pab.state
    dittofx_skipped, hook_skipped = sum(state.broadcast), sum(c - k for c, k in counts.values())
    spent, total = module_seconds(model, fns["none"], attention_modules(model),
                                  time.process_time if args.clock == "cpu" else time.perf_counter)
    skipped = sum(spent[m] * (c - k) / c for m, (c, k) in counts.items() if c)
    share, bound = sum(spent.values()) / total, total / (total - skipped)
    broadcast = dittofx_skipped / max(1, dittofx_skipped + sum(state.computed))

    timings = interleaved(fns, rounds=args.rounds, warmup=1, clock=args.clock)
    over_hook = statistics.median(h / d for h, d in zip(timings["hook"].seconds, timings["dittofx"].seconds))
    ref = final["none"]
    for k in ("dittofx", "hook"):
        diff = (final[k] - ref).abs().max().item()
        rows.append(dict(config=name, runtime="eager", variant=k, seconds=timings[k].median,
                         base_seconds=timings["none"].median, speedup=timings[k].speedup, spread=timings[k].spread,
                         bound=bound, of_bound=timings[k].speedup / bound, attention_share=share,
                         broadcast_share=broadcast, psnr=psnr(final[k], ref), max_diff=diff,
                         vs_hook=_rel(final[k], final["hook"]),
                         skipped=dittofx_skipped if k == "dittofx" else hook_skipped,
                         over_graph=timings["graph"].median / timings[k].median if k == "dittofx" else None,
                         over_hook=over_hook if k == "dittofx" else None))
    print(f"   capture+pass {capture_s:.1f}s; attention modules take {share:.0%} of the untouched loop "
          f"({', '.join(f'{m} {s / total:.0%}' for m, s in spent.items())}); bound {bound:.3f}x", flush=True)
    print(f"   attention calls skipped: dittofx {dittofx_skipped} ({broadcast:.0%} of its site calls), hook "
          f"{hook_skipped}; dittofx reads the timestep from input `{timestep_input}`", flush=True)
    for note in compare_sites(opt, wrapped):
        print(f"   {note}", flush=True)
    if default_wrapped != wrapped:
        extra = {m: r for m, r in default_wrapped.items() if wrapped.get(m) != r}
        missing = [m for m in wrapped if m not in default_wrapped]
        print("   diffusers' default identifiers would also/instead wrap: "
              + (", ".join(f"{m} (range {r})" for m, r in extra.items()) or "-")
              + ("; and miss " + ", ".join(missing) if missing else ""), flush=True)

    if args.compile:
        sd_c = dittofx.optimize(model, ["sdpa"], (x,), kwargs, compile=True)
        pab_c = dittofx.optimize(model, ["pab"], (x,), kwargs, compile=True)
        cfns = {"compiled none": make_loop(lambda x, t: sd_c(x, timestep=t, **cond), x, args.steps),
                "compiled dittofx": make_loop(lambda x, t: pab_c(x, timestep=t, **cond), x, args.steps,
                                              start=pab_c.new_generation)}
        with torch.inference_mode():
            out = {k: f() for k, f in cfns.items()}  # compiles every pattern
        ct = interleaved(cfns, rounds=args.rounds, warmup=0, clock=args.clock)
        rows.append(dict(config=name, runtime="compile", variant="dittofx", seconds=ct["compiled dittofx"].median,
                         base_seconds=ct["compiled none"].median, speedup=ct["compiled dittofx"].speedup,
                         spread=ct["compiled dittofx"].spread, bound=bound,
                         of_bound=ct["compiled dittofx"].speedup / bound,
                         psnr=psnr(out["compiled dittofx"], out["compiled none"]),
                         max_diff=(out["compiled dittofx"] - out["compiled none"]).abs().max().item()))

    if args.onnx:
        run_onnx(name, model, opt, x, cond, kwargs, bound, args, rows, final)


def run_onnx(name, model, opt, x, cond, kwargs, bound, args, rows, eager):
    from dittofx.exporters.onnx import export_onnx
    from dittofx.exporters.onnx_pab import export_pab_onnx
    from dittofx.runtime.onnxruntime import OnnxPABRunner

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        try:
            export_onnx(model, os.path.join(tmp, "none.onnx"), (x,), kwargs)
            export_pab_onnx(opt, os.path.join(tmp, "pab"), timesteps=scheduler(args.steps).timesteps)
        except Exception as e:  # noqa: BLE001 - the eager figures stand; say why there are no ORT ones
            print(f"   no onnxruntime figures: the export failed: {_why(e)}", flush=True)
            rows.append(dict(config=name, runtime="onnxruntime", variant=f"export failed: {type(e).__name__}",
                             speedup=None))
            return
        export_s = time.perf_counter() - start
        base = by_name(_UntouchedSession(os.path.join(tmp, "none.onnx"), args.threads), model)
        pab_runner = OnnxPABRunner(os.path.join(tmp, "pab"), providers=["CPUExecutionProvider"], threads=args.threads)
        pab = by_name(pab_runner, model)
        ofns = {"ort none": make_loop(lambda x, t: base((x,), dict(cond, timestep=t)), x, args.steps),
                "ort dittofx": make_loop(lambda x, t: pab((x,), dict(cond, timestep=t)), x, args.steps,
                                         start=pab_runner.reset)}
        out = {k: f() for k, f in ofns.items()}
        ot = interleaved(ofns, rounds=args.rounds, warmup=0, clock=args.clock)
    t = ot["ort dittofx"]
    rows.append(dict(config=name, runtime="onnxruntime", variant="dittofx", seconds=t.median,
                     base_seconds=ot["ort none"].median, speedup=t.speedup, spread=t.spread, bound=bound,
                     of_bound=t.speedup / bound, psnr=psnr(out["ort dittofx"], out["ort none"]),
                     max_diff=(out["ort dittofx"] - out["ort none"]).abs().max().item(),
                     vs_eager=_rel(out["ort dittofx"], eager["dittofx"])))
    print(f"   ONNX exports {export_s:.1f}s; final latent, onnxruntime vs eager (max relative difference): "
          f"untouched {_rel(out['ort none'], eager['none']):.1e}, PAB {_rel(out['ort dittofx'], eager['dittofx']):.1e}",
          flush=True)


def by_name(runner, model):
    """`call(args, kwargs)` feeding `runner` (input_names: the model's flat tensor input names) by name,
    whatever order the export flattened the keyword arguments in (export_onnx keeps the call's order,
    export_pab_onnx the captured graph's, which sorts them) and however it spells a nested input
    (export_onnx `image_rotary_emb_0.0.1`, export_pab_onnx the graph's `image_rotary_emb_0_0_1`)."""

    def call(args, kwargs):
        values = {}
        for name, (_, t) in zip(input_names(model, args, kwargs), tensor_leaves((tuple(args), kwargs))):
            values[name] = values[re.sub(r"\W", "_", name)] = t
        return runner(**{n: values[n] for n in runner.input_names})

    return call


class _UntouchedSession:
    """The untouched export in onnxruntime with OnnxPABRunner's session options (threads, no spin-wait),
    called by input name."""

    def __init__(self, path, threads):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs, **named):
        values = list(inputs) or [named[n] for n in self.input_names]
        feed = {n: v.detach().contiguous().numpy() for n, v in zip(self.input_names, values)}
        return [torch.from_numpy(o) for o in self.session.run(None, feed)]


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# --export-check: the zoo's diffusion models through export_onnx and export_pab_onnx


def export_check(names, steps: int, threads: int) -> list[dict]:
    from dittofx.models import zoo

    rows = []
    for name in names:
        z = zoo.build(name)
        if z.family != "diffusers":
            continue
        print(f"\n== export check: {name}", flush=True)
        row = dict(model=name)
        with tempfile.TemporaryDirectory() as tmp:
            row["untouched"] = _attempt(lambda: _export_untouched(z, tmp))
            row["pab_folder"], row["broadcast"], row["max_rel_diff"] = "-", None, None
            try:
                opt = dittofx.optimize(z.model, ["pab"], z.example_inputs, z.example_kwargs)
            except Exception as e:  # noqa: BLE001 - a failure is a row of the table
                row["pab_folder"] = f"optimize failed: {_why(e)}"
            else:
                row["sites"] = len(opt.graph_module.pab.sites)
                row["pab_folder"] = _attempt(lambda: _check_pab_folder(z, opt, tmp, steps, threads, row))
        print(f"   untouched: {row['untouched']}; PAB folder: {row['pab_folder']}", flush=True)
        rows.append(row)
    return rows


def _export_untouched(z, tmp) -> str:
    from dittofx.exporters.onnx import export_onnx

    res = export_onnx(z.model, os.path.join(tmp, "none.onnx"), z.example_inputs, z.example_kwargs)
    return f"ok ({res.max_rel_diff:.0e})"


def _check_pab_folder(z, opt, tmp, steps, threads, row) -> str:
    """Export the PAB folder for a short loop and run that loop in onnxruntime and eagerly, each step fed
    the same latent (the eager one's next); records the largest relative difference of the outputs."""
    from dittofx.exporters.onnx_pab import export_pab_onnx
    from dittofx.runtime.onnxruntime import OnnxPABRunner

    example_t = z.example_kwargs["timestep"]
    unit = 1e-3 if float(example_t.max()) <= 1 else 1.0  # Flux takes t / 1000
    values = [unit * v for v in torch.linspace(950, 50, steps).round().tolist()]
    timesteps = [torch.full_like(example_t, v) for v in values]
    res = export_pab_onnx(opt, os.path.join(tmp, "pab"), z.example_inputs, z.example_kwargs,
                          timesteps=[t[0] for t in timesteps])
    runner = OnnxPABRunner(os.path.join(tmp, "pab"), providers=["CPUExecutionProvider"], threads=threads)
    ort_call = by_name(runner, z.model)
    x, *rest = z.example_inputs
    opt.reset()
    worst = 0.0
    with torch.inference_mode():
        for t in timesteps:
            kwargs = dict(z.example_kwargs, timestep=t)
            eager = sample(opt(x, *rest, **kwargs))
            ort_out = ort_call((x, *rest), kwargs)[0]
            worst = max(worst, _rel(ort_out, eager))
            if eager.shape == x.shape:
                x = x - 0.05 * eager
    state = opt.graph_module.pab.state
    row["broadcast"] = f"{sum(state.broadcast)}/{sum(state.broadcast) + sum(state.computed)}"
    row["max_rel_diff"] = worst
    return f"ok ({len(res.files)} files)"


def _attempt(fn) -> str:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a failure is a row of the table
        return f"failed: {_why(e)}"


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e, 160)}"


EXPORT_COLUMNS = [("model", "model", ""), ("untouched", "export untouched", ""), ("sites", "PAB sites", ""),
                  ("pab_folder", "PAB folder", ""), ("broadcast", "broadcast", ""),
                  ("max_rel_diff", "ORT vs torch PAB", ".1e")]


def print_export_table(rows, steps) -> None:
    """The export check's table, each failure's reason as a numbered note under it."""
    notes, shown = [], []
    for row in rows:
        cells = dict(row)
        for key in ("untouched", "pab_folder"):
            text = row.get(key) or "-"
            if text.startswith(("failed", "optimize failed")):
                reason = text.split(": ", 1)[1]
                if reason not in notes:
                    notes.append(reason)
                text = f"{text.split(':', 1)[0]} [{notes.index(reason) + 1}]"
            cells[key] = text
        shown.append(cells)
    print_table(shown, EXPORT_COLUMNS, title=f"ONNX export of the zoo's diffusion models (their example inputs); "
                                             f"PAB over a {steps}-step loop (broadcast: site calls broadcast / all)")
    for i, reason in enumerate(notes, 1):
        print(f"[{i}] {reason}")

COLUMNS = [("config", "config", ""), ("runtime", "runtime", ""), ("variant", "PAB by", ""),
           ("base_seconds", "none s", ".3f"), ("seconds", "PAB s", ".3f"), ("speedup", "speed-up", ".3f"),
           ("spread", "+-", ".3f"), ("bound", "bound", ".3f"), ("of_bound", "of bound", ".0%"),
           ("attention_share", "attn share", ".0%"), ("skipped", "skipped", ""), ("psnr", "PSNR dB", ".1f"),
           ("max_diff", "max diff", ".2e"), ("over_graph", "PAB alone", ".3f"),
           ("over_hook", "over hook", ".3f"), ("vs_hook", "vs hook", ".1e"),
           ("vs_eager", "vs eager", ".1e")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small configs and a reduced long one, 2 rounds")
    p.add_argument("--configs", help=f"comma-separated subset of {', '.join(CONFIGS)} (or of the quick ones: "
                                     f"{', '.join(c for c in QUICK if c not in CONFIGS)})")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5, --quick 2)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip onnxruntime")
    p.add_argument("--compile", action="store_true", help="also torch.compile (slow to compile)")
    p.add_argument("--export-check", action="store_true",
                   help="check export_onnx and the PAB folder export on the zoo's diffusion models (only that, "
                        "unless --configs is given too)")
    p.add_argument("--export-models", help="comma-separated zoo names for --export-check (default: all diffusers ones)")
    p.add_argument("--export-steps", type=int, default=8, help="steps of --export-check's loop")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (steadier on a shared machine, with --threads 1)")
    p.add_argument("--json", help="write the rows and the machine to this JSON file")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    table = QUICK if args.quick else CONFIGS
    if args.configs:
        every = {**CONFIGS, **QUICK}
        names = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = [c for c in names if c not in every]
        if unknown:
            p.error(f"unknown config(s) {', '.join(unknown)}; accepted: {', '.join(every)}")
        table = {c: every[c] for c in names}
    elif args.export_check:
        table = {}
    export_names = None
    if args.export_check:
        from dittofx.models import zoo

        export_names = [c.strip() for c in (args.export_models or ",".join(zoo.NAMES)).split(",") if c.strip()]
        unknown = [c for c in export_names if c not in zoo.NAMES]
        if unknown:
            p.error(f"unknown zoo model(s) {', '.join(unknown)}; accepted: {', '.join(zoo.NAMES)}")
    rows = []
    for name, (family, build, description) in table.items():
        run_config(name, family, build, description, args, rows)
    if rows:
        print()
        print_table(rows, COLUMNS, title=f"PAB (spatial 2, temporal 4, cross 6 in {WINDOW}), {args.steps} DDIM steps, "
                                         f"median of {args.rounds} interleaved rounds, {args.threads} thread(s), "
                                         f"{args.clock} clock")
        print("bound: untouched loop time / (that time - time of the attention calls the hook broadcasts); "
              "of bound: speed-up / bound; skipped: attention calls broadcast in one loop")
    export_rows = []
    if export_names:
        export_rows = export_check(export_names, args.export_steps, args.threads)
        print()
        print_export_table(export_rows, args.export_steps)
    if args.json:
        write_json(args.json, {"rows": rows, "export": export_rows, "machine": machine(), "args": vars(args)})
    bad = [r for r in rows if r.get("vs_hook") is not None and r["variant"] == "dittofx" and not r["vs_hook"] <= 1e-5]
    return 1 if bad or any(r["speedup"] is not None and math.isnan(r["speedup"]) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
