"""Training-step benchmark (issue 15): RLT and ToMe while training, speed-up against their bounds, and memory.

    python benchmarks/train.py                 # VideoMAE-S (RLT), ViT-B/16 (ToMe r=16): ~10 min on 2 cores
    python benchmarks/train.py --quick         # small models, 2 rounds: a smoke test of every table
    python benchmarks/train.py --device cuda   # on a GPU (memory from torch.cuda.max_memory_allocated)

One training step = forward, cross-entropy against fixed random labels, backward, AdamW step (then
zero_grad(set_to_none=True)). The untouched model's optimizer holds `model.parameters()`; dittofx's holds
`opt.parameters()` (the original's weights plus RLT's length embedding). dittofx trains its original's
weights in place, so each model is its own copy, built with the same seed: the untouched one, and one
original per dittofx configuration, given to `dittofx.optimize(original.eval(), [pass], (x,)).train()`.
The first training call captures the training graph; it is made (and timed) before anything is measured.

(a) RLT(length_embedding=True) on VideoMAE-S's shape (benchmarks/rlt.py's `build_model`: 384 wide, 12
    layers, 6 heads, 16 frames of 224 x 224, tubelet 2 x 16 x 16: 1568 tokens per clip), batch `--batch`,
    with the real clip benchmarks/data/cityCC0_224.mp4 (rlt.py's loader) and synthetic clips 50 % static
    (rlt.py's maker); layout "packed" (the default: one sequence, block-diagonal attention) and "padded".
    Bound: the kept-token ratio, all tokens / kept tokens over the batch (what the token-wise layers save;
    attention, quadratic in the tokens, saves more, so a speed-up may exceed it). The FLOP ratio of the
    forward is shown next to it.
(b) ToMe(r=16) on timm's vit_base_patch16_224 (random weights, 1000 classes) at 224, batch `--vit-batch`.
    Bound: the FLOP ratio of the forward (matmuls, convolutions, attention), counted as benchmarks/tome.py
    does (`count_flops`); each matmul's backward costs twice its forward, so the step's ratio is the same
    up to the optimizer's token-independent work.
Timing: the untouched model and the dittofx ones run interleaved (A B C A B C ...) after a warm-up; a
speed-up is the median of the per-round ratios (dittofx.measure.timing.interleaved); the ms are medians.
Goal: speed-up >= 0.9 x bound.

(c) Peak memory of one training step, each configuration in a fresh subprocess (`--quick`: one for
    all; the tensor figure does not depend on what ran before it), its dittofx model captured straight
    in train mode (the same training graph), measured after one warm-up step (capture, AdamW's state).
    "step peak": the most bytes of tensors alive during the step above what was alive before it
    (activations saved for backward, gradients, temporaries); "weights+AdamW": what was alive before
    it; "total": their sum. On CPU the step peak comes from torch.profiler's allocator events
    (profile_memory=True: every allocation and free of the CPU allocator, summed in time order), exact
    for tensors whatever malloc keeps, and the resting figure is counted from the tensors. On CUDA:
    torch.cuda.max_memory_allocated() less memory_allocated() before the step, which is the resting
    figure. Cross-check on CPU: the growth of the process's peak RSS over the step (VmHWM after
    /proc/self/clear_refs, malloc told to return large blocks), which also counts what is not a tensor.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import rlt as rlt_bench
import tome as tome_bench
import torch
import torch.nn.functional as F
from common import count_flops, interleaved, machine, print_table, write_json

import dittofx
from dittofx.passes.rlt import RLT
from dittofx.passes.tome import ToMe

FULL = {"width": 384, "layers": 12, "heads": 6, "frames": 16, "size": 224, "batch": 2,
        "arch": "vit_base_patch16_224", "depth": None, "img": 224, "vit_batch": 8, "r": 16, "rounds": 5, "warmup": 1}
QUICK = {"width": 192, "layers": 2, "heads": 3, "frames": 16, "size": 112, "batch": 2,
         "arch": "vit_tiny_patch16_224", "depth": 4, "img": 224, "vit_batch": 4, "r": 16, "rounds": 2, "warmup": 1}
LAYOUTS = ("packed", "padded")
MB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small models, 2 rounds: a smoke test")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, help="clips per step, RLT rows (default 2)")
    p.add_argument("--vit-batch", type=int, help="images per step, ToMe row (default 8; --quick 4)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5; --quick 2)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--static", type=float, nargs="*", default=[0.5], help="static shares of the synthetic clips")
    p.add_argument("--real", default=rlt_bench.REAL_CLIP, help="the video for the real-clip rows")
    p.add_argument("--no-real", action="store_true")
    p.add_argument("--r", type=int, help="ToMe's r (default 16)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: rlt, tome, memory")
    p.add_argument("--json", help="write the rows and the machine to this JSON file")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)  # internal: measure these configurations, print JSON
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - {"rlt", "tome", "memory"}:
        p.error(f"--skip {','.join(sorted(args.skip))}: accepted rlt, tome, memory")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# -- models, inputs and the step ----------------------------------------------------------------------


def video_inputs(args) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(label, clips, labels): rlt.py's clips (real first, then synthetic), labels from a fixed seed."""
    sets = rlt_bench.clip_sets(args)  # synthetic ones, then the real clip (if any)
    sets = sorted(sets, key=lambda s: s[2] is not None)  # the real clip first (it has no expected share)
    labels = torch.randint(0, 400, (args.batch,), generator=torch.Generator().manual_seed(2))
    return [(label, x, labels) for label, x, _ in sets]


