"""`dittofx export`, `dittofx build-engine` and `dittofx check-trt`: deploy a model to ONNX / TensorRT.

    dittofx export zoo:vit --pass tome:r=8 --format onnx -o vit.onnx
    dittofx export zoo:latte --pass pab -o latte_pab/     # a folder: one ONNX per broadcast pattern
    dittofx build-engine vit.onnx -o vit.plan --fp16 --batch 1:8:32
    dittofx check-trt vit.onnx        # exit 0: TensorRT will parse it, 1: it will not
"""

from __future__ import annotations

import os

from dittofx.cli.common import add_model_args, add_pass_args, load_model
from dittofx.errors import DittoError, ExportError
from dittofx.exporters.verify import DEFAULT_ATOL, DEFAULT_RTOL, check_tolerances
from dittofx.passes.spec import pass_name

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a (optimized) model to ONNX, checked in onnxruntime, or to a TensorRT engine",
        description="Load MODEL, run the passes, export it with a dynamic batch, check the ONNX in onnxruntime "
        "against PyTorch and report its TensorRT readiness. Nothing is written when a check fails.",
    )
    add_model_args(p)
    add_pass_args(p)
    p.add_argument("--format", choices=["onnx", "tensorrt"], default=None,
                   help="onnx (default) or tensorrt (default when OUT ends in .plan/.engine)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="the file to write (with --pass pab: a new folder, one ONNX per broadcast pattern); "
                   "a symbolic link is written through: its target is replaced, the link stays")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset, 18 (default) to 25; 23+ gives the ONNX Attention op")
    p.add_argument("--optimize", action="store_true",
                   help="optimize the ONNX (onnxscript; plus onnxruntime's offline optimizer for --format onnx)")
    _add_precision(p)
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                   help="onnxruntime vs PyTorch: every element within atol + rtol x |torch| "
                   f"(default {DEFAULT_RTOL:g})")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                   help=f"the absolute part of that tolerance (default {DEFAULT_ATOL:g})")
    p.add_argument("--timing-cache", metavar="FILE", help="TensorRT timing cache (with --format tensorrt)")
    p.set_defaults(run=run_export)

    p = subparsers.add_parser(
        "build-engine", help="build a TensorRT engine from an ONNX file",
        description="Parse ONNX with TensorRT's ONNX parser and build a serialized engine with an optimization "
        "profile for the dynamic batch. Needs the tensorrt package and an NVIDIA GPU.",
    )
    p.add_argument("onnx", metavar="MODEL.onnx")
    p.add_argument("-o", "--output", required=True, metavar="OUT.plan")
    _add_precision(p)
    p.add_argument("--batch", default="1:1:8", metavar="MIN:OPT:MAX", help="batch range of the profile (default 1:1:8)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=MIN:OPT:MAX",
                   help="profile of an input with other dynamic dims, shapes as AxBxC, e.g. "
                   "tokens=1x64x384:4x64x384:8x128x384 (repeatable)")
    p.add_argument("--timing-cache", metavar="FILE", help="timing cache file: read if it exists, written after")
    p.add_argument("--workspace-gb", type=float, default=None, help="limit of TensorRT's workspace pool")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(run=run_build_engine)

    p = subparsers.add_parser(
        "check-trt", help="report what in an ONNX file TensorRT's parser will refuse (exit 1 when anything)",
        description="Static TensorRT-readiness check of an ONNX file: opset, operators, TopK K, scatter "
        "reductions, data-dependent shapes. Needs neither TensorRT nor a GPU. "
        "Exit 0 when ready, 1 when it found errors.",
    )
    p.add_argument("onnx", metavar="MODEL.onnx")
    p.add_argument("--quiet", action="store_true", help="print nothing; only the exit code")
    p.set_defaults(run=run_check_trt)


def _add_precision(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fp16", action="store_true",
                   help="float16 engine (TensorRT 10: builder flag; 11: the ONNX is converted)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 engine (TensorRT 10 only)")


