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
import math
import os
from dataclasses import dataclass, field

import numpy as np

from dittofx.errors import ExportError, first_line

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
        """The manifest of `folder`, checked against the files there: a folder that is not a whole
        export (no or a garbled manifest, a file missing or cut short) is one ExportError line."""
        path = os.path.join(folder, MANIFEST)
        if not os.path.isdir(folder):
            raise ExportError(f"{folder} is not a folder: give the folder export_pab_onnx wrote")
        if not os.path.isfile(path):
            raise ExportError(f"{folder} has no {MANIFEST}: not a folder written by export_pab_onnx")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise ExportError(f"{folder}: {MANIFEST} cannot be read ({first_line(e)}): the export is damaged, "
                              f"export it again") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ExportError(f"{path} is not a {FORMAT} manifest")
        try:
            data["patterns"] = [Pattern(**p) for p in data["patterns"]]
            manifest = Manifest(**data)
            manifest._check(folder)
        except ExportError:
            raise
        except (TypeError, KeyError, ValueError, AttributeError, IndexError) as e:
            raise ExportError(f"{folder}: {MANIFEST} is damaged ({type(e).__name__}: {first_line(e)}): export it "
                              f"again") from None
        return manifest

    def _check(self, folder: str) -> None:
        """Every file the manifest names is there, the weights file as long as its table says."""
        if not self.patterns:
            raise ExportError(f"{folder}: {MANIFEST} lists no pattern file: export it again")
        if any(len(p.computes) != len(self.sites) for p in self.patterns) or \
                self.timestep_input not in self.inputs or self.batch_input not in (None, *self.inputs):
            raise ExportError(f"{folder}: {MANIFEST} is inconsistent (patterns, sites and inputs disagree): "
                              f"export it again")
        missing = [p.file for p in self.patterns if not os.path.isfile(os.path.join(folder, p.file))]
        if self.weights:
            weights = os.path.join(folder, self.weights["file"])
            if not os.path.isfile(weights):
                missing.append(self.weights["file"])
            else:
                for key, (offset, length, dtype, shape) in self.weights["tensors"].items():
                    if int(offset) < 0 or int(length) != math.prod(shape) * np.dtype(dtype).itemsize:
                        raise ExportError(f"{folder}: {MANIFEST} is damaged (weight {key}: {length} bytes do not "
                                          f"hold {dtype} {shape}): export it again")
                need = max((int(offset) + int(length) for offset, length, *_ in self.weights["tensors"].values()),
                           default=0)
                size = os.path.getsize(weights)
                if size < need:
                    raise ExportError(f"{folder}: {self.weights['file']} is cut short ({size} of {need} bytes): "
                                      f"export it again")
        if missing:
            raise ExportError(f"{folder} is missing {', '.join(missing)} (listed in its {MANIFEST}): export it again")
