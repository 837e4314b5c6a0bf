"""Pyramid Attention Broadcast on small Latte and CogVideoX configs: speed-up next to diffusers' hook
and next to the bound, on this CPU, over a 30-step DDIM loop.

    python benchmarks/pab.py                 # every config, eager + onnxruntime, 5 rounds
    python benchmarks/pab.py --quick         # small configs and a reduced long one, 2 rounds
    python benchmarks/pab.py --configs latte-64 --rounds 7 --json out/pab.json

For each config, in one run, interleaved (A B A B ...) after a warm-up, median of per-round ratios:
- none: the untouched diffusers model;
- dittofx: `dittofx.optimize(model, ["pab"])` (spatial 2, temporal 4, cross 6 in (100, 800));
- hook: diffusers' `apply_pyramid_attention_broadcast`, same schedule, with explicit layer
  identifiers (its default patterns file Latte's temporal layers as spatial) and its state reset
  before each loop;
- graph: `dittofx.optimize(model, [])`, the captured graph without PAB. Eagerly it already runs
  faster than diffusers' modules (less Python per op), so `PAB alone` = graph time / dittofx time
  is what broadcasting itself gives, the figure to hold against the onnxruntime speed-up.
The bound is what skipping the broadcast calls can give at most: the loop time of the untouched
model over that time less the time its attention modules spend in the calls PAB broadcasts
(measured with forward hooks on those modules, one loop). Quality: PSNR and max |diff| of the final
latent against no caching; `vs hook` is the max relative difference to the hook's final latent
(the two implement the same rule, so it should be ~0).

With onnxruntime (default; --no-onnx to skip): the untouched model exported with
`export_onnx` against the PAB export (one file per broadcast pattern, `export_pab_onnx`) driven by
`OnnxPABRunner`, also interleaved, both with the runner's session options (intra-op threads =
--threads, no spin-waiting: idle sessions that spin steal the cores of the running one).
--compile adds torch.compile (sdpa-only vs PAB, compiled).

Threads and clock: on a shared, loaded 2-core machine, 2 intra-op threads per process oversubscribe
the cores and every timing swings by 10x or more; use `--threads 1 --clock cpu` there (CPU time of
this process: time spent waiting for a core is not counted), the defaults (OMP_NUM_THREADS or 2
threads, wall clock) on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import interleaved, machine, print_table, write_json

import dittofx
from dittofx.measure.agreement import psnr

RANGES = dict(spatial=2, temporal=4, cross=6)
WINDOW = (100, 800)
TEXT = 6


def latte(size: int, frames: int, layers: int = 2, heads: int = 2, head_dim: int = 16, batch: int = 2):
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(0)
    model = LatteTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                    out_channels=8, num_layers=layers, sample_size=size, patch_size=2,
                                    cross_attention_dim=heads * head_dim, caption_channels=24, video_length=frames)
    _randomise(model)
    x = torch.randn(batch, 4, frames, size, size)
    return model.eval(), x


def cogvideox(size: int, frames: int, layers: int = 2, heads: int = 2, head_dim: int = 16, batch: int = 2):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                        out_channels=4, num_layers=layers, sample_width=size, sample_height=size,
                                        sample_frames=(frames - 1) * 4 + 1, patch_size=2, text_embed_dim=24,
                                        time_embed_dim=16, max_text_seq_length=TEXT)
    _randomise(model)
    x = torch.randn(batch, frames, 4, size, size)
    return model.eval(), x


def _randomise(model):
    """Give zero-initialised parameters (output projections, gates) small values, as dittofx.models.zoo does."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and p.abs().max() < 1e-4:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


