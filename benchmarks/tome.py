"""Token Merging on timm ViT-B/16: dittofx's ToMe pass against the untouched model and the paper's code.

    python benchmarks/tome.py                                  # ViT-B/16 @224, batch 16, 2 threads
    python benchmarks/tome.py --reference /tmp/tome_ref        # + facebookresearch/ToMe, same weights
    python benchmarks/tome.py --quick                          # a small smoke run (ViT-Ti, batch 4)
    python benchmarks/tome.py --threads 1 --clock cpu          # steady figures on a busy shared machine

For each backend (eager PyTorch, torch.compile, onnxruntime) the untouched model and ToMe at every r
run interleaved (A B C ... A B C ...) after a warm-up; a speed-up is the median over rounds of the
per-round ratio. With `--reference DIR` (a checkout of github.com/facebookresearch/ToMe) its
`tome.patch.timm` is applied to a second copy of the model with the same weights and timed in the
same eager run. Next to each speed-up: the FLOP-ratio bound (matmuls, convolutions, attention), and
the agreement of the outputs with the untouched model (cosine of logits, top-1) and, for the
reference, of dittofx's logits with the reference's. One table is printed and a JSON file written.

Weights are random unless `--weights FILE` gives a timm checkpoint (safetensors or state dict); with
random weights the agreement figures show the rewrite works, not what accuracy a trained model keeps.
Targets (issue 3): r=16 at least 1.95x in eager and onnxruntime; eager within 3 % of the reference.

    python benchmarks/tome.py --unet                           # SD1.5's UNet @64x64 latents vs tomesd
    python benchmarks/tome.py --unet --arch sd15-small         # SD1.5's layout at a fifth of its width (README)
    python benchmarks/tome.py --unet --quick                   # a small UNet: a smoke run

`--unet` (issue 13): ToMe's diffusion mode on a UNet2DConditionModel with SD1.5's configuration (random
weights), batch 2 (guidance), against tomesd 0.1.3 at its defaults (max_downsample=1, use_rand=True)
and at max_downsample=8, ratio 0.5: untouched, tomesd and dittofx eager interleaved in one run (and
dittofx's output against tomesd's with the same generator seed), then torch.compile and onnxruntime,
where tomesd cannot go. ONNX cannot hold use_rand's generator: those rows export use_rand=False.
Target: dittofx eager at least as fast as tomesd at both settings.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import count_flops, interleaved, machine, print_table, write_json

import dittofx
from dittofx.measure.agreement import cosine, top1
from dittofx.passes.tome import ToMe

FULL = {"arch": "vit_base_patch16_224", "img": 224, "batch": 16, "rs": [8, 13, 16], "rounds": 5, "warmup": 1}
QUICK = {"arch": "vit_tiny_patch16_224", "img": 224, "batch": 4, "rs": [8, 16], "rounds": 2, "warmup": 1}
UNET_FULL = {"arch": "sd15", "latent": 64, "batch": 2, "rounds": 5, "warmup": 1}
UNET_QUICK = {"arch": "tiny", "latent": 32, "batch": 2, "rounds": 2, "warmup": 1}
# tomesd's keyword arguments per row; dittofx's ToMe takes the same ones
UNET_SETTINGS = {"defaults": {"ratio": 0.5}, "max_downsample=8": {"ratio": 0.5, "max_downsample": 8}}
UNET_CONFIGS = {
    "sd15": {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "cross_attention_dim": 768,
             "attention_head_dim": 8, "norm_num_groups": 32, "text_tokens": 77,
             "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3},
    # SD1.5's layout (4 levels, 3 with cross-attention, 2 layers each, 8 heads, 77 text tokens of 768) at a
    # fifth of its width: the 64x64 latent's 4096-token attention, which tomesd's defaults merge, dominates
    # as in SD1.5, and a round of the 9 callables fits a 2-core CPU
    "sd15-small": {"block_out_channels": (64, 128, 256, 256), "layers_per_block": 2, "cross_attention_dim": 768,
                   "attention_head_dim": 8, "norm_num_groups": 32, "text_tokens": 77,
                   "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3},
    "tiny": {"block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": 32,
             "attention_head_dim": 8, "norm_num_groups": 8, "text_tokens": 7,
             "down_block_types": ("CrossAttnDownBlock2D",) * 2, "up_block_types": ("CrossAttnUpBlock2D",) * 2},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small model, batch 4, 2 rounds: a smoke run")
    p.add_argument("--reference", metavar="DIR", help="checkout of facebookresearch/ToMe (holds tome/)")
    p.add_argument("--arch", help="timm architecture (default vit_base_patch16_224); --unet: sd15, sd15-small or tiny")
    p.add_argument("--weights", metavar="FILE", help="timm checkpoint to load (default: random weights)")
    p.add_argument("--batch", type=int)
    p.add_argument("--rs", type=int, nargs="+", help="values of r (default 8 13 16)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time (default); cpu: process CPU time, steadier on a shared machine "
                        "(use with --threads 1)")
    p.add_argument("--backends", default="eager,compile,onnxruntime",
                   help="comma-separated subset of eager,compile,onnxruntime")
    p.add_argument("--unet", action="store_true", help="SD1.5-style UNet against tomesd (diffusion mode)")
    p.add_argument("--latent", type=int, help="--unet: latent size (default 64)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.json is None:
        name = "tome_unet.json" if args.unet else "tome.json"
        args.json = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    if args.unet and args.arch is not None and args.arch not in UNET_CONFIGS:
        p.error(f"--unet --arch {args.arch}: accepted {', '.join(UNET_CONFIGS)}")
    base = (UNET_QUICK if args.quick else UNET_FULL) if args.unet else QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - {"eager", "compile", "onnxruntime"}
    if unknown:
        p.error(f"unknown backend(s) {sorted(unknown)}; accepted: eager, compile, onnxruntime")
    return args


def build_model(args):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.arch, pretrained=False, img_size=args.img).eval()
    if args.weights:
        from dittofx.models import load_weights

        load_weights(model, args.weights)
    return model


def load_reference(path: str):
    """The paper's code, imported from a checkout (never installed into this repository)."""
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.join(path, "tome")):
        raise SystemExit(f"--reference {path}: no tome/ package there (a checkout of facebookresearch/ToMe)")
    sys.path.insert(0, path)
    import tome

    return tome