def vit_input(args) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(args.vit_batch, 3, args.img, args.img, generator=gen)
    return x, torch.randint(0, 1000, (args.vit_batch,), generator=gen)


def video_model(args) -> torch.nn.Module:
    return rlt_bench.build_model(args).to(args.device)  # seeded: every call gives the same weights


def vit_model(args) -> torch.nn.Module:
    if args.depth is None:  # tome.py's model
        return tome_bench.build_model(argparse.Namespace(arch=args.arch, img=args.img, weights=None)).to(args.device)
    import timm

    torch.manual_seed(0)
    return timm.create_model(args.arch, pretrained=False, img_size=args.img, depth=args.depth).eval().to(args.device)


def vit_name(args) -> str:
    return f"{args.arch}{f' depth {args.depth}' if args.depth else ''} @{args.img}"


def rlt_model(args, layout: str, example: torch.Tensor, mode: str = "eval"):
    """dittofx's RLT on a fresh original; mode "train": captured straight in train mode (one capture, the
    same training graph as eval's optimize followed by train() and a first call)."""
    model = video_model(args).train(mode == "train")
    return dittofx.optimize(model, [RLT(tau=args.tau, length_embedding=True, layout=layout)], (example,))


def tome_model(args, example: torch.Tensor, mode: str = "eval"):
    return dittofx.optimize(vit_model(args).train(mode == "train"), [ToMe(r=args.r)], (example,))


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_step(model, params, x, labels, device: str):
    """One training step of `model` on (x, labels); its own AdamW over `params`. Runs with gradients even
    when called under inference_mode (the timing helper's)."""
    adam = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.inference_mode(False), torch.enable_grad():
            loss = F.cross_entropy(logits_of(model(x)), labels)
            loss.backward()
            adam.step()
            adam.zero_grad(set_to_none=True)
        sync(device)

    return step


def first_call(name: str, step) -> None:
    start = time.perf_counter()
    step()
    log(f"{name}: first training step (captures the training graph) {time.perf_counter() - start:.1f}s")


def forward_flops(model, x) -> int:
    return count_flops(lambda: model(x))


# -- (a) RLT ------------------------------------------------------------------------------------------


