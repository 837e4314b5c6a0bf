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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small model, batch 4, 2 rounds: a smoke run")
    p.add_argument("--reference", metavar="DIR", help="checkout of facebookresearch/ToMe (holds tome/)")
    p.add_argument("--arch", help="timm architecture (default vit_base_patch16_224)")
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
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tome.json"))
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
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


if __name__ == "__main__":
    main()
