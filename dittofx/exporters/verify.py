"""Does an exported ONNX model compute what the PyTorch module does? Checked in onnxruntime.

The gate is elementwise, as numpy.allclose: every element must satisfy
|onnx - torch| <= atol + rtol * |torch|, so an output of mixed scales (one 1e6 element among values
near 1) is checked at each element's own scale; NaN must sit where PyTorch has NaN, an infinity where
it has the same infinity. A refusal names the worst element (its index, both values). What the
exporters report as the agreement is the max relative difference max|onnx - torch| / max|torch|
over the outputs (`compare`), a summary, not the gate.

Defaults (DEFAULT_RTOL, DEFAULT_ATOL), measured (float32, onnxruntime 1.32 CPU): over every export
of the test suite (timm ViT, ToMe, RLT, PAB CogVideoX, DiT, PixArt, small modules) the largest
|difference| beyond 1e-4 * |torch| was 1.2e-6, on timm's ViT-B/16 at 224 (logits and the final
hidden states, up to 4.7) 3.4e-6: atol 1e-4 leaves a margin of 30x over those, where a wrong export
(a wrong reduction, a dropped token) differs by 1e-2 to 1.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from dittofx._log import log
from dittofx.errors import ExportError, first_line
from dittofx.runtime.onnxruntime import ort_message, session

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-4


def check_tolerances(rtol, atol, error=ExportError) -> tuple[float, float]:
    """(rtol, atol) as floats when both are finite numbers >= 0, else `error` (one line): checked
    before any work, so a bad tolerance does not wait for the whole export to be refused."""
    for name, value, example in (("rtol", rtol, DEFAULT_RTOL), ("atol", atol, DEFAULT_ATOL)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise error(f"{name} must be a finite number >= 0 (e.g. {example:g}), got {value!r}")
    return float(rtol), float(atol)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _as_float64(got, ref) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(got).astype(np.float64)
    b = (_to_numpy(ref) if isinstance(ref, torch.Tensor) else np.asarray(ref)).astype(np.float64)
    return a, b


def _differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| per element: 0 where both are NaN or the same infinity, inf where only one is NaN."""
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    same = (nan_a & nan_b) | (np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b)))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a - b))
    return np.where(nan_a != nan_b, np.inf, diff)


def compare(got: np.ndarray, ref) -> tuple[float, float, float]:
    """(max relative difference, max |got - ref|, max |ref|): relative = max|a-b| / max|b| (the
    reported summary; the gate is `worst_element`)."""
    a, b = _as_float64(got, ref)
    if a.shape != b.shape:
        return math.inf, math.inf, math.nan
    if a.size == 0:
        return 0.0, 0.0, 0.0
    max_diff = float(_differences(a, b).max())
    scale = float(np.where(np.isfinite(b), np.abs(b), 0.0).max())
    if max_diff == 0:
        return 0.0, 0.0, scale
    rel = max_diff / scale if scale > 0 else math.inf
    return rel, max_diff, scale


def worst_element(got, ref, rtol: float, atol: float) -> tuple[tuple[int, ...], float, float] | None:
    """None when every element satisfies |got - ref| <= atol + rtol * |ref|; else the element furthest
    beyond its tolerance (in multiples of it): (index, got value, ref value)."""
    a, b = _as_float64(got, ref)
    if a.size == 0:
        return None
    diff = _differences(a, b)
    allowed = atol + rtol * np.where(np.isfinite(b), np.abs(b), 0.0)
    if (diff <= allowed).all():
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        beyond = np.where(allowed > 0, diff / allowed, np.where(diff > 0, np.inf, 0.0))
    flat = int(np.argmax(beyond))
    if math.isinf(beyond.flat[flat]):  # beyond any tolerance: the largest difference among those
        flat = int(np.argmax(np.where(np.isinf(beyond), diff, -1.0)))
    index = tuple(int(i) for i in np.unravel_index(flat, a.shape))
    return index, float(a.flat[flat]), float(b.flat[flat])