def bench_rlt(args) -> list[dict]:
    inputs = video_inputs(args)
    tokens = (args.frames // 2) * (args.size // 16) ** 2
    log(f"(a) RLT: VideoMAE {args.width} wide, {args.layers} layers, {args.heads} heads, {args.frames} x {args.size}"
        f" x {args.size}, {tokens} tokens per clip, batch {args.batch}, tau {args.tau}, length embedding; "
        f"layouts {', '.join(LAYOUTS)}")
    untouched = video_model(args).train()
    example = inputs[0][1].to(args.device)
    opts = {}
    for layout in LAYOUTS:
        start = time.perf_counter()
        opts[layout] = rlt_model(args, layout, example)
        log(f"optimize RLT layout={layout}: {time.perf_counter() - start:.1f}s")
    rows = []
    for label, x_cpu, y_cpu in inputs:
        x, y = x_cpu.to(args.device), y_cpu.to(args.device)
        share = rlt_bench.kept_share(x_cpu, args.tau)
        untouched.eval()
        base_flops = forward_flops(untouched, x)
        flops = {}
        for layout, opt in opts.items():
            opt.eval()
            flops[layout] = forward_flops(opt, x)
            opt.train()
        untouched.train()
        steps = {"untouched": make_step(untouched, untouched.parameters(), x, y, args.device)}
        for layout, opt in opts.items():
            steps[layout] = make_step(opt, opt.parameters(), x, y, args.device)
            if not any(v.for_training for v in opt.variants):
                first_call(f"RLT {layout}", steps[layout])
        log(f"{label}: {share:.1%} of the tokens kept; timing {len(steps)} models, {args.rounds} rounds")
        timings = interleaved(steps, rounds=args.rounds, warmup=args.warmup, clock=args.clock,
                              on_round=lambda i: log(f"  round {i + 1}/{args.rounds}"))
        for layout in LAYOUTS:
            t = timings[layout]
            row = {"clips": label, "layout": layout, "kept": share, "bound": 1 / share,
                   "flop_bound": base_flops / flops[layout], "base_ms": timings["untouched"].median * 1e3,
                   "ms": t.median * 1e3, "speedup": t.speedup, "spread": t.spread, "rounds": t.ratios}
            row["of_bound"] = row["speedup"] / row["bound"]
            rows.append(row)
            log(f"  {layout}: {row['ms']:.0f} ms vs {row['base_ms']:.0f} ms, speed-up {row['speedup']:.2f}x, "
                f"bound {row['bound']:.2f}x ({row['of_bound']:.2f} of it)")
    return rows


# -- (b) ToMe -----------------------------------------------------------------------------------------


def bench_tome(args) -> list[dict]:
    x_cpu, y_cpu = vit_input(args)
    x, y = x_cpu.to(args.device), y_cpu.to(args.device)
    log(f"(b) ToMe r={args.r}: {vit_name(args)}, batch {args.vit_batch}")
    untouched = vit_model(args)
    start = time.perf_counter()
    opt = tome_model(args, x)
    log(f"optimize ToMe r={args.r}: {time.perf_counter() - start:.1f}s")
    bound = forward_flops(untouched, x) / forward_flops(opt, x)
    untouched.train()
    opt.train()
    steps = {"untouched": make_step(untouched, untouched.parameters(), x, y, args.device),
             "tome": make_step(opt, opt.parameters(), x, y, args.device)}
    first_call("ToMe", steps["tome"])
    log(f"timing 2 models, {args.rounds} rounds")
    timings = interleaved(steps, rounds=args.rounds, warmup=args.warmup, clock=args.clock,
                          on_round=lambda i: log(f"  round {i + 1}/{args.rounds}"))
    t = timings["tome"]
    row = {"model": vit_name(args), "r": args.r, "batch": args.vit_batch,
           "base_ms": timings["untouched"].median * 1e3, "ms": t.median * 1e3, "speedup": t.speedup,
           "spread": t.spread, "bound": bound, "of_bound": t.speedup / bound, "rounds": t.ratios}
    log(f"  {row['ms']:.0f} ms vs {row['base_ms']:.0f} ms, speed-up {row['speedup']:.2f}x, FLOP bound "
        f"{bound:.2f}x ({row['of_bound']:.2f} of it)")
    return [row]


# -- (c) memory ---------------------------------------------------------------------------------------


def memory_configs(args) -> list[list[str]]:
    """Configurations as 'family:what[:clip set]', grouped by the process that measures them."""
    configs = []
    if "rlt" not in args.skip:
        n_sets = len(args.static) + (0 if args.no_real else 1)
        configs += ["video:untouched:0"] + [f"video:{layout}:{i}" for i in range(n_sets) for layout in LAYOUTS]
    if "tome" not in args.skip:
        configs += ["vit:untouched", "vit:tome"]
    return [configs] if args.quick else [[c] for c in configs]


def _rss_mb() -> tuple[float, float]:
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _resting_bytes(model, adam_states: list) -> int:
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for state in adam_states:
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def measure_step(model, x, y, device: str) -> dict:
    """Peak memory of one training step of `model` after a warm-up step (module docstring, (c))."""
    adam = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = F.cross_entropy(logits_of(model(x)), y)
        loss.backward()
        adam.step()
        adam.zero_grad(set_to_none=True)
        sync(device)

    step()
    gc.collect()
    if device.startswith("cuda"):
        resting = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return {"resting_mb": resting / MB, "step_mb": (torch.cuda.max_memory_allocated() - resting) / MB,
                "rss_mb": None}
    from torch.profiler import ProfilerActivity, profile

    resting = _resting_bytes(model, list(adam.state.values()))
    rss_ok = _reset_peak_rss()
    rss_before, _ = _rss_mb()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    _, hwm = _rss_mb()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return {"resting_mb": resting / MB, "step_mb": peak / MB, "rss_mb": (hwm - rss_before) if rss_ok else None}


def memory_child(args) -> None:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    inputs = vit = None
    for config in args.memory_child.split(","):
        family, what, *rest = config.split(":")
        if family == "video":
            inputs = inputs or video_inputs(args)
            _, x, y = inputs[int(rest[0])]
            x, y = x.to(args.device), y.to(args.device)
            model = video_model(args) if what == "untouched" else rlt_model(args, what, x, "train")
        else:
            vit = vit or vit_input(args)
            x, y = (t.to(args.device) for t in vit)
            model = vit_model(args) if what == "untouched" else tome_model(args, x, "train")
        result = measure_step(model.train(), x, y, args.device)
        print("MEMORY " + json.dumps({"config": config, **result}), flush=True)
        del model
        gc.collect()


def bench_memory(args, video_labels: list[str]) -> list[dict]:
    groups = memory_configs(args)
    log(f"(c) memory: {sum(map(len, groups))} configurations in {len(groups)} fresh process(es)")
    forwarded, skip = [], False
    for a in args.argv:  # the parent's options, less --json
        if not skip and not a.startswith("--json"):
            forwarded.append(a)
        skip = a == "--json"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # large blocks back to the OS: RSS follows tensors
    results = {}
    for group in groups:
        start = time.perf_counter()
        command = [sys.executable, os.path.abspath(__file__), *forwarded, "--memory-child", ",".join(group)]
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        found = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("MEMORY ")]
        if proc.returncode or len(found) != len(group):
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise SystemExit(f"memory child {','.join(group)} failed (exit {proc.returncode}):\n{tail}")
        for r in found:
            results[r["config"]] = r
        log(f"  {','.join(group)}: {time.perf_counter() - start:.0f}s")
    rows = []
    for config, r in results.items():
        family, what, *rest = config.split(":")
        base = results[f"{family}:untouched" + (":0" if family == "video" else "")]
        total, base_total = r["resting_mb"] + r["step_mb"], base["resting_mb"] + base["step_mb"]
        if family == "video":
            name = "untouched" if what == "untouched" else f"RLT {what}"
            inp = "any clips" if what == "untouched" else video_labels[int(rest[0])]
            model = f"VideoMAE {args.width}x{args.layers}, batch {args.batch}"
        else:
            name = "untouched" if what == "untouched" else f"ToMe r={args.r}"
            inp = "random images"
            model = f"{vit_name(args)}, batch {args.vit_batch}"
        rows.append({"model": model, "config": name, "input": inp, "step_mb": r["step_mb"],
                     "step_ratio": r["step_mb"] / base["step_mb"], "resting_mb": r["resting_mb"], "total_mb": total,
                     "total_ratio": total / base_total, "rss_mb": r["rss_mb"]})
    return rows


