"""Export a PAB-optimized model to ONNX: one model per broadcast pattern, caches as inputs/outputs.

    opt = dittofx.optimize(model, ["pab"], example_inputs, example_kwargs)
    export_pab_onnx(opt, "latte_pab/", timesteps=scheduler.timesteps)
    runner = OnnxPABRunner("latte_pab/")          # dittofx.runtime.onnxruntime
    for t in timesteps:
        out, = runner(x, encoder_hidden_states, t.expand(batch))

ONNX has no state, so the schedule stays outside the models: for each pattern (which attention sites
compute on a call) the folder holds `pab_<bits>.onnx`, whose inputs are the model's inputs plus the
cached outputs of the sites that broadcast on that call, and whose outputs are the model's outputs
plus the fresh outputs of the sites that compute. A broadcast site's attention is not in that file.
`manifest.json` (runtime/manifest.py) lists the patterns, the rules (each site's with the timestep
scale its window test reads) and the names; `OnnxPABRunner` keeps the caches and picks the file per
call with the same state machine as the eager graph (generations, guidance branches told apart by
the conditioning inputs: every input but the timestep and the batch input, which is the latent), so
a loop in onnxruntime gives the eager loop's outputs.

The weights are stored once, in `weights.bin`, which every pattern file reads as ONNX external data
(each file also loads on its own); `OnnxPABRunner` maps that file once and hands the same weight
buffers to every session, so N patterns do not cost N copies of the model on disk or in memory.

Caches whose dim 0 is a multiple of the batch are passed batch-major, (B, multiple, ...), so every
file keeps one dynamic `batch` dim.

Cost of one session per pattern (measured, onnxruntime 1.32 CPU): with an arena each, a session
that ran after another cost 0.2-0.7 ms more than when called repeatedly (cold buffers), 8 % of a
small Latte's loop; `OnnxPABRunner` gives all its sessions one arena (onnxruntime's environment
allocator) and stops their idle threads from spinning, which brings that to ~0.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx import _pytree as fx_pytree

from dittofx._log import stage
from dittofx._torch_compat import graph_specs
from dittofx.errors import ExportError
from dittofx.exporters.files import check_new_folder, publish_folder, staging_folder
from dittofx.exporters.onnx import export_onnx, stages_named
from dittofx.exporters.verify import DEFAULT_ATOL, DEFAULT_RTOL, check_tolerances
from dittofx.runtime.manifest import WEIGHTS, Manifest, Pattern
from dittofx.runtime.pab import BroadcastState, PyramidBroadcast, Rule, cache_layout, patterns, program, site_outputs

SHARED_BYTES = 1024  # initializers from this size on are stored once in WEIGHTS


@dataclass
class PABExport:
    directory: str
    files: list[str]
    patterns: list[tuple[bool, ...]]
    max_rel_diff: float | None

    def __str__(self) -> str:
        diff = "not checked" if self.max_rel_diff is None else f"max relative difference {self.max_rel_diff:.2e}"
        return (f"{self.directory}: {len(self.files)} ONNX models (one per broadcast pattern); "
                f"onnxruntime vs PyTorch {diff}")


def pab_graph(module, example_inputs=None, example_kwargs=None) -> tuple[fx.GraphModule, tuple, dict]:
    """The PAB graph that serves a call of `module` (an OptimizedModule or the graph itself) and its
    example inputs."""
    if isinstance(module, fx.GraphModule):
        gm, args, kwargs = module, tuple(example_inputs or ()), dict(example_kwargs or {})
    elif hasattr(module, "graph_for"):
        gm, args, kwargs = module.graph_for(example_inputs, example_kwargs)
    else:
        raise ExportError(f"export_pab_onnx takes the result of dittofx.optimize(model, ['pab', ...]), "
                          f"not {type(module).__name__}")
    if not isinstance(getattr(gm, "pab", None), PyramidBroadcast):
        raise ExportError("the module has no PAB pass applied: optimize it with passes=['pab'] first")
    return gm, args, kwargs


def schedule_patterns(rules: list[Rule], timesteps, timestep_scale: float = 1.0) -> list[tuple[bool, ...]]:
    """The patterns one generation over `timesteps` (one call per step, in the model's timestep units)
    goes through."""
    state = BroadcastState(rules, timestep_scale)
    seen = []
    for t in timesteps:
        step = state.begin(torch.as_tensor(t), None)
        step.caches.update({i: () for i in range(len(rules))})  # every site has a cache after a call
        if step.computes not in seen:
            seen.append(step.computes)
    return seen


def _share_weights(folder: str, entries: list[Pattern]) -> dict:
    """Store the weights once for all the pattern files: every initializer of at least SHARED_BYTES
    goes to WEIGHTS (one copy per distinct name and content) and the files refer to it as ONNX
    external data. Each entry gets `initializers`: {name in that file: key}; returns
    {key: [offset, length, dtype, shape]} for runners that load the weights once (OnnxPABRunner)."""
    import numpy as np
    import onnx
    from onnx import external_data_helper, numpy_helper

    table: dict[tuple, str] = {}
    layout: dict[str, list] = {}
    offset = 0
    with open(os.path.join(folder, WEIGHTS), "wb") as data:
        for entry in entries:
            path = os.path.join(folder, entry.file)
            model = onnx.load(path)
            names = {}
            for tensor in model.graph.initializer:
                array = numpy_helper.to_array(tensor)
                if array.nbytes < SHARED_BYTES:
                    continue
                raw = np.ascontiguousarray(array).tobytes()
                ident = (tensor.name, hashlib.sha1(raw).hexdigest())
                if ident not in table:
                    offset += -offset % 64  # aligned, so that a memory map gives aligned arrays
                    data.seek(offset)
                    data.write(raw)
                    table[ident] = key = f"w{len(table)}"
                    layout[key] = [offset, len(raw), str(array.dtype), list(array.shape)]
                    offset += len(raw)
                key = table[ident]
                tensor.raw_data = raw
                for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    tensor.ClearField(field)
                external_data_helper.set_external_data(tensor, WEIGHTS, offset=layout[key][0], length=layout[key][1])
                tensor.data_location = onnx.TensorProto.EXTERNAL
                tensor.ClearField("raw_data")
                names[tensor.name] = key
            onnx.save(model, path)
            if os.path.exists(path + ".data"):  # export_onnx's own external data (models over 2 GB)
                os.remove(path + ".data")
            entry.initializers = names
    return {"file": WEIGHTS, "tensors": layout}


def export_pab_onnx(module, directory, example_inputs=None, example_kwargs=None, *, timesteps=None,
                    opset: int | None = None, dynamic_batch: bool = True, check: bool = True,
                    rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> PABExport:
    """Write one ONNX model per broadcast pattern and a manifest into `directory` (new or empty).

    timesteps: the patterns a loop over these timesteps needs (e.g. `scheduler.timesteps`); left out,
    every pattern the rules can produce. Each file is checked against PyTorch in onnxruntime, every
    element within atol + rtol * |torch| (exporters/verify.py), as export_onnx checks one file.
    """
    rtol, atol = check_tolerances(rtol, atol)
    if timesteps is not None:
        try:
            timesteps = list(timesteps)
        except TypeError:
            raise ExportError(f"timesteps must be a sequence of timesteps (e.g. scheduler.timesteps) or None, "
                              f"got {type(timesteps).__name__}") from None
        if not timesteps:
            raise ExportError("timesteps is empty: a loop over no timesteps needs no model, so there is nothing to "
                              "export; give the loop's timesteps (e.g. scheduler.timesteps), or None for every pattern")
    gm, args, kwargs = pab_graph(module, example_inputs, example_kwargs)
    directory = check_new_folder(directory, "PAB export")
    schedule = gm.pab
    rules = schedule.rules
    wanted = patterns(rules) if timesteps is None else schedule_patterns(rules, timesteps, schedule.timestep_scale)
    if not wanted:
        raise ExportError("the PAB schedule produces no broadcast pattern: nothing to export")
    in_spec, out_spec = graph_specs(gm)
    flat = fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), in_spec)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    n_outputs = out_spec.num_leaves

    # every cache, from one call where all sites compute; those whose dim 0 is a multiple of the batch
    # are passed batch-major, so that the files keep one dynamic batch dim
    everything = tuple(True for _ in rules)
    with torch.no_grad():
        result = program(gm, everything)(*flat)
    _, all_outs = cache_layout(gm, everything)
    batch_value = flat[schedule.batch_index] if schedule.batch_index is not None else None
    batch = batch_value.shape[0] if isinstance(batch_value, torch.Tensor) and batch_value.dim() else None
    fold, example_cache = {}, {}
    for key, value in zip(all_outs, result[n_outputs:]):
        if batch and dynamic_batch and value.dim() >= 1 and value.shape[0] % batch == 0:
            fold[key] = tuple(value.shape[1:])
            value = value.reshape(batch, -1, *value.shape[1:])
        example_cache[key] = value

    entries, worst = [], None
    with staging_folder(directory) as tmp:
        for number, computes in enumerate(wanted, 1):
            name = "pab_" + "".join("1" if c else "0" for c in computes) + ".onnx"
            ins, outs = cache_layout(gm, computes)
            prog = program(gm, computes, fold)
            example = tuple(flat) + tuple(example_cache[k] for k in ins)
            with stages_named(f"pattern {number}/{len(wanted)} ({name}): "):
                res = export_onnx(prog, os.path.join(tmp, name), example, opset=opset, dynamic_batch=dynamic_batch,
                                  check=check, rtol=rtol, atol=atol)
            if res.max_rel_diff is not None:
                worst = max(worst or 0.0, res.max_rel_diff)
            entries.append(Pattern(name, list(computes), res.input_names, res.output_names,
                                   [list(k) for k in ins], [list(k) for k in outs]))
        with stage(f"store the weights once for {len(entries)} pattern files"):
            weights = _share_weights(tmp, entries)
        n_out = site_outputs(gm)
        Manifest(
            inputs=[n for n, v in zip(placeholders, flat) if isinstance(v, torch.Tensor)],
            timestep_input=placeholders[schedule.timestep_index],
            batch_input=placeholders[schedule.batch_index] if schedule.batch_index is not None else None,
            outputs=n_outputs,
            sites=[{"module": s.module, "kind": s.kind, "range": s.rule.range, "window": list(s.rule.window),
                    "outputs": n_out[i], "timestep_scale": schedule.timestep_scale}
                   for i, s in enumerate(schedule.sites)],
            patterns=entries, weights=weights,
        ).write(tmp)
        publish_folder(tmp, directory)
    return PABExport(directory, [e.file for e in entries], [tuple(e.computes) for e in entries], worst)