# name: (family, builder, description)
CONFIGS = {
    "latte-small": ("latte", lambda: latte(16, 4), "Latte 2 layers, 16x16 latents, 4 frames (64 tokens/frame)"),
    "latte-64": ("latte", lambda: latte(64, 4, head_dim=32, batch=1),
                 "Latte 2 layers, 64x64 latents, 4 frames (1024 tokens/frame), batch 1"),
    "cogvideox-small": ("cogvideox", lambda: cogvideox(16, 3),
                        "CogVideoX 2 layers, 16x16 latents, 3 frames (198 tokens)"),
    "cogvideox-64": ("cogvideox", lambda: cogvideox(64, 2, head_dim=32, batch=1),
                     "CogVideoX 2 layers, 64x64 latents, 2 frames (2054 joint tokens), batch 1"),
}
QUICK = {
    "latte-small": CONFIGS["latte-small"],
    "latte-32": ("latte", lambda: latte(32, 4, head_dim=32, batch=1),
                 "Latte 2 layers, 32x32 latents, 4 frames (256 tokens/frame), batch 1"),
    "cogvideox-small": CONFIGS["cogvideox-small"],
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


def make_loop(call, x0, text, steps):
    """A DDIM loop over `steps` timesteps; `call(x, text, t)` returns the model output."""

    def run():
        s = scheduler(steps)
        x = x0.clone()
        for t in s.timesteps:
            out = sample(call(x, text, t.expand(x.shape[0])))
            if out.shape != x.shape:  # Latte predicts the variance too
                out = out[:, :x.shape[1]]
            x = s.step(out, t, x).prev_sample
        return x

    return run


def hooked(model, family):
    """The untouched model (a copy) with diffusers' hook; returns (module, reset, clock)."""
    from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
    from diffusers.hooks import HookRegistry

    model = copy.deepcopy(model)
    clock = {"t": 999}
    ids = {}
    if family == "latte":
        ids = dict(spatial_attention_block_identifiers=(r"^transformer_blocks",),
                   temporal_attention_block_identifiers=(r"^temporal_transformer_blocks",),
                   cross_attention_block_identifiers=(r"^transformer_blocks",))
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=RANGES["spatial"], temporal_attention_block_skip_range=RANGES["temporal"],
        cross_attention_block_skip_range=RANGES["cross"], spatial_attention_timestep_skip_range=WINDOW,
        temporal_attention_timestep_skip_range=WINDOW, cross_attention_timestep_skip_range=WINDOW,
        current_timestep_callback=lambda: clock["t"], **ids)
    apply_pyramid_attention_broadcast(model, config)
    return model, lambda: HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(), clock


def attention_bound(model, loop, sites, state, clock=time.perf_counter) -> tuple[float, float]:
    """(share of the untouched loop spent in the wrapped attention modules, bound on the speed-up).

    Each wrapped module's time over one loop, times the share of its calls that PAB broadcasts."""
    spent = {name: 0.0 for name in sites}
    starts = {}
    handles = []
    modules = dict(model.named_modules())
    for name in sites:
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
    skipped = 0.0
    for i, name in enumerate(sites):
        calls = state.computed[i] + state.broadcast[i]
        skipped += spent[name] * (state.broadcast[i] / calls if calls else 0.0)
    return sum(spent.values()) / total, total / (total - skipped)


def run_config(name, family, build, description, args, rows):
    print(f"\n== {name}: {description}", flush=True)
    model, x = build()
    text = torch.randn(x.shape[0], TEXT, 24)
    t0 = torch.full((x.shape[0],), 500)
    kwargs = dict(encoder_hidden_states=text, timestep=t0)
    start = time.perf_counter()
    opt = dittofx.optimize(model, ["pab"], (x,), kwargs)
    capture_s = time.perf_counter() - start
    graph = dittofx.optimize(model, [], (x,), kwargs)  # the same graph without PAB: PAB's share of the gain
    hook, hook_reset, clock = hooked(model, family)

    def call_hook(x, e, t):
        clock["t"] = int(t[0])
        return hook(x, encoder_hidden_states=e, timestep=t)

    loops = {
        "none": make_loop(lambda x, e, t: model(x, encoder_hidden_states=e, timestep=t), x, text, args.steps),
        "dittofx": make_loop(lambda x, e, t: opt(x, encoder_hidden_states=e, timestep=t), x, text, args.steps),
        "hook": make_loop(call_hook, x, text, args.steps),
        "graph": make_loop(lambda x, e, t: graph(x, encoder_hidden_states=e, timestep=t), x, text, args.steps),
    }

    def hook_loop():
        hook_reset()
        return loops["hook"]()

    fns = {"none": loops["none"], "dittofx": loops["dittofx"], "hook": hook_loop, "graph": loops["graph"]}
    with torch.inference_mode():
        final = {k: f() for k, f in fns.items() if k != "graph"}  # the graph's output is the model's
    gm = opt.graph_module
    opt.reset()
    with torch.inference_mode():
        loops["dittofx"]()
    state = gm.pab.state
    sites = [s.module for s in gm.pab.sites]
    share, bound = attention_bound(model, loops["none"], sites, state,
                                   time.process_time if args.clock == "cpu" else time.perf_counter)
    broadcast = sum(state.broadcast) / max(1, sum(state.broadcast) + sum(state.computed))

    timings = interleaved(fns, rounds=args.rounds, warmup=1, clock=args.clock)
    ref = final["none"]
    for k in ("dittofx", "hook"):
        diff = (final[k] - ref).abs().max().item()
        vs_hook = _rel(final[k], final["hook"])
        rows.append(dict(config=name, runtime="eager", variant=k, seconds=timings[k].median,
                         base_seconds=timings["none"].median, speedup=timings[k].speedup, spread=timings[k].spread,
                         bound=bound, of_bound=timings[k].speedup / bound, attention_share=share,
                         broadcast_share=broadcast, psnr=psnr(final[k], ref), max_diff=diff, vs_hook=vs_hook,
                         over_graph=timings["graph"].median / timings[k].median if k == "dittofx" else None))
    print(f"   capture+pass {capture_s:.1f}s; attention modules take {share:.0%} of the untouched loop; "
          f"{broadcast:.0%} of their calls are broadcast; bound {bound:.3f}x", flush=True)

    if args.compile:
        sd_c = dittofx.optimize(model, ["sdpa"], (x,), kwargs, compile=True)
        pab_c = dittofx.optimize(model, ["pab"], (x,), kwargs, compile=True)
        cfns = {"compiled none": make_loop(lambda x, e, t: sd_c(x, encoder_hidden_states=e, timestep=t), x, text,
                                           args.steps),
                "compiled dittofx": make_loop(lambda x, e, t: pab_c(x, encoder_hidden_states=e, timestep=t), x, text,
                                              args.steps)}
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
        run_onnx(name, model, opt, x, text, kwargs, bound, args, rows, final)