def agreement(out, base):
    return {"cosine": cosine(out, base), "top1": top1(out, base)}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.unet:
        return main_unet(args)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    model = build_model(args)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, args.img, args.img, generator=gen)
    tome_ref = load_reference(args.reference) if args.reference else None
    log(f"{args.arch} @{args.img}, batch {args.batch}, {args.threads} threads, r in {args.rs}, "
        f"{args.rounds} rounds; backends {', '.join(args.backends)}")

    with torch.inference_mode():
        base_out = model(x)
    opts, refs, rows = {}, {}, []
    small = x[:2]
    base_flops = count_flops(lambda: model(small))
    for r in args.rs:
        t = time.perf_counter()
        opts[r] = dittofx.optimize(model, [ToMe(r=r)], (x,))
        log(f"r={r}: rewritten in {time.perf_counter() - t:.1f}s")
        if tome_ref is not None:
            refs[r] = copy.deepcopy(model)
            tome_ref.patch.timm(refs[r])
            refs[r].r = r
    facts = {}
    with torch.inference_mode():
        for r in args.rs:
            out = opts[r](x)
            facts[r] = {"flop_bound": base_flops / count_flops(lambda: opts[r](small)), **agreement(out, base_out)}
            if r in refs:
                ref_out = refs[r](x)
                facts[r]["vs_reference_max_rel_diff"] = ((out - ref_out).abs().max() / ref_out.abs().max()).item()
                facts[r]["vs_reference_top1"] = top1(out, ref_out)
                facts[r]["reference_flop_bound"] = base_flops / count_flops(lambda: refs[r](small))

    results = {"config": {k: getattr(args, k) for k in ("arch", "img", "batch", "rs", "rounds", "warmup", "threads",
                                                        "clock")},
               "machine": machine(), "reference": args.reference, "backends": {}}

    def record(backend: str, timings: dict, names: dict) -> None:
        base_t = timings["baseline"]
        results["backends"][backend] = {"baseline_ms": base_t.median * 1e3}
        for r in args.rs:
            t = timings[names[r]]
            row = {"backend": backend, "r": r, "ms": t.median * 1e3, "base_ms": base_t.median * 1e3,
                   "speedup": t.speedup, "spread": t.spread, **facts[r]}
            if backend == "eager" and r in refs:
                rt = timings[f"reference r={r}"]
                row.update(ref_speedup=rt.speedup, ref_spread=rt.spread,
                           vs_ref=t.speedup / rt.speedup)  # same rounds: ratio of speed-ups
                row["ref_rounds"] = rt.ratios
            row["rounds"] = t.ratios
            rows.append(row)
            results["backends"][backend][f"r={r}"] = row

    def rounds_log(backend):
        return lambda i: log(f"{backend}: round {i + 1}/{args.rounds} done")

    if "eager" in args.backends:
        fns = {"baseline": lambda: model(x)}
        names = {}
        for r in args.rs:
            names[r] = f"dittofx r={r}"
            fns[names[r]] = lambda r=r: opts[r](x)
            if r in refs:
                fns[f"reference r={r}"] = lambda r=r: refs[r](x)
        log(f"eager: {len(fns)} callables, interleaved")
        record("eager", interleaved(fns, rounds=args.rounds, warmup=args.warmup, on_round=rounds_log("eager"),
                                       clock=args.clock), names)

    if "compile" in args.backends:
        torch._dynamo.reset()
        compiled = {"baseline": torch.compile(model, fullgraph=True)}
        names = {}
        for r in args.rs:
            names[r] = f"dittofx r={r}"
            compiled[names[r]] = dittofx.optimize(model, [ToMe(r=r)], (x,), compile=True)
        t = time.perf_counter()
        with torch.inference_mode():
            for name, fn in compiled.items():
                out = fn(x)
                if name != "baseline":
                    r = int(name.split("=")[1])
                    facts[r]["compile_cosine_vs_eager"] = cosine(out, opts[r](x))
        log(f"compile: compiled {len(compiled)} graphs in {time.perf_counter() - t:.0f}s")
        fns = {name: (lambda fn=fn: fn(x)) for name, fn in compiled.items()}
        record("compile", interleaved(fns, rounds=args.rounds, warmup=args.warmup, on_round=rounds_log("compile"),
                                         clock=args.clock),
               names)

    if "onnxruntime" in args.backends:
        from dittofx.runtime import OnnxRuntimeRunner

        with tempfile.TemporaryDirectory() as tmp:
            runners, names = {}, {}
            for name, module in [("baseline", model)] + [(f"dittofx r={r}", opts[r]) for r in args.rs]:
                t = time.perf_counter()
                path = os.path.join(tmp, name.replace(" ", "_").replace("=", "") + ".onnx")
                dittofx.export_onnx(module, path, example_inputs=(x,))
                runners[name] = OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"], threads=args.threads)
                log(f"onnxruntime: exported {name} in {time.perf_counter() - t:.0f}s")
            for r in args.rs:
                names[r] = f"dittofx r={r}"
                facts[r]["onnx_cosine_vs_eager"] = cosine(runners[names[r]](x)[0], opts[r](x).detach())
            feed = x.numpy()
            fns = {name: (lambda rn=rn: rn(feed)) for name, rn in runners.items()}
            record("onnxruntime", interleaved(fns, rounds=args.rounds, warmup=args.warmup,
                                              on_round=rounds_log("onnxruntime"), clock=args.clock), names)

    columns = [("backend", "backend", ""), ("r", "r", ""), ("base_ms", "base ms", ".0f"), ("ms", "ToMe ms", ".0f"),
               ("speedup", "speed-up", ".2f"), ("spread", "+-", ".2f"), ("flop_bound", "FLOP bound", ".2f"),
               ("cosine", "cos", ".4f"), ("top1", "top-1", ".2f")]
    if refs:
        columns += [("ref_speedup", "ref speed-up", ".2f"), ("vs_ref", "dittofx/ref", ".3f"),
                    ("vs_reference_max_rel_diff", "vs ref: max rel diff", ".1e"),
                    ("vs_reference_top1", "vs ref top-1", ".2f")]
    title = (f"ToMe on {args.arch} @{args.img}, batch {args.batch}, {args.threads} threads, {args.clock} clock; median "
             f"of {args.rounds} interleaved rounds (speed-up over the untouched model in the same backend)")
    results["table"] = print_table(rows, columns, title)
    results["rows"] = rows
    results["targets"] = targets(rows)
    for line in results["targets"]:
        print(line)
    write_json(args.json, results)
    return results


