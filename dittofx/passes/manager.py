"""The pipeline: capture -> analysis -> [prologue] -> the user's passes, each checked after it runs.

    gm, report = PassManager(parse_passes(["rlt", "tome:r=8"])).run(model, capture)

What it guarantees, in order:

1. Ordering, before anything runs (`check_order`): each pass is given once and only with passes it
   composes with (`composes_with`), or one PassSpecError line names them and the fix; the passes run
   as given, except where their declared constraints (`runs_before`, `runs_last`, passes/base.py) put
   one elsewhere: then the report's notes say in which order they ran.
2. The prologue: `CanonicalizeAttention` runs first whenever any pass is given (unless given), so
   every pass sees one form of attention.
3. For each pass: a model with no attention, or one whose every block the pass's `check()` refuses,
   is the user's input: one UnsupportedModelError line with the first refusal.
4. After each pass that changed the graph: lint, dead-code removal, recompile, and a fresh run of the
   metadata (fake tensors) over the example. A failure there (or a raw exception from the pass) is
   the pass's bug, not the user's: InternalError naming the pass. Then the analysis runs again for
   the next pass, and the report takes the pass's notes. An analysis that fails on a graph is one
   UnsupportedModelError line naming the model.
5. A pass that changed nothing (tome:r=0, rlt:tau=-1) is said, not passed over: the report's
   `unchanged` line (with the pass's own notes as the reason) and, for a pass the user gave
   (spec.given), a warning on the library's log, which the CLI shows as `dittofx: warning: ...`.

After the pipeline, `optimize()` checks the result at the passes' exact setting (passes/exact.py).
"""

from __future__ import annotations

from dittofx import runtime
from dittofx._log import log
from dittofx.errors import DittoError, PassSpecError, UnsupportedModelError, first_line, internal_error
from dittofx.passes.base import Pass, PassContext
from dittofx.passes.sdpa import CanonicalizeAttention
from dittofx.passes.spec import REGISTRY, given, pass_class
from dittofx.report import BlockReport, Report, unchanged_line
from dittofx.rewriter.analysis import Analysis, analyze, module_path
from dittofx.rewriter.capture import Capture
from dittofx.rewriter.edit import refresh_meta, remove_dead

PROLOGUE: tuple[type[Pass], ...] = (CanonicalizeAttention,)


def check_order(passes: list[Pass]) -> list[Pass]:
    """The order the passes run in: as given, except where a pass's declared constraints (`runs_before`,
    `runs_last`, passes/base.py) put it elsewhere (["pab", "sp"] runs as sp, pab: PAB wraps what sp
    inserts; the report says so). A pass given twice, or with one it does not compose with, is one
    PassSpecError line."""
    names = [p.name for p in passes]
    for i, name in enumerate(names):
        if name in names[:i]:
            specs = [p.spec() for p in passes if p.name == name]
            raise PassSpecError(f"pass {name} is given twice ({' and '.join(specs)}): give each pass once, with all "
                                f"its options in one spec")
    for p in passes:
        others = [n for n in names if n != p.name and p.composes_with is not None and n not in p.composes_with]
        if others:
            raise PassSpecError(f"{p.name} cannot be given with {', '.join(others)} (tested with: "
                                f"{', '.join(p.composes_with) or 'no other pass'}): drop {' and '.join(others)}")
    last = [p.name for p in passes if p.runs_last]
    if len(last) > 1:
        raise PassSpecError(f"{' and '.join(last)} must each run last: give only one of them")
    left, ordered = list(passes), []
    while left:  # the first pass given that nothing left must precede, runs_last ones only at the end
        ready = [p for p in left if not any(p.name in q.runs_before for q in left if q is not p)]
        if not ready:
            raise PassSpecError(f"passes {', '.join(p.name for p in left)} each must come before another of them: "
                                f"their declared orders (runs_before) cannot all hold")
        p = next((p for p in ready if not p.runs_last or len(left) == 1), ready[0])
        ordered.append(p)
        left.remove(p)
    return ordered


def reorder_note(given: list[Pass], ordered: list[Pass]) -> str | None:
    """What the report says when the passes run in another order than given."""
    if [p.name for p in given] == [p.name for p in ordered]:
        return None
    return (f"passes run as {', '.join(p.name for p in ordered)} (given as {', '.join(p.name for p in given)}): "
            f"each pass's declared order (runs_before, runs_last) puts them so")