def run_export(args) -> int:
    from dittofx.cli import progress
    from dittofx.exporters.files import check_new_folder, check_output_path

    check_tolerances(args.rtol, args.atol, DittoError)
    pab = any(pass_name(spec) == "pab" for spec in args.passes or ())
    out = check_new_folder(args.output, "PAB export") if pab else check_output_path(args.output)
    fmt = args.format or ("tensorrt" if out.lower().endswith(ENGINE_SUFFIXES) else "onnx")
    if pab and (fmt == "tensorrt" or args.optimize):
        raise DittoError("a PAB model exports as a folder of ONNX models, one per broadcast pattern, run by "
                         "dittofx.runtime.onnxruntime.OnnxPABRunner: use --format onnx without --optimize, -o FOLDER")
    if fmt == "onnx" and (args.fp16 or args.bf16):
        raise DittoError("--fp16/--bf16 apply to --format tensorrt (the ONNX keeps the model's precision)")
    if fmt == "onnx" and args.timing_cache:
        raise DittoError("--timing-cache applies to --format tensorrt")
    if fmt == "tensorrt":
        from dittofx.runtime.tensorrt import import_tensorrt, require_cuda

        import_tensorrt()  # before any work: say how to install it
        require_cuda("building a TensorRT engine")

    with progress.stage(f"load {args.model}"):
        loaded = load_model(args)
    model = loaded.model
    if args.passes:
        from dittofx.api import optimize

        with progress.stage(f"passes: {' '.join(args.passes)}"):
            model = optimize(model, args.passes, example_inputs=loaded.example_inputs,
                             example_kwargs=loaded.example_kwargs, check=args.check)

    common = dict(opset=args.opset, optimize=args.optimize, rtol=args.rtol, atol=args.atol)
    if pab:
        from dittofx.exporters.onnx_pab import export_pab_onnx

        result = export_pab_onnx(model, out, loaded.example_inputs, loaded.example_kwargs, opset=args.opset,
                                 rtol=args.rtol, atol=args.atol)
    elif fmt == "onnx":
        from dittofx.exporters.onnx import export_onnx

        result = export_onnx(model, out, loaded.example_inputs, loaded.example_kwargs, **common)
    else:
        from dittofx.exporters.tensorrt import export_tensorrt

        result = export_tensorrt(model, out, loaded.example_inputs, loaded.example_kwargs, fp16=args.fp16,
                                 bf16=args.bf16, timing_cache=args.timing_cache, **common)
    if not progress.is_quiet():
        print(result)
    return 0


def run_build_engine(args) -> int:
    from dittofx.cli import progress
    from dittofx.exporters.tensorrt import build_engine, parse_range

    batch = parse_range(args.batch, "--batch")
    shapes = {}
    for item in args.shape:
        name, sep, spec = item.partition("=")
        parts = spec.split(":")
        if not sep or not name or len(parts) != 3:
            raise DittoError(f"--shape {item!r} is not NAME=MIN:OPT:MAX with shapes like 1x64x384")
        try:
            shapes[name] = tuple(tuple(int(d) for d in p.split("x")) for p in parts)
        except ValueError:
            raise DittoError(f"--shape {item!r}: shapes are integers joined by x, e.g. 1x64x384") from None
    result = build_engine(args.onnx, args.output, fp16=args.fp16, bf16=args.bf16, batch=batch, shapes=shapes or None,
                          timing_cache=args.timing_cache, workspace_gb=args.workspace_gb)
    if not progress.is_quiet():
        print(result)
    return 0


def run_check_trt(args) -> int:
    from dittofx.exporters.trt_check import check_tensorrt_readiness

    if not os.path.isfile(args.onnx):
        raise ExportError(f"no such ONNX file: {args.onnx}")
    report = check_tensorrt_readiness(args.onnx)
    if not args.quiet:
        print(report)
    return 0 if report.ok else 1
