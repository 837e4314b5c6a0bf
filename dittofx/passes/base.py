"""What a pass is: a small object over a captured GraphModule that returns what it changed.

    class MyPass(Pass):
        name = "mine"
        def check(self, analysis, block): ...   # why the pass does not apply to a block, or None
        def run(self, ctx): ...                  # edit ctx.gm, return PassResult
"""

from __future__ import annotations

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


class Pass:
    name: ClassVar[str] = "pass"
    changes_tokens: ClassVar[bool] = False  # does it change the token count of the residual stream?

    def check(self, analysis: Analysis, block: Block) -> str | None:
        """None if the pass would rewrite `block`, else one line saying why not."""
        return None

    def run(self, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def spec(self) -> str:
        """The string form, e.g. "tome:r=16", that `parse_pass` turns back into this pass."""
        options = ",".join(f"{k}={v!r}".replace(" ", "") for k, v in self.options().items())
        return f"{self.name}:{options}" if options else self.name

    def options(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()!r})"
