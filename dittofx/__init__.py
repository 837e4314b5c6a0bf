"""dittofx: a model compiler that makes vision and diffusion transformers skip repeated work.

    import dittofx
    from dittofx.passes import ToMe              # or dittofx.ToMe, or the spec string "tome:r=16"

    opt = dittofx.optimize(model, passes=[ToMe(r=16)], example_inputs=(x,))
    dittofx.export_onnx(opt, "model.onnx", example_inputs=(x,))

The flow, one folder per stage (docs/architecture.md): rewriter/ (capture, analysis, graph edits),
passes/ (ToMe, RLT, PAB and the pass manager), runtime/ (how rewritten graphs run), exporters/
(ONNX, TensorRT), models/ (MODEL specs, weights, the zoo), measure/ (bench and tune), cli/.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.2.0"

_LAZY = {
    "optimize": "dittofx.api",
    "compile": "dittofx.api",
    "OptimizedModule": "dittofx.api",
    "export_onnx": "dittofx.exporters.onnx",
    "DittoError": "dittofx.errors",
    "ToMe": "dittofx.passes",
    "RLT": "dittofx.passes",
    "PAB": "dittofx.passes",
    "SequenceParallel": "dittofx.passes",
    "CanonicalizeAttention": "dittofx.passes",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name):  # keep `import dittofx` light: torch and friends load on first use
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dittofx' has no attribute {name!r}")


# Modules that moved in 0.2, importable under their old names for one release (with a warning).
MOVED = {
    "dittofx.zoo": ("dittofx.models.zoo",),
    "dittofx.workload": ("dittofx.measure.workload", "dittofx.measure.inputs"),
    "dittofx.agreement": ("dittofx.measure.agreement",),
    "dittofx.timing": ("dittofx.measure.timing",),
    "dittofx.flops": ("dittofx.measure.flops",),
    "dittofx.progress": ("dittofx.cli.progress",),
    "dittofx.runtime_pab": ("dittofx.runtime.pab", "dittofx.runtime.onnxruntime"),
    "dittofx.rewriter.eager": ("dittofx.runtime.eager",),
    "dittofx.rewriter.graph": ("dittofx.rewriter.edit",),
}


class _MovedModule(importlib.abc.Loader, importlib.abc.MetaPathFinder):
    """`import dittofx.zoo` gives a module that reads its names from the new home(s)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        homes = [importlib.import_module(m) for m in MOVED[spec.name]]
        warnings.warn(f"{spec.name} moved to {' and '.join(MOVED[spec.name])}; the old name goes in the next "
                      f"release", DeprecationWarning, stacklevel=3)
        if len(homes) == 1:
            return homes[0]
        module = type(sys)(spec.name)

        def lookup(attr):
            for home in homes:
                if hasattr(home, attr):
                    return getattr(home, attr)
            raise AttributeError(f"module {spec.name!r} has no attribute {attr!r}")

        module.__getattr__ = lookup
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_MovedModule())
