"""The PAB export folder's format: written by `exporters/onnx_pab.py`, read by `OnnxPABRunner`, owned
by neither.

    folder/
      manifest.json        this file's `Manifest`, as JSON
      pab_<bits>.onnx      one model per broadcast pattern (bit i: site i computes on that call)
      weights.bin          the weights, once for all pattern files (ONNX external data)

A pattern file's inputs are the model's tensor inputs, then the cached outputs of the sites that
broadcast on that call; its outputs are the model's outputs, then the fresh outputs of the sites that
compute. Caches are listed as (site, output) pairs, in that order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from dittofx.errors import ExportError

FORMAT = "dittofx-pab/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"


@dataclass
class Pattern:
    file: str
    computes: list[bool]
    inputs: list[str]  # every input name of the file: the model's, then the caches'
    outputs: list[str]
    cache_inputs: list[list[int]]  # (site, output) of each cache input
    cache_outputs: list[list[int]]
    initializers: dict[str, str] = field(default_factory=dict)  # initializer name -> key in Manifest.weights


@dataclass
class Manifest:
    inputs: list[str]  # the model's tensor inputs
    timestep_input: str
    batch_input: str | None
    outputs: int  # how many of each file's outputs are the model's
    sites: list[dict]  # module, kind, range, window, outputs
    patterns: list[Pattern]
    # {"file": WEIGHTS, "tensors": {key: [offset, length, dtype, shape]}}
    weights: dict = field(default_factory=dict)
    format: str = FORMAT

    def pattern(self, computes: tuple[bool, ...]) -> Pattern | None:
        return next((p for p in self.patterns if tuple(p.computes) == tuple(computes)), None)

    def write(self, folder: str) -> None:
        with open(os.path.join(folder, MANIFEST), "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=1)

    @staticmethod
    def read(folder: str) -> Manifest:
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            raise ExportError(f"{folder} has no {MANIFEST}: not a folder written by export_pab_onnx")
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != FORMAT:
            raise ExportError(f"{path} is not a {FORMAT} manifest")
        data["patterns"] = [Pattern(**p) for p in data["patterns"]]
        return Manifest(**data)
