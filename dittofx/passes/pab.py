"""Pyramid Attention Broadcast (Zhao et al., 2024): reuse attention outputs across diffusion steps.

In the middle of the denoising schedule, attention outputs change little from one step to the next,
and cross attention changes least, then temporal, then spatial attention. So, inside a timestep
window, each attention module computes only once every `range` calls and broadcasts (reuses) its
cached output in between, with ranges forming a pyramid: spatial 2, temporal 4, cross 6.

The decision rule (as diffusers' `apply_pyramid_attention_broadcast`): an attention module computes
when this is its first call, or the timestep is outside the open window (lo < t < hi), or its call
index % range == 0. What is cached is the attention module's output, after the output projection.

The kind of each attention comes from the graph (`rewriter.analysis`: what the sequence axis is made
of, where keys and values come from), not from module names: joint text-video attention (CogVideoX)
uses the spatial range and window, as VideoSys does; so does attention over tokens the graph cannot
split into frames and rows (a Linear over packed latents: Flux, LTX-Video), as diffusers does, with
the reason in the report. Each attention module is one site with one cache, as in diffusers' hook
(Mochi runs one SDPA per sample inside one module). With `mlp=range`, the feed-forward output of
each block is broadcast too, with the same rule over `timestep_window`. A range of None leaves that
kind untouched; a range of 1 wraps it but always computes (the no-op switch).

The timestep is the model's own timestep input, read at run time, so that
`pipe.transformer = dittofx.optimize(pipe.transformer, ["pab"], ...)` works in any diffusers
pipeline loop. Windows are in the units of the model's time embedding: the timestep input times the
factor the model applies before its sinusoidal embedding (`Analysis.timestep_scale`: Flux is fed
t / 1000 and multiplies by 1000, so (100, 800) means what it means for the pipeline). A pipeline
that feeds reversed timesteps (Mochi's: its `current_timestep` is 1000 - t) needs the mirrored
window: (200, 900) for diffusers' (100, 800). Generations, guidance branches and caches are handled in
`dittofx.runtime.pab` (a `StatefulModule`), which also runs the result compiled
(`optimize(..., compile=True)`) and exported (`dittofx.exporters.onnx_pab`): on a broadcast step
the attention is not computed in any of them. PAB runs last (the pass manager checks it): it moves
each attention into a submodule, out of sight of later passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dittofx.errors import PassSpecError, UnsupportedModelError
from dittofx.passes.base import Pass, PassContext, PassResult, shown
from dittofx.rewriter.analysis import Analysis, Block, feed_forward, module_path
from dittofx.rewriter.outline import OutlineError, exclusive_cone, outline
from dittofx.runtime.pab import BroadcastSite, PyramidBroadcast, Rule

RANGE_OF_KIND = {"spatial": "spatial", "joint": "spatial", "temporal": "temporal", "cross": "cross"}


def _check_range(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PassSpecError(f"pab: {name} must be an integer >= 1 (broadcast range) or None, got {value!r}")


def _check_window(name: str, value) -> tuple[float, float] | None:
    if value is None:
        return None
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not 0 <= value[0] < value[1] <= 1000:
        raise PassSpecError(f"pab: {name} must be a timestep window (lo, hi) with 0 <= lo < hi <= 1000, got {value!r}")
    return tuple(value)


@dataclass(repr=False)
class PAB(Pass):
    """Pyramid Attention Broadcast: spatial/temporal/cross ranges inside a timestep window.

    spatial, temporal, cross: broadcast ranges (joint attention uses `spatial`); None leaves a kind as is.
    timestep_window: the open window (lo, hi) of timesteps where outputs are reused.
    spatial_window, temporal_window, cross_window: per-kind windows (default: timestep_window).
    mlp: broadcast range of each block's feed-forward output (None: not broadcast).
    """

    name: ClassVar[str] = "pab"
    runs_last: ClassVar[bool] = True
    may_apply_nowhere: ClassVar[bool] = True  # ranges for kinds the model lacks leave it as is, noted
    exact_setting: ClassVar[str] = "its first call, which computes every attention"

    spatial: int | None = shown(2)
    temporal: int | None = shown(4)
    cross: int | None = shown(6)
    timestep_window: tuple = shown((100, 800))
    spatial_window: tuple | None = None
    temporal_window: tuple | None = None
    cross_window: tuple | None = None
    mlp: int | None = None

    def __post_init__(self):
        for k in ("spatial", "temporal", "cross", "mlp"):
            _check_range(k, getattr(self, k))
        self.timestep_window = _check_window("timestep_window", self.timestep_window)
        if self.timestep_window is None:
            raise PassSpecError("pab: timestep_window must be a window (lo, hi) with 0 <= lo < hi <= 1000, got None")
        for k in ("spatial_window", "temporal_window", "cross_window"):
            setattr(self, k, _check_window(k, getattr(self, k)))

    @property
    def ranges(self) -> dict:
        return {"spatial": self.spatial, "temporal": self.temporal, "cross": self.cross, "mlp": self.mlp}

    @property
    def own_windows(self) -> dict:
        return {"spatial": self.spatial_window, "temporal": self.temporal_window, "cross": self.cross_window,
                "mlp": None}

    def rule(self, kind: str) -> Rule | None:
        """The broadcast rule of an attention kind (or "mlp"), None where it is left untouched."""
        group = RANGE_OF_KIND.get(kind, kind)
        if group not in self.ranges or self.ranges[group] is None:
            return None
        return Rule(self.ranges[group], tuple(float(w) for w in self.own_windows.get(group) or self.timestep_window))

    def check(self, analysis: Analysis, block: Block) -> str | None:
        if analysis.timestep_input is None:
            return "no timestep input (PAB needs a diffusion model's timestep)"
        if any(self.rule(s.kind) is not None for s in block.sites):
            return None
        if self.ranges["mlp"] is not None and block.mlp_residual is not None:
            return None
        kinds = "+".join(block.kinds) or "none"
        return f"no attention of a kind with a broadcast range here ({kinds})"

    def run(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        analysis, gm = ctx.analysis, ctx.gm
        if analysis.timestep_input is None:
            raise UnsupportedModelError(
                f"{type(ctx.model).__name__} has no timestep input: PAB reuses attention across diffusion steps "
                f"and needs a model whose forward takes the timestep (a tensor feeding a sinusoidal embedding)")
        if isinstance(getattr(gm, "pab", None), PyramidBroadcast):
            raise PassSpecError("pab: the graph already has PAB applied; give the pass once")
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        t_index = placeholders.index(analysis.timestep_input)
        # the input being denoised (its batch is the branch's batch), else the first batched input
        batched_inputs = ctx.capture.batched_inputs
        latent = placeholders.index(analysis.latent_input) if analysis.latent_input in placeholders else None
        if latent not in batched_inputs:
            batched = sorted(i for i in batched_inputs if i != t_index) or sorted(batched_inputs)
            latent = batched[0] if batched else None
        schedule = PyramidBroadcast.of_inputs(placeholders, t_index, latent, analysis.timestep_scale)
        gm.add_submodule("pab", schedule)
        with gm.graph.inserting_after(placeholders[-1]):  # step = pab(t, x, *conditioning): decides every site
            step = gm.graph.call_module("pab", schedule.gate_inputs(placeholders))

        wrapped = 0
        for block in analysis.blocks:
            for module, sites in _by_module(block.sites).items():
                kind = sites[0].kind
                rule = self.rule(kind)
                for site in sites:
                    if site.kind_note:
                        result.note(block.name, f"pab: {module}: {site.kind_note}")
                if rule is None or any(self.rule(s.kind) != rule for s in sites):
                    kinds = "+".join(sorted({s.kind for s in sites}))
                    result.note(block.name, f"pab: {module} ({kinds}) left as is")
                    continue
                nodes = [s.node for s in sites]  # one module, one cache: as diffusers' hook, per module
                region = exclusive_cone(nodes, module, descendants_of=nodes)
                if self._wrap(gm, schedule, step, region, module, kind, rule, result, block.name):
                    wrapped += 1
            mlp = self.rule("mlp")
            if mlp is not None and block.mlp_residual is not None:
                ff = feed_forward(block)
                if ff is None or ff.module is None:
                    result.note(block.name, "pab: feed-forward module not found, MLP not broadcast")
                else:
                    region = {n for n in gm.graph.nodes if n.op == "call_function" and ff.module in module_path(n)}
                    if self._wrap(gm, schedule, step, region, ff.module, "mlp", mlp, result, block.name):
                        wrapped += 1
        if not wrapped:
            gm.graph.erase_node(step)
            delattr(gm, "pab")
            result.note(None, "pab: no attention with a broadcast range; nothing wrapped")
            return result
        schedule.reset()
        result.stats["pab"] = schedule.live  # "6 sites: 132 of 360 attention calls broadcast (37%), ..."
        result.changed = True
        return result

    def _wrap(self, gm, schedule, step, region, module: str, kind: str, rule: Rule, result: PassResult,
              block: str) -> bool:
        index = len(schedule.sites)
        try:
            outline(gm, region, f"pab.sites.{index}",
                    lambda child: BroadcastSite(child, index, module, kind, rule),
                    extra_args=(step,))
        except OutlineError as e:
            result.note(block, f"pab: {module} not wrapped ({e})")
            return False
        lo, hi = rule.window
        result.note(block, f"pab: {module} {kind} range {rule.range} in ({lo:g}, {hi:g})")
        return True


def _by_module(sites: list) -> dict[str, list]:
    """Sites grouped by attention module (Mochi runs one SDPA per sample inside one module)."""
    groups: dict[str, list] = {}
    for site in sites:
        groups.setdefault(site.module, []).append(site)
    return groups