def targets(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if row["r"] != 16:
            continue
        if row["backend"] in ("eager", "onnxruntime"):
            ok = row["speedup"] >= 1.95
            lines.append(f"target r=16 >= 1.95x in {row['backend']}: {row['speedup']:.2f}x "
                         f"{'met' if ok else 'NOT met'}")
        if row.get("vs_ref") is not None:
            ok = row["vs_ref"] >= 0.97
            lines.append(f"target eager within 3% of the reference's speed-up: dittofx {row['speedup']:.2f}x vs "
                         f"reference {row['ref_speedup']:.2f}x ({row['vs_ref']:.3f}) {'met' if ok else 'NOT met'}")
    return lines


def build_unet(args):
    from diffusers import UNet2DConditionModel

    config = dict(UNET_CONFIGS[args.arch])
    text_tokens = config.pop("text_tokens")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=args.latent, in_channels=4, out_channels=4, **config).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(args.batch, 4, args.latent, args.latent, generator=gen),
              torch.randint(100, 800, (args.batch,), generator=gen))
    return unet, inputs, {"encoder_hidden_states": torch.randn(args.batch, text_tokens, config["cross_attention_dim"],
                                                                generator=gen)}


def main_unet(args) -> dict:
    """ToMe's diffusion mode against tomesd on an SD1.5-style UNet (see the module docstring)."""
    import tomesd

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    unet, inputs, kwargs = build_unet(args)
    log(f"UNet {args.arch} @{args.latent}x{args.latent} latents, batch {args.batch}, {args.threads} threads, "
        f"{args.rounds} rounds; backends {', '.join(args.backends)}")

    def sample(out):
        return out.sample if hasattr(out, "sample") else out[0]

    def run(fn):
        with torch.inference_mode():
            return sample(fn(*inputs, **kwargs))

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    base_out = run(unet)
    refs, opts, facts, rows = {}, {}, {}, []
    for name, options in UNET_SETTINGS.items():
        refs[name] = tomesd.apply_patch(copy.deepcopy(unet), **options)
        refs[name]._tome_info["args"]["generator"] = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        opts[name] = dittofx.optimize(unet, [ToMe(seed=0, **options)], inputs, kwargs)
        log(f"{name}: rewritten in {time.perf_counter() - t:.1f}s")
        got, want = run(opts[name]), run(refs[name])  # first calls: the same draws from the same seed
        facts[name] = {"vs_tomesd": rel(got, want), "vs_untouched": rel(got, base_out)}
    results = {"config": {k: getattr(args, k) for k in ("arch", "latent", "batch", "rounds", "warmup", "threads",
                                                        "clock")},
               "machine": machine(), "tomesd": getattr(tomesd, "__version__", "0.1.3"), "backends": {}}

    def record(backend: str, timings: dict, who: str) -> None:
        base_t = timings["untouched"]
        results["backends"][backend] = {"untouched_ms": base_t.median * 1e3}
        for name in UNET_SETTINGS:
            for impl in (["tomesd"] if backend == "eager" else []) + ["dittofx"]:
                t = timings[f"{impl} {name}"]
                row = {"backend": backend, "impl": impl if impl == "tomesd" else who, "setting": name,
                       "ms": t.median * 1e3, "base_ms": base_t.median * 1e3, "speedup": t.speedup, "spread": t.spread,
                       "rounds": t.ratios, **(facts[name] if impl == "dittofx" and backend == "eager" else {})}
                if impl == "dittofx" and backend == "eager":
                    ref_t = timings[f"tomesd {name}"]
                    row["vs_tomesd_speed"] = t.speedup / ref_t.speedup  # same rounds: ratio of speed-ups
                rows.append(row)
                results["backends"][backend][f"{impl} {name}"] = row

    def rounds_log(backend):
        return lambda i: log(f"{backend}: round {i + 1}/{args.rounds} done")

    def timed(fns: dict, backend: str) -> dict:
        log(f"{backend}: {len(fns)} callables, interleaved")
        return interleaved(fns, rounds=args.rounds, warmup=args.warmup, on_round=rounds_log(backend), clock=args.clock)

    if "eager" in args.backends:
        fns = {"untouched": lambda: unet(*inputs, **kwargs)}
        for name in UNET_SETTINGS:
            fns[f"tomesd {name}"] = lambda name=name: refs[name](*inputs, **kwargs)
            fns[f"dittofx {name}"] = lambda name=name: opts[name](*inputs, **kwargs)
        record("eager", timed(fns, "eager"), "dittofx")

    if "compile" in args.backends:
        torch._dynamo.reset()
        compiled = {"untouched": torch.compile(unet, fullgraph=True)}
        for name, options in UNET_SETTINGS.items():
            compiled[f"dittofx {name}"] = dittofx.optimize(unet, [ToMe(seed=0, **options)], inputs, kwargs,
                                                           compile=True)
        t = time.perf_counter()
        for name, fn in compiled.items():
            out = run(fn)
            if name != "untouched":
                facts[name.split(" ", 1)[1]]["compile_vs_untouched"] = rel(out, base_out)
        log(f"compile: compiled {len(compiled)} graphs in {time.perf_counter() - t:.0f}s")
        record("compile", timed({n: (lambda fn=fn: fn(*inputs, **kwargs)) for n, fn in compiled.items()}, "compile"),
               "dittofx")

    if "onnxruntime" in args.backends:
        from dittofx.runtime import OnnxRuntimeRunner

        with tempfile.TemporaryDirectory() as tmp:
            runners = {}
            modules = [("untouched", unet)] + [
                (f"dittofx {name}", dittofx.optimize(unet, [ToMe(use_rand=False, **options)], inputs, kwargs))
                for name, options in UNET_SETTINGS.items()]
            for name, module in modules:
                t = time.perf_counter()
                path = os.path.join(tmp, name.replace(" ", "_").replace("=", "") + ".onnx")
                dittofx.export_onnx(module, path, example_inputs=inputs, example_kwargs=kwargs)
                runners[name] = OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"], threads=args.threads)
                log(f"onnxruntime: exported {name} in {time.perf_counter() - t:.0f}s")
            feed = [v.numpy() for v in inputs] + [kwargs["encoder_hidden_states"].numpy()]
            fns = {name: (lambda rn=rn: rn(*feed)) for name, rn in runners.items()}
            record("onnxruntime", timed(fns, "onnxruntime"), "dittofx use_rand=False")

    columns = [("backend", "backend", ""), ("impl", "", ""), ("setting", "setting", ""),
               ("base_ms", "untouched ms", ".0f"), ("ms", "ms", ".0f"), ("speedup", "speed-up", ".2f"),
               ("spread", "+-", ".2f"), ("vs_tomesd_speed", "dittofx/tomesd", ".3f"),
               ("vs_tomesd", "vs tomesd: max rel diff", ".1e"), ("vs_untouched", "vs untouched", ".1e")]
    title = (f"ToMe ratio=0.5 on a UNet ({args.arch}) @{args.latent}x{args.latent}, batch {args.batch}, {args.threads} "
             f"threads, {args.clock} clock; median of {args.rounds} interleaved rounds (speed-up over the untouched "
             f"model in the same backend)")
    results["table"] = print_table(rows, columns, title)
    results["rows"] = rows
    results["targets"] = [
        f"target dittofx eager >= tomesd at {row['setting']}: {row['vs_tomesd_speed']:.3f} "
        f"{'met' if row['vs_tomesd_speed'] >= 1.0 else 'NOT met'}" for row in rows if row.get("vs_tomesd_speed")]
    for line in results["targets"]:
        print(line)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
