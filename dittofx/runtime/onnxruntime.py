"""Run exported models in onnxruntime with one call convention: `runner(*inputs) -> list[torch.Tensor]`.

    runner = OnnxRuntimeRunner("model.onnx")        # onnxruntime, CPU (or CUDA when installed)
    runner = OnnxPABRunner("latte_pab/")            # a PAB export folder: caches kept between calls
    logits, = runner(x)

Inputs are torch tensors or numpy arrays, in the order of `runner.input_names` (the flattened
inputs of the exported module), or by name as keyword arguments. Outputs come back as CPU torch
tensors in the order of `runner.output_names`. Both runners open their sessions through `session()`
and feed them through `to_feed()`: one set of options, one dtype table.
"""

from __future__ import annotations

import os
import re
import threading

import numpy as np
import torch

from dittofx.errors import ExportError, first_line
from dittofx.runtime import stateful
from dittofx.runtime.manifest import Manifest
from dittofx.runtime.pab import BroadcastState, Rule
from dittofx.signature import order_inputs

_NUMPY_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("onnxruntime is not installed: pip install 'dittofx[onnx]'") from None
    return ort


def default_providers(ort) -> list[str]:
    """CUDA (where onnxruntime-gpu is installed), then CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


_SHARED_ARENA: bool | None = None


def _share_cpu_arena(ort) -> bool:
    """Register one CPU arena allocator with onnxruntime's environment, once per process; False where
    this onnxruntime cannot (the sessions then keep their own arenas)."""
    global _SHARED_ARENA
    if _SHARED_ARENA is None:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, None)
            _SHARED_ARENA = True
        except Exception:  # noqa: BLE001 - an onnxruntime without environment allocators
            _SHARED_ARENA = False
    return _SHARED_ARENA


def session(path: str, providers: list[str] | None = None, threads: int | None = None, *, one_of_many: bool = False,
            initializers: dict | None = None, log_level: int = 3, what: str | None = None):
    """An onnxruntime InferenceSession of `path`; a file it cannot load is one ExportError line (naming
    `what`, default the path). log_level: onnxruntime's severity threshold (3: errors; 4: nothing).

    one_of_many: the session is one of several that run in turn (PAB's patterns): its idle worker
    threads must not spin-wait after a run (measured: a 30-step loop at 2 threads ran 0.48x the
    untouched model's speed with spinning, 1.57x without), and all such sessions share one memory
    arena (with an arena each, every switch of pattern ran on cold buffers: +0.2 to +0.7 ms a call
    on a small Latte, 8 % of the loop; shared: ~0). initializers: name -> OrtValue supplied by the
    caller (weights shared between sessions).
    """
    ort = import_onnxruntime()
    if not os.path.isfile(path):
        raise ExportError(f"no such ONNX file: {path}")
    so = ort.SessionOptions()
    so.log_severity_level = log_level
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    if one_of_many:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if _share_cpu_arena(ort):
            so.add_session_config_entry("session.use_env_allocators", "1")
    for name, value in (initializers or {}).items():
        so.add_initializer(name, value)
    try:
        return ort.InferenceSession(path, so, providers=list(providers or default_providers(ort)))
    except Exception as e:  # noqa: BLE001 - a bad file or provider is the user's input
        raise ExportError(f"onnxruntime cannot load {what or path}: {first_line(e)}") from None


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


def _shape_text(dims) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def _cast(value: np.ndarray, want, name: str, who: str) -> np.ndarray:
    """`value` as dtype `want`: within a kind (float64 -> float32, int32 -> int64, bool -> float) or,
    for an integer input, from floats that are integers; anything else would change the values."""
    if np.can_cast(value.dtype, want, casting="same_kind"):
        return value.astype(want)
    if np.issubdtype(want, np.integer) and np.issubdtype(value.dtype, np.floating) and \
            np.isfinite(value).all() and (value == np.round(value)).all():
        return value.astype(want)
    raise ExportError(f"{who}: input {name!r} is {value.dtype}, the model takes {np.dtype(want)}: give "
                      f"{np.dtype(want)} values (or a type that converts without loss)")


def to_feed(metas, values, who: str = "the model") -> dict:
    """{input name: numpy array of the dtype the session declares} for the session inputs `metas`;
    a value of the wrong type or shape (against the model's fixed dims, and one size per named dim
    such as `batch`) is one ExportError line naming the input, instead of onnxruntime's."""
    feed, sizes = {}, {}
    for meta, given in zip(metas, values):
        value = given
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        try:
            value = np.asarray(value)
        except Exception:  # noqa: BLE001 - ragged lists and the like
            value = np.asarray(None)
        if value.dtype == object or value.dtype.kind in "USV":
            raise ExportError(f"{who}: input {meta.name!r} must be a tensor or an array, got {type(given).__name__}")
        want = _NUMPY_TYPES.get(meta.type)
        if want is not None and value.dtype != want:
            value = _cast(value, want, meta.name, who)
        dims = meta.shape
        if dims is not None:
            fixed = [d if isinstance(d, int) and d >= 0 else None for d in dims]
            if len(dims) != value.ndim or any(f is not None and f != g for f, g in zip(fixed, value.shape)):
                raise ExportError(f"{who}: input {meta.name!r} has shape {tuple(value.shape)}, the model expects "
                                  f"{_shape_text(dims)}")
            for d, g in zip(dims, value.shape):
                if isinstance(d, str) and d:
                    first = sizes.setdefault(d, (meta.name, g))
                    if first[1] != g:
                        raise ExportError(f"{who}: input {meta.name!r} has {d} = {g} (shape {tuple(value.shape)}), "
                                          f"but input {first[0]!r} has {d} = {first[1]}: they must agree")
        feed[meta.name] = value
    return feed


def run(sess, feed: dict, who: str, fetch=None) -> list:
    """`sess.run`, an onnxruntime failure as one ExportError line naming `who` and the input shapes."""
    try:
        return sess.run(fetch, feed)
    except Exception as e:  # noqa: BLE001 - what the inputs made the model do
        shapes = ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in feed.items())
        raise ExportError(f"onnxruntime failed to run {who} on inputs {shapes}: {ort_message(e)}") from None


def _tensors(outs) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(o)) for o in outs]