def check_in_onnxruntime(path, in_names, out_names, checks, rtol, atol, rerun=None) -> float:
    """Run the ONNX file on each check, (what, input tensors, PyTorch's output tensors), and refuse
    (ExportError, one line) an element beyond atol + rtol * |torch|; returns the worst max relative
    difference (`compare`).

    rerun: for a graph that chooses by comparing values (ToMe's matching, RLT's kept tubelets), PyTorch's
    outputs for other inputs. Such a graph can meet a near tie on a check's inputs: two scores within
    rounding of each other, ordered one way by PyTorch and the other by onnxruntime (about one random
    example in ten for ToMe on a small ViT), and a different choice is a different output. A check it
    fails is then run on three perturbations of its inputs (+ 1e-3 of their spread, seeded) and passes,
    with a warning, when two of them do: a wrong translation fails on those too, a near tie does not
    survive a perturbation (and RLT's choices, thresholds far from 1e-3, stay as they were)."""
    try:  # failures come back as one ExportError line, not as onnxruntime's log
        sess = session(path, ["CPUExecutionProvider"], log_level=4, what="the exported model")
    except ExportError as e:
        raise ExportError(f"{e}; the ONNX file was not written") from None
    missing = [i.name for i in sess.get_inputs() if i.name not in in_names]
    if missing:
        raise ExportError(f"the exported model wants inputs {sorted(missing)} that the example does not give")
    worst = 0.0
    for what, tensors, ref_tensors in checks:
        try:
            worst = max(worst, _check_one(sess, in_names, out_names, what, tensors, ref_tensors, rtol, atol))
        except ExportError as refusal:
            if rerun is None:
                raise
            worst = max(worst, _near_tie(sess, in_names, out_names, what, tensors, rerun, rtol, atol, refusal))
    return worst


def _near_tie(sess, in_names, out_names, what, tensors, rerun, rtol, atol, refusal) -> float:
    """The check of `what` on three perturbations of its inputs; `refusal` again unless two pass."""
    gen = torch.Generator().manual_seed(0)
    worst, passed = 0.0, 0
    for k in range(3):
        inputs = [t + 1e-3 * t.float().std().nan_to_num() * torch.randn(t.shape, generator=gen).to(t.dtype)
                  if t.is_floating_point() and t.numel() > 1 else t for t in tensors]
        with torch.no_grad():
            reference = rerun(inputs)
        try:
            worst = max(worst, _check_one(sess, in_names, out_names, f"{what}, perturbed ({k + 1})", inputs,
                                          reference, rtol, atol))
            passed += 1
        except ExportError:
            continue
    if passed < 2:
        raise refusal
    log.warning("onnxruntime and PyTorch choose differently on %s (a near tie in a comparison of values, as ToMe's "
                "matching): checked on %d of 3 perturbations of it instead (%s)", what, passed,
                first_line(refusal).split("; the ONNX file")[0])
    return worst


def _check_one(sess, in_names, out_names, what, tensors, ref_tensors, rtol, atol) -> float:
    """One check: onnxruntime on `tensors` against PyTorch's `ref_tensors`; its max relative difference."""
    names = [o.name for o in sess.get_outputs()]
    worst = 0.0
    given = dict(zip(in_names, tensors))
    feed = {i.name: _to_numpy(given[i.name]) for i in sess.get_inputs()}  # as PyTorch has them: no casts
    try:
        outs = sess.run(None, feed)
    except Exception as e:  # noqa: BLE001
        msg = ort_message(e)
        hint = ""
        if "Attention" in str(e) and "attn_mask" in str(e):
            hint = (" (onnxruntime's CPU Attention op, opset 23+, needs a mask spanning the full query length: "
                    "export with opset 18)")
        raise ExportError(f"onnxruntime failed to run the exported model on {what}: {msg}{hint}; "
                          "the ONNX file was not written") from None
    got = dict(zip(names, outs))
    for name, ref in zip(out_names, ref_tensors):
        if name not in got:
            raise ExportError(f"the exported model has no output {name!r} (it has {names})")
        a = got[name]
        if tuple(a.shape) != tuple(ref.shape):
            raise ExportError(f"output {name!r} has shape {tuple(a.shape)} in onnxruntime but "
                              f"{tuple(ref.shape)} in PyTorch on {what}; the ONNX file was not written")
        rel = compare(a, ref)[0]
        worst = max(worst, rel)
        bad = worst_element(a, ref, rtol, atol)
        if bad is not None:
            index, value, expected = bad
            raise ExportError(
                f"onnxruntime differs from PyTorch on output {name!r} on {what}: at index {list(index)} "
                f"onnx gives {value:.6g}, torch {expected:.6g}, beyond atol {atol:g} + rtol {rtol:g} x |torch| "
                f"(max relative difference {rel:.3g}); the ONNX file was not written")
    return worst