class PassManager:
    def __init__(self, passes: list[Pass]):
        ordered = check_order(passes)
        self.note = reorder_note(passes, ordered)
        prologue = [cls() for cls in PROLOGUE if passes and not any(isinstance(p, cls) for p in passes)]
        self.passes = prologue + ordered

    def run(self, model, cap: Capture):
        """Run the pipeline over the captured graph; returns (graph module, report)."""
        gm = cap.graph_module
        analysis = _analyze(model, cap)
        report = describe(model, cap, analysis)
        if self.note:
            report.notes.append(self.note)
        for i, p in enumerate(self.passes):
            self._applies(p, model, analysis)
            try:
                result = p.run(PassContext(gm, cap, analysis, model, later=list(self.passes[i + 1:])))
            except DittoError:
                raise
            except Exception as e:
                raise internal_error(f"pass {p.spec()!r} failed on {type(model).__name__}", e) from e
            if result.changed:
                self._after(p, gm, cap)
                analysis = _analyze(model, cap)
                report = describe(model, cap, analysis, report)
            for block, notes in result.block_notes.items():
                try:
                    report.block(block).actions.extend(notes)
                except KeyError:
                    report.notes.extend(f"{block}: {n}" for n in notes)
            report.notes.extend(result.notes)
            report.stats.update(result.stats)
            if p.listed and not result.changed:
                report.unchanged[p.spec()] = list(result.notes)
                if given(p):  # not the exactness check's own runs (tome:r=0 for tome:r=8)
                    log.warning("%s", unchanged_line(p.spec(), result.notes))
            if p.listed:
                report.passes.append(p.spec())
        return gm, report

    @staticmethod
    def _applies(p: Pass, model, analysis: Analysis) -> None:
        if not p.needs_attention:
            return
        what = type(model).__name__
        if not analysis.sites:
            raise UnsupportedModelError(
                f"{what} has no attention for pass {p.name!r} to rewrite: dittofx looks for "
                f"scaled_dot_product_attention or softmax(Q @ K^T) @ V in the captured graph")
        reasons = {b.name: p.check(analysis, b) for b in analysis.blocks}
        if not p.may_apply_nowhere and all(reasons.values()):
            block, reason = next(iter(reasons.items()))
            raise UnsupportedModelError(f"{type(p).__name__} applies to no block of {what}: {block}: {reason}")

    @staticmethod
    def _after(p: Pass, gm, cap: Capture) -> None:
        """The checks after a pass that changed the graph; a failure is dittofx's bug."""
        try:
            gm.graph.lint()
            remove_dead(gm)
            gm.recompile()
            refresh_meta(gm, cap.flat_inputs())
            runtime.reset(gm)  # a refresh may have run the graph once
        except Exception as e:
            raise internal_error(f"pass {p.spec()!r} produced a graph that does not run on the example inputs", e) \
                from e


def _analyze(model, cap: Capture) -> Analysis:
    """The analysis of the captured graph; where it fails on a graph it does not understand, one
    UnsupportedModelError line naming the model and the cause (never a raw torch exception)."""
    try:
        return analyze(cap.graph_module, cap.batched_inputs)
    except DittoError:
        raise
    except Exception as e:
        raise UnsupportedModelError(
            f"dittofx could not analyse the captured graph of {type(model).__name__}: {first_line(e)}. Please "
            f"report this model to the dittofx developers") from e


def describe(model, cap: Capture, analysis: Analysis, previous: Report | None = None) -> Report:
    """Describe every block; `previous` carries over the actions and notes recorded so far."""
    candidates = [(name, pass_class(name)()) for name in REGISTRY]
    blocks = []
    for block in analysis.blocks:
        applicable = [name for name, p in candidates if p.listed and p.check(analysis, block) is None]
        blocks.append(BlockReport(block.name, block.kinds, block.tokens, block.prefix, applicable))
    report = Report(type(model).__name__, blocks, notes=list(cap.notes), dynamic_batch=cap.dynamic_batch,
                    capture_seconds=cap.seconds,
                    timestep_input=analysis.timestep_input.name if analysis.timestep_input is not None else None,
                    patch_embedding=_patch_name(analysis))
    if previous is not None:
        report.notes, report.passes, report.stats = previous.notes, previous.passes, previous.stats
        report.unchanged = previous.unchanged
        for b in report.blocks:
            try:
                b.actions = previous.block(b.name).actions
            except KeyError:
                pass
        # a block whose attention a pass moved into a submodule (PAB) keeps its description
        found = {b.name: b for b in report.blocks}
        if any(b.name not in found for b in previous.blocks):
            report.blocks = [found.pop(b.name, b) for b in previous.blocks] + list(found.values())
    return report


def _patch_name(analysis: Analysis) -> str | None:
    """The patch embedding: a convolution, or a Linear over patches cut by reshapes or unfolds."""
    linears = [n for n, how in analysis.axes.token_embeddings.items() if how == "patches"]
    node = next(iter(analysis.patch_embeddings or linears), None)
    if node is None:
        return None
    paths = module_path(node)
    kind = node.target.__name__.split(".")[0] if node in analysis.patch_embeddings else "linear over patches"
    return f"{paths[-1] if paths else node.name} ({kind})"