def run_onnx(name, model, opt, x, text, kwargs, bound, args, rows, eager):
    from dittofx.exporters.onnx import export_onnx
    from dittofx.exporters.onnx_pab import export_pab_onnx
    from dittofx.runtime.onnxruntime import OnnxPABRunner

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        export_onnx(model, os.path.join(tmp, "none.onnx"), (x,), kwargs)
        export_pab_onnx(opt, os.path.join(tmp, "pab"), timesteps=scheduler(args.steps).timesteps)
        export_s = time.perf_counter() - start
        base = _untouched_session(os.path.join(tmp, "none.onnx"), args.threads)
        pab = OnnxPABRunner(os.path.join(tmp, "pab"), providers=["CPUExecutionProvider"], threads=args.threads)
        plain = make_loop(lambda x, e, t: pab(x, e, t), x, text, args.steps)

        def pab_loop():
            pab.reset()
            return plain()

        ofns = {"ort none": make_loop(lambda x, e, t: base(x, e, t), x, text, args.steps), "ort dittofx": pab_loop}
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


def _untouched_session(path, threads):
    """The untouched export in onnxruntime with OnnxPABRunner's session options (threads, no spin-wait)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def call(*inputs):
        feed = {n: v.detach().contiguous().numpy() for n, v in zip(names, inputs)}
        return [torch.from_numpy(o) for o in session.run(None, feed)]

    return call


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


COLUMNS = [("config", "config", ""), ("runtime", "runtime", ""), ("variant", "PAB by", ""),
           ("base_seconds", "none s", ".3f"), ("seconds", "PAB s", ".3f"), ("speedup", "speed-up", ".3f"),
           ("spread", "+-", ".3f"), ("bound", "bound", ".3f"), ("of_bound", "of bound", ".0%"),
           ("attention_share", "attn share", ".0%"), ("psnr", "PSNR dB", ".1f"), ("max_diff", "max diff", ".2e"),
           ("over_graph", "PAB alone", ".3f"), ("vs_hook", "vs hook", ".1e"), ("vs_eager", "vs eager", ".1e")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small configs and a reduced long one, 2 rounds")
    p.add_argument("--configs", help=f"comma-separated subset of {', '.join(CONFIGS)} (or of the quick ones)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5, --quick 2)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip onnxruntime")
    p.add_argument("--compile", action="store_true", help="also torch.compile (slow to compile)")
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
    rows = []
    for name, (family, build, description) in table.items():
        run_config(name, family, build, description, args, rows)
    print()
    print_table(rows, COLUMNS, title=f"PAB (spatial 2, temporal 4, cross 6 in {WINDOW}), {args.steps} DDIM steps, "
                                     f"median of {args.rounds} interleaved rounds")
    print("bound: untouched loop time / (that time - time of the attention calls PAB broadcasts); "
          "of bound: speed-up / bound")
    if args.json:
        write_json(args.json, {"rows": rows, "machine": machine(), "args": vars(args)})
    bad = [r for r in rows if r.get("vs_hook") is not None and r["variant"] == "dittofx" and not r["vs_hook"] <= 1e-5]
    return 1 if bad or any(math.isnan(r["speedup"]) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
