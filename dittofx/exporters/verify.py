"""Does an exported ONNX model compute what the PyTorch module does? Checked in onnxruntime.

The check: for each output, max|onnx - torch| / max|torch| (the "max relative difference"); an
output passes when max|onnx - torch| <= atol + rtol * max|torch|. The worst output's relative
difference is what the exporters report.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from dittofx.errors import ExportError
from dittofx.runtime.onnxruntime import session


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def compare(got: np.ndarray, ref) -> tuple[float, float, float]:
    """(max relative difference, max |got - ref|, max |ref|): relative = max|a-b| / max|b|."""
    a = np.asarray(got)
    b = _to_numpy(ref) if isinstance(ref, torch.Tensor) else np.asarray(ref)
    if a.shape != b.shape:
        return math.inf, math.inf, math.nan
    if a.size == 0:
        return 0.0, 0.0, 0.0
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if (nan_a != nan_b).any():
        return math.inf, math.inf, math.nan
    same_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    diff = np.where(nan_a | same_inf, 0.0, np.abs(a - b))
    finite_b = np.where(np.isfinite(b), np.abs(b), 0.0)
    max_diff = float(diff.max())
    scale = float(finite_b.max())
    if max_diff == 0:
        return 0.0, 0.0, scale
    rel = max_diff / scale if scale > 0 else math.inf
    return rel, max_diff, scale


def check_in_onnxruntime(path, in_names, tensors, out_names, ref_tensors, rtol, atol) -> float:
    try:  # failures come back as one ExportError line, not as onnxruntime's log
        sess = session(path, ["CPUExecutionProvider"], log_level=4, what="the exported model")
    except ExportError as e:
        raise ExportError(f"{e}; the ONNX file was not written") from None
    given = dict(zip(in_names, tensors))
    missing = [i.name for i in sess.get_inputs() if i.name not in given]
    if missing:
        raise ExportError(f"the exported model wants inputs {sorted(missing)} that the example does not give")
    feed = {i.name: _to_numpy(given[i.name]) for i in sess.get_inputs()}  # as PyTorch has them: no casts
    names = [o.name for o in sess.get_outputs()]
    try:
        outs = sess.run(None, feed)
    except Exception as e:  # noqa: BLE001
        msg = ort_message(e)
        hint = ""
        if "Attention" in str(e) and "attn_mask" in str(e):
            hint = (" (onnxruntime's CPU Attention op, opset 23+, needs a mask spanning the full query length: "
                    "export with opset 18)")
        raise ExportError(f"onnxruntime failed to run the exported model: {msg}{hint}; "
                          "the ONNX file was not written") from None
    got = dict(zip(names, outs))
    worst = 0.0
    for name, ref in zip(out_names, ref_tensors):
        if name not in got:
            raise ExportError(f"the exported model has no output {name!r} (it has {names})")
        a = got[name]
        if tuple(a.shape) != tuple(ref.shape):
            raise ExportError(f"output {name!r} has shape {tuple(a.shape)} in onnxruntime but {tuple(ref.shape)} "
                              "in PyTorch; the ONNX file was not written")
        rel, max_diff, scale = compare(a, ref)
        worst = max(worst, rel)
        if not max_diff <= atol + rtol * (scale if math.isfinite(scale) else 0.0):
            raise ExportError(
                f"onnxruntime differs from PyTorch on output {name!r}: max relative difference {rel:.3g} "
                f"(max |onnx - torch| {max_diff:.3g}, max |torch| {scale:.3g}) is beyond rtol {rtol:g}; "
                "the ONNX file was not written"
            )
    return worst


def ort_message(e: BaseException) -> str:
    """onnxruntime's error without its C++ location and signature: the node and the failed check."""
    text = " ".join(str(e).split())
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    if "Status Message:" in text:
        text = text.split("Status Message:", 1)[1].strip()
        loc = re.match(r"\S+\.(?:h|cc|cpp):\d+ ", text)  # "file.h:70 Status f(signature) the check"
        start = text.find("(") if loc else -1
        if start >= 0:
            depth = 0
            for i in range(start, len(text)):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                if depth == 0:
                    text = text[i + 1 :]
                    break
    text = text.strip()[:300]
    return f"{node.group(1)} node {node.group(2)!r}: {text}" if node else text

