"""How rewritten graphs run: eagerly, compiled, in onnxruntime or TensorRT, and the contract for the
ones that keep state between calls.

The contract. A pass whose graph keeps state between calls (PAB's caches) puts a `StatefulModule` in
it. That one fact answers every question the API, the exporters and the CLI ask of a graph:

    is_stateful(gm)            can it be exported as one stateless model? (no: export_onnx refuses)
    reset(gm)                  drop the state (OptimizedModule.reset), and start again the sequences of
                               `SequenceState` modules (ToMe's use_rand generator), which are not state
                               a caller or runner deals with
    make_runner(gm, compiled)  what a call runs: the stateful module's own runner, torch.compile, or
                               an eager program (runtime/eager.py)

A pass that keeps a value computed at run time for the user (ToMe's source matrix) puts a `Recorder`
in the graph under the attribute name the user reads (`opt.tome_source`): `recorded(gms, name)`.

Runners of exported models (`OnnxRuntimeRunner`, `OnnxPABRunner`, `TensorRTRunner`) live in
`runtime/onnxruntime.py` and `runtime/tensorrt.py` and are importable from here.
"""

from dittofx.runtime.stateful import (  # noqa: F401 - the contract, used by the API, exporters and CLI
    Recorder,
    SequenceState,
    StatefulModule,
    is_stateful,
    make_runner,
    recorded,
    reset,
    stateful_modules,
)


def __getattr__(name):  # the runners, as `dittofx.runtime.OnnxRuntimeRunner` (their old home)
    if name in ("OnnxRuntimeRunner", "OnnxPABRunner"):
        from dittofx.runtime import onnxruntime

        return getattr(onnxruntime, name)
    if name in ("TensorRTRunner", "TENSORRT_MISSING", "import_tensorrt", "require_cuda"):
        from dittofx.runtime import tensorrt

        return getattr(tensorrt, name)
    raise AttributeError(f"module 'dittofx.runtime' has no attribute {name!r}")
