"""What a pass is: a small dataclass over a captured GraphModule that says where it applies and
returns what it changed.

    @dataclass(repr=False)
    class MyPass(Pass):
        name: ClassVar[str] = "mine"            # the spec name: "mine:strength=2"
        strength: int = 1                       # options are the dataclass fields

        def __post_init__(self): ...            # check the options: PassSpecError, one line
        def check(self, analysis, block): ...   # why the pass does not apply to a block, or None
        def run(self, ctx): ...                 # edit ctx.gm, return PassResult

The fields are the pass's options: the spec parser, `spec()`, `bench --sweep` and `tune` all read
them (`dataclasses.fields`, `dataclasses.replace`). Ordering constraints are class attributes that
the pass manager checks before anything runs (passes/manager.py).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import fx

from dittofx.rewriter.analysis import Analysis, Block
from dittofx.rewriter.capture import Capture


@dataclass
class PassContext:
    gm: fx.GraphModule
    capture: Capture
    analysis: Analysis
    model: torch.nn.Module  # the user's model, for what the graph does not say (configs)
    later: list = field(default_factory=list)  # the passes that run after this one (RLT picks its layout by them)


@dataclass
class PassResult:
    changed: bool = False
    block_notes: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    notes: list[str] = field(default_factory=list)  # model-level notes (clamps, skipped blocks, ...)
    stats: dict = field(default_factory=dict)  # name -> object that describes itself (str), e.g. live counts

    def note(self, block: str | None, text: str) -> None:
        (self.block_notes[block] if block else self.notes).append(text)


def shown(default):
    """An option that `spec()` writes even at its default (the figures a reader wants to see)."""
    return field(default=default, metadata={"shown": True})


@dataclass(repr=False)
class Pass:
    name: ClassVar[str] = "pass"
    changes_tokens: ClassVar[bool] = False  # does it change the token count of the residual stream?
    # ordering, checked by the pass manager before anything runs:
    runs_before: ClassVar[tuple[str, ...]] = ()  # passes that, when given too, must come after this one
    runs_last: ClassVar[bool] = False  # nothing may follow it (it hides the graph from later passes)
    composes_with: ClassVar[tuple[str, ...] | None] = None  # the only passes it may be given with (None: any)
    # applicability, as the pass manager applies it:
    needs_attention: ClassVar[bool] = True  # refuse a model with no attention before running
    may_apply_nowhere: ClassVar[bool] = False  # runs (and notes it) even when check() refuses every block
    listed: ClassVar[bool] = True  # named in reports ("passes:", the passes that would apply per block)
    exact_setting: ClassVar[str] = ""  # what `exact()` means, for messages (default: its spec)

    def check(self, analysis: Analysis, block: Block) -> str | None:
        """None if the pass would rewrite `block`, else one line saying why not."""
        return None

    def run(self, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def exact(self) -> Pass:
        """This pass at the setting where the rewritten model must compute exactly what the original does
        (passes/exact.py checks it): `self` when its rewrite is exact as given (on its first call)."""
        return self

    @classmethod
    def option_names(cls) -> list[str]:
        """The options a spec may set: the dataclass fields the constructor takes."""
        return [f.name for f in dataclasses.fields(cls) if f.init]

    def options(self) -> dict:
        """The options that differ from their defaults, plus those always shown."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("shown") or value != f.default:
                out[f.name] = value
        return out

    def spec(self) -> str:
        """The string form, e.g. "tome:r=16", that `parse_pass` turns back into this pass."""
        options = ",".join(f"{k}={v!r}".replace(" ", "") for k, v in self.options().items())
        return f"{self.name}:{options}" if options else self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"
