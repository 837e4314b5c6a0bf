"""What optimize() found and did, per block: printed by `dittofx inspect`, kept on the optimized module."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BlockReport:
    name: str
    kinds: list[str]  # one per attention site, e.g. ["spatial", "cross"]
    tokens: int | None
    prefix: int
    applicable: list[str] = field(default_factory=list)  # passes that would rewrite this block
    actions: list[str] = field(default_factory=list)  # what the passes did here

    def line(self) -> str:
        kinds = "+".join(self.kinds)
        tokens = "?" if self.tokens is None else str(self.tokens)
        text = f"{self.name:<34} {kinds:<18} tokens={tokens:<6} prefix={self.prefix:<3}"
        text += f" passes={','.join(self.applicable) or '-'}"
        if self.actions:
            text += "  | " + "; ".join(self.actions)
        return text


@dataclass
class Report:
    model: str
    blocks: list[BlockReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dynamic_batch: bool = False
    capture_seconds: float = 0.0
    passes: list[str] = field(default_factory=list)
    timestep_input: str | None = None
    patch_embedding: str | None = None
    # name -> an object a pass keeps up to date at run time (e.g. RLT's tokens kept per clip); str() describes it
    stats: dict = field(default_factory=dict)
    # spec -> its notes, for a pass that changed nothing (its options leave every block as it is): said
    # in a line of its own, or the report reads as if it applied
    unchanged: dict[str, list[str]] = field(default_factory=dict)

    def block(self, name: str) -> BlockReport:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"no block {name!r}; blocks: {', '.join(b.name for b in self.blocks)}")

    def __str__(self) -> str:
        head = [f"{self.model}: {len(self.blocks)} blocks, {sum(len(b.kinds) for b in self.blocks)} attention sites, "
                f"batch {'dynamic' if self.dynamic_batch else 'static'}, captured in {self.capture_seconds:.1f}s"]
        if self.patch_embedding:
            head.append(f"patch embedding: {self.patch_embedding}")
        if self.timestep_input:
            head.append(f"timestep input: {self.timestep_input}")
        if self.passes:
            head.append(f"passes: {' '.join(self.passes)}")
        head += [unchanged_line(spec, notes) for spec, notes in self.unchanged.items()]
        said = {n for notes in self.unchanged.values() for n in notes}
        lines = head + [b.line() for b in self.blocks] + [f"note: {n}" for n in self.notes if n not in said]
        lines += [f"{name}: {value}" for name, value in self.stats.items()]
        return "\n".join(lines)


def unchanged_line(spec: str, notes: list[str]) -> str:
    """The line for a pass that changed nothing, its own notes saying why, e.g. "pass 'tome:r=0' changed
    nothing: r=0, nothing merged"."""
    name = spec.partition(":")[0] + ": "
    why = "; ".join(n[len(name):] if n.startswith(name) else n for n in notes)
    return f"pass {spec!r} changed nothing: {why or 'it found nothing to rewrite with these options'}"