class OnnxRuntimeRunner:
    """An onnxruntime session behind `__call__(*inputs) -> list[torch.Tensor]`.

    providers: onnxruntime execution providers; default CUDA (when onnxruntime-gpu is installed)
    then CPU. threads: intra-op threads (default: onnxruntime's choice).
    """

    def __init__(self, path, providers: list[str] | None = None, threads: int | None = None):
        self.path = os.fspath(path)
        self.session = session(self.path, providers, threads)
        self._inputs = self.session.get_inputs()
        self.input_names = [i.name for i in self._inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs, **named) -> list[torch.Tensor]:
        who = os.path.basename(self.path)
        values = order_inputs(self.input_names, inputs, named, who, ExportError)
        return _tensors(run(self.session, to_feed(self._inputs, values, who), who))

    def __repr__(self) -> str:
        return f"OnnxRuntimeRunner({self.path!r}, inputs={self.input_names}, outputs={self.output_names})"


class OnnxPABRunner:
    """Runs a folder written by `dittofx.exporters.onnx_pab.export_pab_onnx` in onnxruntime.

    Called like `OnnxRuntimeRunner`: the model's tensor inputs in the order of `input_names` (or by
    name) -> list of output tensors. Keeps the caches and the schedule state between calls, with the
    same `BroadcastState` and rules as the eager graph (runtime/pab.py: generations, guidance branches
    told apart by the conditioning inputs, per thread); `new_generation()`, `generation()` and
    `cache_context(name, step_index=...)` mark generations and branches as on OptimizedModule;
    `reset()` drops every thread's state.
    """

    def __init__(self, directory, providers: list[str] | None = None, threads: int | None = None):
        self.directory = os.fspath(directory)
        self.manifest = m = Manifest.read(self.directory)
        self.input_names = list(m.inputs)
        self.rules = [Rule(s["range"], tuple(s["window"])) for s in m.sites]
        self.conditioning = [n for n in self.input_names if n not in (m.timestep_input, m.batch_input)]
        scale = m.sites[0].get("timestep_scale", 1.0) if m.sites else 1.0
        self._providers, self._threads = providers, threads
        self._sessions: dict[tuple[bool, ...], object] = {}
        self._weights: dict | None = None
        self._lock = threading.Lock()  # threads: each session and the weights loaded once
        self.state = BroadcastState(self.rules, scale)

    def reset(self) -> None:
        self.state.reset()

    def new_generation(self) -> None:
        """The calling thread's next call starts a new generation."""
        self.state.new_generation()

    def generation(self):
        """`with runner.generation(): ...`: one generation, its boundaries declared (runtime/pab.py)."""
        return stateful.generation([self.state])

    def cache_context(self, name: str, step_index: int | None = None, **_):
        """The calls inside are guidance branch `name` at step `step_index` (as diffusers' cache_context)."""
        return stateful.call_context(name, step_index)

    def session(self, computes: tuple[bool, ...]):
        found = self._sessions.get(computes)
        if found is not None:
            return found
        with self._lock:
            if computes not in self._sessions:
                entry = self.manifest.pattern(computes)
                if entry is None:
                    bits = "".join("1" if c else "0" for c in computes)
                    raise ExportError(f"this export has no model for broadcast pattern {bits}: export with "
                                      f"timesteps=None (every pattern) or with the timesteps this loop uses")
                weights = self._shared_weights()
                self._sessions[computes] = session(
                    os.path.join(self.directory, entry.file), self._providers, self._threads, one_of_many=True,
                    initializers={name: weights[key][1] for name, key in entry.initializers.items()})
            return self._sessions[computes]

    def _shared_weights(self) -> dict:
        """{key: (array, OrtValue)} over one memory map of the shared weights file."""
        if self._weights is None:
            self._weights = {}
            shared = self.manifest.weights
            if shared:
                ort = import_onnxruntime()
                path = os.path.join(self.directory, shared["file"])
                data = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)
                for key, (offset, length, dtype, shape) in shared["tensors"].items():
                    array = np.array(data[offset:offset + length]).view(np.dtype(dtype)).reshape(shape)
                    self._weights[key] = (array, ort.OrtValue.ortvalue_from_numpy(array))  # the array outlives it
        return self._weights

    def __call__(self, *inputs, **named) -> list[torch.Tensor]:
        m = self.manifest
        who = self.directory
        values = dict(zip(self.input_names, order_inputs(self.input_names, inputs, named, who, ExportError)))
        # checked and converted before the schedule state moves on: a refused call leaves it as it was
        # (every pattern file takes the model's inputs alike; the all-compute one is opened first anyway)
        first = next((p for p in m.patterns if all(p.computes)), m.patterns[0])
        metas = self.session(tuple(first.computes)).get_inputs()[:len(self.input_names)]
        model_feed = to_feed(metas, [values[meta.name] for meta in metas], who)
        batch = model_feed[m.batch_input].shape[0] if m.batch_input in model_feed else None
        step = self.state.begin(values[m.timestep_input], batch, [values[n] for n in self.conditioning])
        sess = self.session(step.computes)
        entry = m.pattern(step.computes)
        feed = {meta.name: model_feed[meta.name] for meta in sess.get_inputs()[:len(self.input_names)]}
        for (i, j), name in zip(entry.cache_inputs, entry.inputs[len(self.input_names):]):
            feed[name] = step.caches[i][j]  # as onnxruntime gave it: no conversion
        outs = run(sess, feed, f"{entry.file} of {who}")
        fresh: dict[int, list] = {}
        for (i, _), value in zip(entry.cache_outputs, outs[m.outputs:]):
            fresh.setdefault(i, []).append(value)
        for i, vals in fresh.items():
            step.caches[i] = tuple(vals)
        return _tensors(outs[:m.outputs])
