"""`dittofx inspect MODEL`: one line per block: attention kinds, tokens, prefix tokens, passes that apply.

Without --pass, the canonicalisation every pass starts from (passes/sdpa.py: hand-written attention
to SDPA, masks that mask nothing dropped) still runs, so `passes=` lists what each pass would accept
exactly as it would be given.
"""

from __future__ import annotations

from dittofx.cli.common import add_model_args, add_pass_args, load_model, parse_pass_args
from dittofx.errors import UnsupportedModelError


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show the attention blocks dittofx finds and the passes that apply",
                              description=__doc__)
    add_model_args(p)
    add_pass_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from dittofx.api import optimize
    from dittofx.cli import progress

    passes = parse_pass_args(args.passes)
    with progress.stage(f"load {args.model}"):
        loaded = load_model(args)
    with progress.stage("capture and analyse" + (f", run {' '.join(args.passes)}" if args.passes else "")):
        opt = optimize(loaded.model, passes or ["sdpa"], loaded.example_inputs, loaded.example_kwargs,
                       check=args.check)
    if not opt.report.blocks:
        raise UnsupportedModelError(
            f"no attention found in {args.model} ({opt.report.model}): dittofx rewrites models built from "
            f"attention blocks (scaled_dot_product_attention or softmax(Q @ K^T) @ V)")
    print(opt.report)
    return 0
