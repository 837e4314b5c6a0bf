"""Sequence parallelism (issue 16): one process against two, with and without PAB; diffusers' own
context parallelism side by side; a projection to 8 devices.

    python benchmarks/parallel.py               # Latte, CogVideoX, Wan at bench size, 20-step loops: ~10 min on 2 cores
    python benchmarks/parallel.py --quick       # the zoo's sizes, 6 steps, 1 round: a smoke test of every table
    python benchmarks/parallel.py --json out.json

Every figure comes from one run of 2 processes (gloo on localhost, one thread each, both ranks build
the same model from the same seed). Inside the run, each rank times in turn, interleaved (A B C D A B
C D ...): the untouched model alone, PAB alone (both 1 process: each rank runs its own copy at the same
moments, so both cores are busy as in the split runs), `sp` and `sp` + `pab` (the 2 processes
together). A figure is the median over rounds of rank 0's wall time for one DDIM loop of `--steps`
steps (dittofx.measure.workload), divided by the steps; a speed-up is the median of the per-round
ratios to the untouched model.

Bytes: what one rank sent to the other per step (`opt.comm_stats`, dittofx.runtime.sp: an all_to_all
counts what leaves the rank, an all_gather its chunk once per other rank), averaged over the loop.
The peer, diffusers' `enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))` on the same
Wan weights (the only one of the three with a `_cp_plan`), is counted the same way by wrapping the
functional collectives its attention dispatch and hooks call. It needs one shim on a CPU-only machine:
diffusers picks its device as `rank % torch.accelerator.device_count()`, which is 0 there.

The projection to 8 devices is a model, not a measurement, at Latte-1's size (512 x 512, 16 frames:
16,384 tokens, 28 layers, 1152 wide; the PAB paper evaluates Latte among its models). Its FLOPs per
step are counted on the meta device; what PAB saves of them, the collectives per layer and the bytes
per (token x width x layer) come from the measured bench-size Latte row. Per step: compute = FLOPs / P
/ R, plus communication = collectives x a + bytes one rank sends / B, with the Ulysses volume per rank
scaled from 2 ranks to P as (P - 1) / P^2 (an all_to_all of a 1/P share sends (P - 1)/P of it) and an
all_gather as (P - 1) / P. R, B and a are stated with the table (H100 SXM-like: 400 TFLOP/s sustained,
300 GB/s all-to-all per GPU over NVLink, 10 us per collective); the paper's measured figure is printed
next to it.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch
from common import machine, print_table, write_json

import dittofx
from dittofx.measure.flops import count_flops
from dittofx.measure.timing import interleaved
from dittofx.measure.workload import Workload, call_module
from dittofx.models import zoo

MODELS = ("latte", "cogvideox", "wan")
PAPER = ("PAB paper (ICLR 2025, Fig. 1), PAB + sequence parallelism on 8 H100s against 1: Latte (2 s, 512 x 512) "
         "8.7x; Open-Sora 10.5x, Open-Sora-Plan 8.4x")
RATE, BANDWIDTH, LATENCY = 400e12, 300e9, 10e-6  # FLOP/s, bytes/s, seconds per collective: the projection's device


def build(name: str, size: str):
    """(model, args, kwargs): the zoo's model, or at `size="bench"` the same architecture made wider and
    longer, so that a step's compute outweighs gloo's fixed cost per collective on localhost."""
    zm = zoo.build(name, batch=1)
    if size == "zoo":
        return zm.model, zm.example_inputs, zm.example_kwargs
    from diffusers import CogVideoXTransformer3DModel, LatteTransformer3DModel, WanTransformer3DModel

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(1, 32, 64, generator=gen)
    t = torch.tensor([500])
    if name == "latte":  # 4 frames x 16 x 16 patches: 1024 tokens
        m = LatteTransformer3DModel(num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=8,
                                    num_layers=2, sample_size=32, patch_size=2, cross_attention_dim=256,
                                    caption_channels=64, video_length=4)
        x = torch.randn(1, 4, 4, 32, 32, generator=gen)
        return m.eval(), (x,), {"encoder_hidden_states": text, "timestep": t}
    if name == "cogvideox":  # 32 text + 3 frames x 16 x 16 patches: 800 tokens
        m = CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=4,
                                        num_layers=2, sample_width=32, sample_height=32, sample_frames=9,
                                        patch_size=2, text_embed_dim=64, time_embed_dim=64, max_text_seq_length=32)
        x = torch.randn(1, 3, 4, 32, 32, generator=gen)
        return m.eval(), (x,), {"encoder_hidden_states": text, "timestep": t}
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=4,
                              out_channels=4, text_dim=64, freq_dim=64, ffn_dim=1024, num_layers=2,
                              rope_max_seq_len=64)  # 4 frames x 16 x 16 patches: 1024 tokens
    x = torch.randn(1, 4, 4, 32, 32, generator=gen)
    return m.eval(), (x,), {"encoder_hidden_states": text, "timestep": t.float()}


def sent_by(comm: dict, kind: str) -> float:
    """Bytes one rank sent per step in collectives of `kind` (CommStats.mean's form)."""
    return comm["by_kind"].get(kind, [0, 0])[1]


class Counted:
    """A stand-in for diffusers' `funcol` / `dist` module names: the collectives it calls, counted as
    dittofx counts its own (bytes this rank sends to the others)."""

    def __init__(self, module, world: int, log: list):
        self._module, self._world, self._log = module, world, log

    def __getattr__(self, name):
        fn = getattr(self._module, name)
        if name == "all_to_all_single":
            def counted(x, output_split_sizes, input_split_sizes, group, *a, **k):
                sent = x.numel() * x.element_size()
                if input_split_sizes is None:
                    sent = sent * (self._world - 1) // self._world
                else:
                    row = x[0].numel() * x.element_size() if x.dim() else 0
                    sent = row * (sum(input_split_sizes) - input_split_sizes[group_rank(group)])
                self._log.append(("all_to_all", sent))
                return fn(x, output_split_sizes, input_split_sizes, group, *a, **k)
            return counted
        if name in ("all_gather_tensor", "all_gather"):
            def counted(*a, **k):
                x = a[0] if name == "all_gather_tensor" else a[1]
                self._log.append(("all_gather", x.numel() * x.element_size() * (self._world - 1)))
                return fn(*a, **k)
            return counted
        return fn


def group_rank(group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group if not hasattr(group, "get_group") else group.get_group())


def diffusers_cp(model, world: int):
    """A copy of `model` under diffusers' Ulysses context parallelism, and the list its collectives log to."""
    import diffusers.hooks.context_parallel as hooks
    import diffusers.models.attention_dispatch as dispatch
    from diffusers import ContextParallelConfig

    log: list = []
    for mod in (hooks, dispatch):
        for name in ("funcol", "dist"):
            if hasattr(mod, name) and not isinstance(getattr(mod, name), Counted):
                setattr(mod, name, Counted(getattr(mod, name), world, log))
    torch.accelerator.device_count = lambda: 1  # diffusers: device = rank % device_count(), 0 without a GPU
    peer = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    return peer, log


def self_attention_broadcast_share(opt, run) -> float:
    """The share of self-attention calls (those with collectives around them: not cross-attention) that a
    loop of `opt` broadcast instead of computing."""
    opt.reset()
    run()
    pab = opt.graph_module.pab
    sites = [i for i, site in enumerate(pab.sites) if site.kind != "cross"]
    computed, broadcast = pab.state.computed, pab.state.broadcast
    done = sum(computed[i] for i in sites) + sum(broadcast[i] for i in sites)
    return sum(broadcast[i] for i in sites) / max(done, 1)


def worker(rank: int, world: int, name: str, size: str, steps: int, rounds: int, warmup: int) -> dict:
    model, args, kwargs = build(name, size)
    kwargs = {**kwargs, "return_dict": False}
    opt = {k: dittofx.optimize(model, passes, args, kwargs) for k, passes in
           (("pab", ["pab"]), ("sp", ["sp"]), ("sp+pab", ["sp", "pab"]))}
    wl = Workload.of(model, args, kwargs, timestep_input=opt["pab"].report.timestep_input, steps=steps)
    runs = {"untouched": lambda: wl.run(call_module(model))}
    for k, o in opt.items():
        runs[k] = (lambda o=o: wl.run(call_module(o), reset=o.reset))
    peer = peer_log = None
    if getattr(model, "_cp_plan", None):
        peer, peer_log = diffusers_cp(model, world)
        runs["diffusers CP"] = lambda: wl.run(call_module(peer))
    with torch.inference_mode():
        outputs = {k: fn() for k, fn in runs.items()}
    ref = outputs["untouched"]

    def diff(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    row = {"model": name, "size": size, "steps": steps,
           "max_diff": {"sp": diff(outputs["sp"], ref), "sp+pab vs pab": diff(outputs["sp+pab"], outputs["pab"])}}
    if peer is not None:
        row["max_diff"]["diffusers CP"] = diff(outputs["diffusers CP"], ref)
        peer_log.clear()
        with torch.inference_mode():
            runs["diffusers CP"]()
        kinds = {k: [sum(kind == k for kind, _ in peer_log) / steps,  # as CommStats.mean gives dittofx's
                     sum(b for kind, b in peer_log if kind == k) / steps] for k in ("all_to_all", "all_gather")}
        peer_comm = {"calls_per_call": len(peer_log) / steps, "bytes_per_call": sum(b for _, b in peer_log) / steps,
                     "ms_per_call": None, "by_kind": kinds}
    row["broadcast_share"] = self_attention_broadcast_share(opt["sp+pab"], lambda: wl.run(
        call_module(opt["sp+pab"]), reset=opt["sp+pab"].reset))
    flops = {"untouched": count_flops(runs["untouched"]), "pab": count_flops(runs["pab"])}
    flops.update({k: count_flops(runs[k]) for k in ("sp", "sp+pab")})  # one rank's share
    timings = interleaved(runs, rounds=rounds, warmup=warmup)
    comm = {k: opt[k].comm_stats.mean(-steps) for k in ("sp", "sp+pab")}  # per step, over the last timed loop
    if peer is not None:
        comm["diffusers CP"] = peer_comm
    row.update(comm=comm, flops={k: v / steps for k, v in flops.items()},
               ms={k: statistics.median(t.seconds) / steps * 1e3 for k, t in timings.items()},
               speedup={k: t.speedup for k, t in timings.items()},
               spread={k: t.spread for k, t in timings.items()})
    return row


LATTE_1 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
               cross_attention_dim=1152, sample_size=64, patch_size=2, caption_channels=4096, video_length=16,
               activation_fn="gelu-approximate", norm_type="ada_norm_single", num_embeds_ada_norm=1000)
BENCH_LATTE = dict(tokens=4 * 16 * 16, width=4 * 64, layers=2)  # build("latte", "bench")


def latte_1_volumes() -> dict:
    """Latte-1's size (512 x 512, 16 frames: 16,384 tokens, 28 layers, 1152 wide): its FLOPs per step,
    counted on the meta device (no memory, no time)."""
    from diffusers import LatteTransformer3DModel

    with torch.device("meta"):
        m = LatteTransformer3DModel(**LATTE_1).eval()
        x = torch.empty(1, 4, 16, 64, 64)
        text = torch.empty(1, 120, 4096)
        t = torch.tensor([500])
    return {"flops": count_flops(lambda: m(x, encoder_hidden_states=text, timestep=t, return_dict=False)),
            "tokens": 16 * 32 * 32, "width": 16 * 72, "layers": 28}


def project(row: dict, devices: int) -> dict:
    """Speed-ups over one device of the projection's kind (see the docstring), at Latte-1's size: its
    FLOPs counted; PAB's share of them, the collectives per layer and the bytes per token, width and
    layer taken from the measured bench-size Latte row (attention volume is linear in each)."""
    real = latte_1_volumes()
    layers = real["layers"] / BENCH_LATTE["layers"]
    volume = real["tokens"] * real["width"] * real["layers"] / (
        BENCH_LATTE["tokens"] * BENCH_LATTE["width"] * BENCH_LATTE["layers"])
    f1 = real["flops"]
    fp = f1 * row["flops"]["pab"] / row["flops"]["untouched"]
    p = devices
    times = {"1 device": f1 / RATE, "pab, 1 device": fp / RATE}
    for key, flops in (("sp", f1), ("sp+pab", fp)):
        c = row["comm"][key]
        sent = (sent_by(c, "all_to_all") * volume * 4 * (p - 1) / p ** 2
                + sent_by(c, "all_gather") * real["tokens"] / BENCH_LATTE["tokens"] * 2 * (p - 1) / p)
        times[key] = flops / p / RATE + c["calls_per_call"] * layers * LATENCY + sent / BANDWIDTH
    return {"model": "Latte-1 (projected)", "tflops_per_step": f1 / 1e12,
            **{k: times["1 device"] / v for k, v in times.items() if k != "1 device"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the zoo's sizes, 6 steps, 1 round")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--steps", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--devices", type=int, default=8, help="devices of the projection (default 8)")
    p.add_argument("--json", help="write every figure to this JSON file")
    a = p.parse_args()
    size = "zoo" if a.quick else "bench"
    steps = a.steps or (6 if a.quick else 20)
    rounds = a.rounds or (1 if a.quick else 3)
    from dittofx.runtime.sp import launch

    rows = []
    for name in a.models.split(","):
        print(f"{name}: 2 processes, {steps}-step loops, {rounds} rounds ...", flush=True)
        rows.append(launch(worker, 2, name, size, steps, rounds, 0 if a.quick else 1, timeout=3600.0)[0])

    table = []
    for r in rows:
        for key, label in (("sp", "sp"), ("sp+pab", "sp + pab"), ("diffusers CP", "diffusers CP")):
            if key not in r["comm"]:
                continue
            c = r["comm"][key]
            base = r["comm"].get("diffusers CP")
            table.append({
                "model": r["model"], "config": label, "ms1": r["ms"]["untouched"], "ms2": r["ms"][key],
                "speedup": r["speedup"][key], "pab1": r["speedup"]["pab"], "coll": c["calls_per_call"],
                "kb": c["bytes_per_call"] / 1024, "in_coll": c["ms_per_call"],
                "vs": c["bytes_per_call"] / base["bytes_per_call"] if base else None,
                "diff": r["max_diff"].get(key if key != "sp+pab" else "sp+pab vs pab"),
                "skipped": r["broadcast_share"] if key == "sp+pab" else None})
    print()
    print_table(table, [("model", "model", ""), ("config", "2 processes", ""), ("ms1", "1 proc ms/step", ".1f"),
                        ("ms2", "2 proc ms/step", ".1f"), ("speedup", "speed-up", ".2f"),
                        ("pab1", "pab alone, 1 proc", ".2f"), ("coll", "collectives/step", ".1f"),
                        ("in_coll", "ms in them/step", ".1f"),
                        ("kb", "KiB sent/step/rank", ".1f"), ("vs", "bytes / diffusers CP", ".2f"),
                        ("skipped", "broadcast share", ".0%"), ("diff", "max rel diff", ".1e")],
                title=f"(a) one process vs two ({size} size, one thread each), {steps}-step DDIM loops; "
                      f"sp+pab's difference is to pab in one process")
    for r in rows:
        if "diffusers CP" in r["comm"]:
            ours, theirs = r["comm"]["sp+pab"], r["comm"]["diffusers CP"]
            a2a = sent_by(ours, "all_to_all") / sent_by(theirs, "all_to_all")
            bound = 1 - r["broadcast_share"]
            print(f"goal: {r['model']} sp + pab's attention all_to_alls send {a2a:.3f} of diffusers CP's bytes, at "
                  f"most 1 - broadcast share = {bound:.3f}: {'met' if a2a <= bound + 1e-9 else 'NOT met'} (all bytes, "
                  f"the output's all_gather included, which every step makes in both: "
                  f"{ours['bytes_per_call'] / theirs['bytes_per_call']:.3f})")
    proj = [project(r, a.devices) for r in rows if r["model"] == "latte" and r["size"] == "bench"]
    print()
    print_table(proj, [("model", "model", ""), ("tflops_per_step", "TFLOP/step", ".1f"),
                       ("pab, 1 device", "pab, 1 device", ".2f"),
                       ("sp", f"sp, {a.devices} devices", ".2f"), ("sp+pab", f"sp + pab, {a.devices} devices", ".2f")],
                title=f"(b) PROJECTION to {a.devices} devices (a model, not a measurement): speed-up over one device "
                      f"from the measured FLOPs and bytes per step, at {RATE / 1e12:.0f} TFLOP/s, "
                      f"{BANDWIDTH / 1e9:.0f} GB/s, {LATENCY * 1e6:.0f} us per collective")
    print(PAPER)
    if a.json:
        write_json(a.json, {"machine": machine(), "rows": rows, "projection": proj, "paper": PAPER,
                            "device_model": {"flops_per_s": RATE, "bytes_per_s": BANDWIDTH, "latency_s": LATENCY}})


if __name__ == "__main__":
    main()
