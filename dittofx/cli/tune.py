"""`dittofx tune`: the most aggressive setting of a pass whose outputs still agree with the untouched model.

    dittofx tune timm:vit_base_patch16_224 --weights vit_b16.safetensors --pass tome --min-agreement 0.99 \\
        --inputs ./calibration-images/
    dittofx tune hf:./videomae-base --pass rlt --metric top1 --min-agreement 0.98 --inputs ./clips/
    dittofx tune diffusers:./latte#transformer --pass pab --min-agreement 30 --inputs latents.pt --steps 20
    SPEC=$(dittofx tune zoo:vit --pass tome --quiet)      # only the spec on stdout

What is searched (the settings form a ladder from mild to aggressive; binary search finds the last
rung within the budget, and the rung above it has been measured outside it):

- tome: r, the tokens merged per block, 1 up to half the first block's tokens (`--inflection I`
  searches the (r, I) schedule instead of a constant r); for diffusion models, the merge ratio of
  tomesd mode, 0.1 to 0.9.
- rlt: tau, the largest mean absolute difference of a dropped tubelet, 0 to 1 by 0.01.
- pab: the (spatial, temporal, cross) broadcast ranges, in the order of measure.tune.PAB_LADDER.

Other options given with --pass (e.g. `--pass tome:prop_attn=False`,
`--pass pab:timestep_window=(50,900)`) are kept. Agreement (`dittofx.measure.agreement`): cosine (default)
or top-1 for classifiers, cosine for other encoders, PSNR of the final latent of a `--steps` denoising
loop for diffusion models (default budget 30 dB; otherwise 0.99). Calibration inputs come from
`--inputs`; without them random inputs are used, which makes agreement meaningless for real weights.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex

from dittofx.cli.bench import add_workload_args, check_common, setup_for
from dittofx.cli.common import add_model_args, load_model, writable
from dittofx.errors import DittoError
from dittofx.measure.tune import DEFAULT_BUDGET, TUNABLE, check_budget, ladder, search


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="find the most aggressive pass setting whose outputs stay within an agreement budget",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.set_defaults(batch=8)
    p.add_argument("--pass", dest="pass_spec", required=True, metavar="NAME[:OPTIONS]",
                   help="the pass to tune: tome, rlt or pab, optionally with options to keep (tome:prop_attn=False)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="the budget: cosine or top-1 in [0, 1] (default 0.99), PSNR in dB (default 30)")
    p.add_argument("--metric", choices=("cosine", "top1", "psnr"), default=None,
                   help="agreement metric (default: psnr for diffusion models, else cosine)")
    add_workload_args(p)
    p.add_argument("--samples", type=int, default=8, help="random inputs to use without --inputs (default 8)")
    p.add_argument("--inflection", type=float, default=None,
                   help="tome: search r of the schedule (r, INFLECTION), a ramp from r(1-I) to r(1+I), in [-1, 1]")
    p.add_argument("--json", dest="json_out", metavar="OUT.json", help="write every setting tried as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from dittofx.api import optimize
    from dittofx.cli import progress
    from dittofx.exporters.files import write_atomic
    from dittofx.measure.agreement import check_metric, default_metric
    from dittofx.measure.bench import machine, measure_agreement
    from dittofx.measure.flops import count_flops
    from dittofx.measure.workload import call_module
    from dittofx.passes.spec import parse_pass

    check_common(args)
    if args.samples < 1:
        raise DittoError(f"--samples must be at least 1, got {args.samples}")
    base = parse_pass(args.pass_spec)
    if base.name not in TUNABLE:
        raise DittoError(f"tune searches {', '.join(TUNABLE)}; {base.name!r} has no setting to tune")
    if args.metric is not None and args.min_agreement is not None:
        check_budget(args.metric, args.min_agreement)
    json_out = writable(args.json_out, "--json") if args.json_out else None

    with progress.stage(f"load {args.model}" + (f" with {args.weights}" if args.weights else "")):
        loaded = load_model(args)
    with progress.stage("capture and analyse"):
        probe = optimize(loaded.model, [], loaded.example_inputs, loaded.example_kwargs).report
    what, rungs = ladder(base, probe, args.inflection)
    su = setup_for(args, loaded, probe, random_samples=None if args.inputs else args.samples)
    metric = args.metric or default_metric(su.kind)
    check_metric(metric, su.kind)
    budget = args.min_agreement if args.min_agreement is not None else DEFAULT_BUDGET[metric]
    check_budget(metric, budget)
    if not args.inputs:
        progress.warn(f"no --inputs: tuning on {args.samples} random inputs; random inputs make agreement "
                      f"meaningless for real weights: pass --inputs with your images, videos or latents")

    model = loaded.model
    references: dict = {}
    tried: dict[int, dict] = {}
    best = {}  # the module of the last setting found within the budget (binary search only climbs)

    def evaluate(i: int) -> bool:
        rung = rungs[i]
        with progress.stage(f"try {rung.spec}"):
            opt = optimize(model, [rung.spec], loaded.example_inputs, loaded.example_kwargs)
            agr = measure_agreement(model, su.calibration, su.kind, call_module(opt), opt.reset, references)
        value = agr.value(metric)
        ok = value >= budget
        tried[i] = {"value": rungs[i].label, "spec": rung.spec, "metric": value, "within": ok,
                    "agreement": agr.as_dict()}
        if ok:
            best["opt"] = opt
        progress.info(f"  {metric} {_fmt(metric, value)}: {'within' if ok else 'outside'} the budget")
        return ok

    with progress.stage(f"search {base.name} {what} over {len(rungs)} settings, {metric} >= {_fmt(metric, budget)}"):
        chosen, above = search(rungs, evaluate)

    bound = None
    if chosen >= 0:
        with progress.stage("count FLOPs of the chosen setting"):
            wl = su.workload
            opt = best["opt"]
            base_flops = count_flops(lambda: wl.run(call_module(model)))
            opt_flops = count_flops(lambda: wl.run(call_module(opt), reset=opt.reset))
            bound = base_flops / opt_flops if opt_flops else None

    result = {
        "model": args.model, "pass": base.name, "searched": what, "metric": metric, "min_agreement": budget,
        "kind": su.kind, "inputs": args.inputs or "random", "samples": sum(w.batch for w in su.calibration),
        "steps": su.workload.steps if su.workload.diffusion else None,
        "chosen": rungs[chosen].spec if chosen >= 0 else None,
        "next": rungs[above].spec if above is not None else None,
        "flop_ratio": bound, "machine": machine(),
        "tried": [dict(tried[i]) for i in sorted(tried)],
    }
    for entry in result["tried"]:
        if not math.isfinite(entry["metric"]):
            entry["metric"] = None
    if json_out:
        write_atomic(json_out, lambda tmp: _write_json(tmp, result))

    if progress.is_quiet():
        if chosen >= 0:
            print(rungs[chosen].spec)
        return 0 if chosen >= 0 else 1
    _print_table(rungs, tried, metric, budget, chosen)
    first = tried.get(0)
    if chosen < 0:
        print(f"no setting of {base.name} keeps {metric} >= {_fmt(metric, budget)}: the mildest, {rungs[0].spec}, "
              f"gives {_fmt(metric, first['metric'])}; lower --min-agreement or check the inputs")
        return 1
    line = f"chosen: {rungs[chosen].spec}  ({metric} {_fmt(metric, tried[chosen]['metric'])}"
    line += f", FLOP bound {bound:.2f}x)" if bound else ")"
    print(line)
    if above is not None:
        print(f"next more aggressive: {rungs[above].spec} gives {metric} {_fmt(metric, tried[above]['metric'])}, "
              f"outside the budget {_fmt(metric, budget)}")
    else:
        print(f"{rungs[chosen].spec} is the most aggressive setting searched")
    print(f"use it: {export_command(args, rungs[chosen].spec)}")
    if json_out:
        print(f"wrote {json_out}")
    return 0


def _fmt(metric: str, value: float) -> str:
    if metric == "psnr":
        return "identical" if math.isinf(value) else f"{value:.1f} dB"
    if metric == "top1":
        return f"{value:.1%}"
    return f"{value:.4f}"


def export_command(args, spec: str) -> str:
    """The `dittofx export` line that deploys `spec` on the model tuned: every flag that selects the model
    or its weights kept (pasted without --weights, it would export random weights), and for PAB a folder
    (its export writes one ONNX per broadcast pattern)."""
    words = ["dittofx", "export", args.model]
    if args.weights:
        words += ["--weights", args.weights]
    if args.pretrained:
        words.append("--pretrained")
    if args.input_shape:
        words += ["--input-shape", ",".join(map(str, args.input_shape))]
    words += ["--pass", spec, "-o", "model_pab/" if spec.partition(":")[0] == "pab" else "model.onnx"]
    return shlex.join(words)


def _print_table(rungs, tried, metric, budget, chosen) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"settings tried ({metric} >= {_fmt(metric, budget)})", title_justify="left")
    for col in ("setting", metric, "within budget"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for i in sorted(tried):
        t = tried[i]
        mark = "yes" if t["within"] else "no"
        table.add_row(t["spec"] + ("  <- chosen" if i == chosen else ""), _fmt(metric, t["metric"]), mark)
    Console(width=max(100, Console().width)).print(table)


def _write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2, allow_nan=False, default=str)
        f.write("\n")