# -- main ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    info = machine()
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    log(f"machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, load average "
        f"{', '.join(f'{v:.1f}' for v in info['load_average'] or ())}; torch {info['torch']}; device "
        f"{args.device}{f' ({gpu})' if gpu else ''}; {args.rounds} interleaved rounds after {args.warmup} warm-up, "
        f"{args.clock} clock")
    total = time.perf_counter()
    results = {"machine": info, "device": args.device, "gpu": gpu,
               "config": {k: v for k, v in vars(args).items() if k not in ("argv", "skip", "memory_child")}}
    rlt_rows = bench_rlt(args) if "rlt" not in args.skip else []
    tome_rows = bench_tome(args) if "tome" not in args.skip else []
    video_labels = [label for label, _, _ in video_inputs(args)] if "rlt" not in args.skip else []
    mem_rows = bench_memory(args, video_labels) if "memory" not in args.skip else []

    print()
    threads = f"{args.threads} threads" if args.device == "cpu" else gpu
    if rlt_rows:
        print_table(rlt_rows, [
            ("clips", "clips", ""), ("layout", "layout", ""), ("kept", "kept", ".1%"),
            ("bound", "bound", ".2f"), ("flop_bound", "FLOP bound", ".2f"), ("base_ms", "untouched ms", ".0f"),
            ("ms", "RLT ms", ".0f"), ("speedup", "speed-up", ".2f"), ("spread", "+-", ".2f"),
            ("of_bound", "speed-up / bound", ".2f")],
            f"(a) RLT(length_embedding=True) training step, VideoMAE {args.width} wide x {args.layers} layers, "
            f"{args.frames} x {args.size}^2, batch {args.batch}, {args.device} ({threads}); bound = all / kept "
            f"tokens")
        print()
    if tome_rows:
        print_table(tome_rows, [
            ("model", "model", ""), ("r", "r", ""), ("batch", "batch", ""), ("base_ms", "untouched ms", ".0f"),
            ("ms", "ToMe ms", ".0f"), ("speedup", "speed-up", ".2f"), ("spread", "+-", ".2f"),
            ("bound", "FLOP bound", ".2f"), ("of_bound", "speed-up / bound", ".2f")],
            f"(b) ToMe training step, {args.device} ({threads})")
        print()
    if mem_rows:
        how = "torch.cuda.max_memory_allocated" if args.device != "cpu" else "tensors, torch.profiler's allocator"
        print_table(mem_rows, [
            ("model", "model", ""), ("config", "config", ""), ("input", "input", ""),
            ("step_mb", "step peak MB", ".0f"), ("step_ratio", "ratio", ".2f"),
            ("resting_mb", "weights+AdamW MB", ".0f"), ("total_mb", "total MB", ".0f"),
            ("total_ratio", "ratio", ".2f"), ("rss_mb", "RSS growth MB", ".0f")],
            f"(c) peak memory of one training step ({how}); ratio = with the pass / untouched")
        print()
    for row in rlt_rows + tome_rows:
        name = f"RLT {row['layout']}, {row['clips']}" if "layout" in row else f"ToMe r={row['r']}"
        print(f"goal speed-up >= 0.9 x bound, {name}: {row['speedup']:.2f}x / {row['bound']:.2f}x = "
              f"{row['of_bound']:.2f} {'met' if row['of_bound'] >= 0.9 else 'NOT met'} (+-{row['spread']:.2f})")
    log(f"done in {time.perf_counter() - total:.0f}s")
    results.update(rlt=rlt_rows, tome=tome_rows, memory=mem_rows)
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
