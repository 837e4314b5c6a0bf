"""dittofx: a model compiler that makes vision and diffusion transformers skip repeated work.

    opt = dittofx.optimize(model, passes=["tome:r=16"], example_inputs=(x,))
    dittofx.export_onnx(opt, "model.onnx", example_inputs=(x,))
"""

__version__ = "0.1.0"

__all__ = ["optimize", "export_onnx", "OptimizedModule", "DittoError", "__version__"]


def __getattr__(name):  # keep `import dittofx` light: torch and friends load on first use
    if name in ("optimize", "OptimizedModule"):
        from dittofx import api

        return getattr(api, name)
    if name == "export_onnx":
        from dittofx.exporters.onnx import export_onnx

        return export_onnx
    if name == "DittoError":
        from dittofx.errors import DittoError

        return DittoError
    raise AttributeError(f"module 'dittofx' has no attribute {name!r}")
