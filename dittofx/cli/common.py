"""Arguments shared by the subcommands that take a MODEL."""

from __future__ import annotations

import argparse
import re

from dittofx.errors import DittoError

MODEL_HELP = ("timm:NAME | hf:DIR_OR_ID | diffusers:DIR_OR_ID[#subfolder] | FILE.py:FUNCTION | zoo:NAME "
              "(small random-config models: see `dittofx.models.zoo.NAMES`). A hub id (ORG/NAME) is read from the "
              "local Hugging Face cache; only --pretrained downloads it")


def shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(x) for x in re.split(r"[,x]", text.strip()))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"--input-shape takes positive sizes without the batch, e.g. 3,224,224; "
                                         f"got {text!r}")
    return dims


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--weights", metavar="FILE", help="weights to load: a safetensors file or a torch state dict")
    parser.add_argument("--pretrained", action="store_true",
                        help="let timm download its pretrained weights and hf:/diffusers: hub ids be downloaded. "
                             "The hub is contacted only with this flag, after it answered within 3 s; otherwise "
                             "(or with HF_HUB_OFFLINE=1) only the local Hugging Face cache is read")
    parser.add_argument("--input-shape", type=shape, metavar="C,H,W", help="input size without the batch, where it "
                        "cannot be inferred from the model")
    parser.add_argument("--batch", type=int, default=1, help="example batch size (default 1; the graph's batch is "
                        "dynamic)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")


def add_pass_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pass", dest="passes", action="append", default=[], metavar="SPEC",
                        help="a pass, e.g. tome:r=16, pab:spatial=2,temporal=4,cross=6, rlt:tau=0.1 (repeatable, "
                             "applied in order)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the check that the rewritten model at the passes' exact setting computes what "
                             "the model does (one forward of each on the example inputs)")


def parse_pass_args(specs: list[str]) -> list:
    """The --pass specs as passes, their order checked: a typo in a spec is one line before the model
    is loaded, not after."""
    from dittofx.passes.manager import check_order
    from dittofx.passes.spec import parse_passes

    return check_order(parse_passes(specs))


def writable(path: str, flag: str) -> str:
    """The absolute path of an output file named by `flag` (--json, --plot), checked before any work."""
    from dittofx.exporters.files import check_output_path

    return check_output_path(path, DittoError, flag)


def load_model(args):
    """Resolve MODEL with the common arguments; errors are one-line DittoErrors."""
    from dittofx.models import resolve

    if args.batch < 1:
        raise DittoError(f"--batch must be at least 1, got {args.batch}")
    return resolve(args.model, weights=args.weights, pretrained=args.pretrained, input_shape=args.input_shape,
                   batch=args.batch)
