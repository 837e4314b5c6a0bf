"""`dittofx.optimize()`: capture, analyse, run the passes, and hand back a drop-in module."""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from itertools import chain

import torch
from torch import fx, nn

from dittofx import _log, runtime, signature
from dittofx.errors import DittoError, PassSpecError
from dittofx.passes.base import Pass
from dittofx.passes.exact import check_exact, rng_state, set_rng_state
from dittofx.passes.manager import PassManager, check_order
from dittofx.passes.spec import parse_passes
from dittofx.report import Report
from dittofx.rewriter.capture import Capture, capture
from dittofx.rewriter.edit import copy_module
from dittofx.rewriter.quiet import EXPORT_LOCK


def optimize(model: nn.Module, passes=(), example_inputs=None, example_kwargs=None, *,
             dynamic_batch: bool = True, compile: bool = False, check: bool = True) -> OptimizedModule:
    """Return `model` rewritten by `passes`, as a drop-in module with a `report`.

    passes: Pass objects (`ToMe(r=16)`, from `dittofx.passes`) or spec strings (`"tome:r=16"`),
        applied in order (passes/manager.py says what runs when and what is checked).
    example_inputs / example_kwargs: what forward() is called with; the batch may be any size (it is
    dynamic in the result). Left out, they are inferred where the model states its input size.
    compile: wrap the rewritten graph in `torch.compile(fullgraph=True)`.
    check: run the rewritten module once at the passes' exact setting next to `model` on the example
        inputs, and refuse (InexactRewriteError) if it computes something else (passes/exact.py); costs
        one forward of each (see the README).
    """
    if not isinstance(model, nn.Module):
        raise DittoError(f"optimize() takes a torch.nn.Module, not {type(model).__name__}")
    pass_list = parse_passes(passes)
    check_order(pass_list)  # before the capture's work (the pass manager runs them in the order it gives)
    if compile and any(p.name == "sp" for p in pass_list):
        raise PassSpecError("sp with compile=True is not supported yet (its collectives run eagerly, between the "
                            "compiled parts they would split): optimize without compile=True")
    if example_inputs is None and not example_kwargs:
        from dittofx.models import example_inputs_for

        inferred = example_inputs_for(model)
        if inferred is None:
            raise DittoError(f"cannot infer the input size of {type(model).__name__}: pass example_inputs=(...), "
                             f"the tensors forward() takes")
        example_inputs, example_kwargs = inferred
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    return OptimizedModule(model, pass_list, tuple(example_inputs or ()), dict(example_kwargs or {}),
                           dynamic_batch=dynamic_batch, compile=compile, check=check)


def compile(fn, **options):
    """`torch.compile(fn, **options)` for a function that calls optimized modules (a training step:
    forward, loss, backward, optimizer), with what their graphs need: RLT's kept-token count is a size
    known only at run time (aten.nonzero), which torch.compile otherwise leaves to eager Python, breaking
    the graph at the tokenizer. (`optimize(..., compile=True)` and `torch.compile(fullgraph=True)` of a
    module need nothing more.)"""
    compiled = torch.compile(fn, **options)
    return functools.wraps(fn)(torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)(compiled))


class _Variant(nn.Module):
    """One captured and rewritten graph, for one call signature and mode (train or eval)."""

    def __init__(self, gm: fx.GraphModule, cap: Capture, report: Report, compiled: bool, original: nn.Module,
                 for_training: bool = False):
        super().__init__()
        self.gm = gm
        self.capture = cap
        self.report = report
        self.for_training = for_training  # captured with the original in train mode
        free = cap.batched_inputs if cap.dynamic_batch else set()
        self.key = signature.call_key(cap.example_inputs, cap.example_kwargs, free)
        self.free_batch = free
        self.compiled = compiled
        self.shared = _shared_tensors(gm, original)
        self.build_runner()

    def build_runner(self) -> None:
        """What a call runs (runtime.make_runner): a stateful graph's own runner, torch.compile, or an
        eager program over the same tensors."""
        self.runner = runtime.make_runner(self.gm, self.compiled)

    def rebind(self, original: nn.Module) -> bool:
        """Point the graph again at the original's tensors where the original replaced them (`.to()`
        on buffers, `load_state_dict(assign=True)`); whether any changed."""
        current = _named_tensors(original)
        changed = False
        for owner, kind, attr, name in self.shared:
            tensor = current.get(name)
            if tensor is not None and getattr(owner, kind).get(attr) is not tensor:
                getattr(owner, kind)[attr] = tensor
                changed = True
        return changed

    def matches(self, args, kwargs, training: bool = False) -> bool:
        return self.for_training == training and signature.call_key(args, kwargs, self.free_batch) == self.key

    def run(self, args, kwargs):
        if isinstance(self.runner, fx.GraphModule) and (torch.compiler.is_exporting() or torch.compiler.is_compiling()):
            return self.gm(*args, **kwargs)  # traced by the caller: the graph itself, its tensors registered
        return self.runner(*args, **kwargs)


def _named_tensors(module: nn.Module) -> dict:
    return dict(chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)))


def _shared_tensors(gm: nn.Module, original: nn.Module) -> list[tuple[nn.Module, str, str, str]]:
    """(module of `gm`, "_parameters" or "_buffers", name there, the original's name) of each tensor of
    `gm` that is one of the original's: the graph computes with the original's weights, not copies."""
    names = {id(t): name for name, t in _named_tensors(original).items()}
    return [(owner, kind, attr, names[id(t)])
            for _, owner in gm.named_modules(remove_duplicate=False)
            for kind in ("_parameters", "_buffers")
            for attr, t in getattr(owner, kind).items() if t is not None and id(t) in names]


class OptimizedModule(nn.Module):
    """A drop-in for the original model: same call signature and outputs, original attributes.

    A call whose structure, constants or non-batch shapes differ from those captured is captured
    and rewritten again (once, then reused), as torch.compile does on a guard failure.

    State between calls (PAB's caches; rules in dittofx/runtime/pab.py) follows generations
    (denoising loops) and guidance branches, per thread:
        opt.new_generation()                  the next call starts a new generation
        with opt.generation(): ...            one generation, its boundaries declared
        with opt.cache_context("uncond", step_index=i): ...   diffusers' pipeline protocol: the
                                              branch by name, step 0 starts a generation
        opt._reset_stateful_cache()           diffusers' end of `pipe(...)`: ends the generation
        opt.reset()                           drops every thread's state
    So `pipe.transformer = optimize(pipe.transformer, ["pab"], ...)` gives one generation per
    `pipe(...)`. A loop of one's own needs none of them while its timesteps are monotonic (a call
    going against the direction starts a generation) and cond/uncond differ in their conditioning
    inputs; call new_generation() where a loop starts that continues the last one's direction.

    Training: `opt.train()` / `opt.eval()` set the original's mode too; a call in train mode runs a graph
    captured with the original in train mode (dropout, stochastic depth, batch-norm statistics; captured
    once, then reused), one in eval mode the inference graph. Gradients reach the original's parameters.
    """

    def __init__(self, model: nn.Module, passes: list[Pass], example_inputs: tuple, example_kwargs: dict, *,
                 dynamic_batch: bool = True, compile: bool = False, check: bool = True):
        super().__init__()
        self.__dict__["_original"] = model  # not a submodule: its parameters are shared, not copied
        self.training = model.training  # the original's mode: which graph a call runs
        if self.training and _untrainable(passes):  # e.g. a diffusers model built in code, given with pab
            _log.log.warning("%s is in train mode, but %s does not train: it is optimized for inference (its "
                             "eval-mode graph; the model itself is left in train mode); call model.eval() before "
                             "optimize() to say so", type(model).__name__, ", ".join(_untrainable(passes)))
            self.training = False
        self.passes = passes
        self.dynamic_batch = dynamic_batch
        self.compiled = compile
        self.check = check
        self.variants = nn.ModuleList()
        self.__dict__["_learned"] = {}  # parameters the passes add, by name: shared by every graph
        self.register_load_state_dict_post_hook(_drop_graph_keys)
        with EXPORT_LOCK:
            self._build(example_inputs, example_kwargs)

    @property
    def original(self) -> nn.Module:
        return self.__dict__["_original"]

    @property
    def report(self) -> Report:
        return self.variants[-1].report

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.variants[-1].gm

    @property
    def comm_stats(self):
        """What the sequence-parallel pass's collectives moved on this rank, per call and in total (a
        `dittofx.runtime.sp.CommStats`, shared by every input form), or None without the sp pass."""
        return next((p.stats for p in self.passes if p.name == "sp"), None)

    @property
    def stateful(self) -> bool:
        """Does the rewritten graph keep state between calls (PAB's caches)? `reset()` drops it."""
        return runtime.is_stateful(self.graph_module)

    def forward(self, *args, **kwargs):
        variant = self._variant(args, kwargs)
        try:
            return variant.run(args, kwargs)
        except Exception:
            # an empty batch has nothing to merge, drop or cache, but rewritten sizes may divide by it
            if signature.batch_of([t for _, t in signature.leaves((args, kwargs))]) == 0:
                return self.original(*args, **kwargs)
            raise

    def graph_for(self, args=None, kwargs=None) -> tuple[fx.GraphModule, tuple, dict]:
        """(rewritten graph, args, kwargs): the graph that serves `self(*args, **kwargs)`, captured now if
        no earlier call had that form; with no arguments, the latest graph and the example it was
        captured with. What exporters export."""
        if args is None and not kwargs:
            variant = self.variants[-1]
            return variant.gm, variant.capture.example_inputs, variant.capture.example_kwargs
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        return self._variant(args, kwargs).gm, args, kwargs

    def train(self, mode: bool = True) -> OptimizedModule:
        """Train or eval mode, here and in the original (as `nn.Module.train` sets it): the next calls
        run the graph captured in that mode. Not passed on to the graphs (a captured graph has one mode)."""
        if not isinstance(mode, bool):
            raise ValueError(f"train() takes a bool, got {mode!r}")
        if mode:
            _check_trainable(self.passes)
        self.training = mode
        self.original.train(mode)
        return self

    def _variant(self, args: tuple, kwargs: dict) -> _Variant:
        training = self.training
        for variant in tuple(self.variants):  # a snapshot: another thread may append meanwhile
            if variant.matches(args, kwargs, training):
                return variant
        return self._new_variant(args, kwargs, training)

    @torch.compiler.disable  # a caller being compiled: built eagerly, a graph break on the first call only
    def _new_variant(self, args: tuple, kwargs: dict, training: bool) -> _Variant:
        # One build at a time in the process: torch.export patches process-wide state, and the check
        # runs the original, whose weights another thread's export swaps for fakes (rewriter/quiet.py).
        with EXPORT_LOCK:
            for variant in tuple(self.variants):  # another thread may have captured this form meanwhile
                if variant.matches(args, kwargs, training):
                    return variant
            return self._build(args, kwargs)

    def _build(self, args: tuple, kwargs: dict) -> _Variant:
        kwargs = dict(sorted(kwargs.items()))
        training = self.training
        with _mode(self.original, training), _untouched(self.original) if training else nullcontext():
            cap = capture(self.original, args, kwargs, dynamic_batch=self.dynamic_batch)
            base = copy_module(cap.graph_module) if self.check else None
            gm, report = PassManager(self.passes).run(self.original, cap)
            self._share_learned(gm)
            variant = _Variant(gm, cap, report, self.compiled, self.original, training)
            if base is not None:
                with _log.stage("checking the rewritten model at its exact setting"), \
                        _replayed(self.original) if training else nullcontext():
                    run = variant.runner if not self.compiled else None  # compiling only to check: too slow
                    check_exact(self.original, self.passes, cap, base, gm, run)
        self.variants.append(variant)
        return variant

    def _share_learned(self, gm: fx.GraphModule) -> None:
        """The parameters a pass added to `gm` (not the original's) are one set for every graph: a graph
        captured later (train mode, another input form) uses those the first one made, and trained."""
        own = {id(p) for p in self.original.parameters()}
        for name, param in list(gm.named_parameters()):
            if id(param) in own:
                continue
            shared = self._learned.setdefault(name, param)
            if shared.shape != param.shape:
                raise PassSpecError(f"{name} of this call's graph has shape {tuple(param.shape)}, the one being "
                                    f"trained {tuple(shared.shape)}: call with inputs of the first call's size")
            owner, attr = gm.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            owner._parameters[attr] = shared

    @property
    def learned(self) -> dict[str, nn.Parameter]:
        """The parameters the passes added, by name (`rlt.length_embedding`): in `parameters()`, and in
        `state_dict()` under `dittofx.<name>`."""
        return dict(self._learned)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """Named as in `state_dict()`: the original's names (the graphs read those tensors), then the
        passes' own under `dittofx.<name>` (what `parameters()` and an optimizer over it see). With
        `remove_duplicate=False`, every path of the module tree, the graphs' included (torch.export
        looks a graph's parameters up by those)."""
        if not remove_duplicate:
            yield from super().named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=False)
            return
        yield from self.original.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)
        for name, param in self._learned.items():
            yield f"{prefix}{LEARNED}{name}", param

    def _apply(self, fn, *args, **kwargs):
        """`.to()`, `.half()`, ...: the original's tensors and the graphs' (the same, shared); buffers
        come back as new tensors, which the graphs are pointed at again, and eager programs, which read
        the tensors directly, are bound again."""
        self.original._apply(fn, *args, **kwargs)
        result = super()._apply(fn, *args, **kwargs)
        self._rebind(always=True)
        return result

    def _rebind(self, always: bool = False) -> None:
        for variant in self.variants:
            if (variant.rebind(self.original) or always) and not variant.compiled:
                variant.build_runner()

    # Checkpoints are the original's: its state_dict loads here, this one loads into it, and loaded
    # weights are what the next call computes with (the graphs share the original's tensors).
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The original's state_dict (the same keys; the graphs' copies of its names are left out), and the
        passes' own parameters under `dittofx.<name>`."""
        out = self.original.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for name, param in self._learned.items():
            out[f"{prefix}{LEARNED}{name}"] = param if keep_vars else param.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load into the original (its keys) and the passes' parameters (`dittofx.<name>`; an original's
        checkpoint, without them, leaves them as they are); the next call computes with the loaded
        weights, none of what stateful passes kept from the old ones (PAB's caches: a new generation)."""
        state_dict = self._load_learned(state_dict, "")
        result = self.original.load_state_dict(state_dict, strict=strict, assign=assign)
        self._loaded()
        return result

    def _load_learned(self, state_dict, prefix: str) -> dict:
        """Copy the passes' parameters out of `state_dict`; the rest, for the original (keys of
        parameters no pass made stay, so that a strict load names them)."""
        rest = {}
        for key, value in state_dict.items():
            name = key[len(prefix) + len(LEARNED):] if key.startswith(prefix + LEARNED) else None
            if name in self._learned:
                with torch.no_grad():
                    self._learned[name].copy_(value)
            else:
                rest[key] = value
        return rest

    def _loaded(self) -> None:
        self._rebind()
        self.reset()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Inside a parent's load_state_dict: the keys under `prefix` are the original's (see state_dict)."""
        own = {k[len(prefix):]: v for k, v in self._load_learned(state_dict, prefix).items() if k.startswith(prefix)}
        result = self.original.load_state_dict(own, strict=False,
                                               assign=local_metadata.get("assign_to_params_buffers", False))
        missing_keys.extend(prefix + k for k in result.missing_keys)
        unexpected_keys.extend(prefix + k for k in result.unexpected_keys)
        self.__dict__["_loading_prefix"] = prefix

    def reset(self) -> None:
        """Every captured graph as before its first call: PAB's caches dropped, ToMe(use_rand)'s draws
        started again (the same destinations as the first calls, with a seed)."""
        for variant in self.variants:
            runtime.reset(variant.gm)

    def new_generation(self) -> None:
        """The calling thread's next call starts a new generation (PAB: its caches and counters are
        dropped). A no-op without a stateful pass."""
        runtime.stateful.new_generation([v.gm for v in self.variants])

    def generation(self):
        """`with opt.generation(): <one denoising loop>`: a fresh generation on entry, dropped on exit,
        and none inferred from the timesteps inside (for samplers whose timesteps go back up)."""
        return runtime.stateful.generation([v.gm for v in self.variants])

    def cache_context(self, name: str, step_index: int | None = None, **_):
        """diffusers' `ModelMixin.cache_context`, which pipelines wrap each call in: the calls inside are
        guidance branch `name` (each its own counters and caches) at denoising step `step_index` (0
        starts a generation). Other fields (sigma, timestep, ...) are accepted and not needed."""
        return runtime.stateful.call_context(name, step_index)

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """What diffusers pipelines call at the end of every `pipe(...)`: ends the calling thread's generation."""
        self.new_generation()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        try:  # a value that a pass records at run time (e.g. ToMe's `tome_source`): the latest recorded
            return runtime.recorded([v.gm for v in self.variants], name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)

    def extra_repr(self) -> str:
        return f"model={type(self.original).__name__}, passes=[{', '.join(p.spec() for p in self.passes)}]"


LEARNED = "dittofx."  # state_dict prefix of the passes' own parameters


def _untrainable(passes: list[Pass]) -> list[str]:
    """The passes that may not run in a training graph. Those that may: the attention's canonical form,
    ToMe in ViT mode (merging for good, as the paper trains) and RLT (as its paper fine-tunes), whose
    gradients are checked against references. Not PAB (its caches skip the backward of whole steps),
    ToMe(ratio) (diffusion mode) nor sp."""
    return [p.spec() for p in passes if not (p.name in ("sdpa", "rlt") or
                                             (p.name == "tome" and getattr(p, "ratio", None) is None))]


def _check_trainable(passes: list[Pass]) -> None:
    """PassSpecError (one line) unless every pass may run in a training graph (`_untrainable`)."""
    refused = _untrainable(passes)
    if refused:
        raise PassSpecError(f"training with {', '.join(refused)} is not supported (train mode supports no passes, "
                            f"sdpa, rlt, and tome with r, ViT mode); optimize without them to train")


def _buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.clone()) for b in model.buffers()]


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for buffer, value in saved:
            buffer.copy_(value)


@contextmanager
def _mode(model: nn.Module, training: bool):
    """The original in the mode of the graph being captured (this module's: the original's own flags may
    have been set apart, as exporters set them), its own flags back afterwards."""
    if model.training == training:
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def _untouched(model: nn.Module):
    """A training capture and its check leave the original's buffers (batch-norm statistics) and the
    random generators as they were: the first training call draws and updates what the original's would."""
    saved, rng = _buffers(model), rng_state()
    try:
        yield
    finally:
        _restore(saved)
        set_rng_state(rng)


@contextmanager
def _replayed(model: nn.Module):
    """The check runs the original, then the graph, on the example: in train mode the graph must draw the
    same dropout masks from the same generator state and start from the same statistics, so the
    original's run is undone (generators and buffers) once it returned."""
    state = {}

    def before(module, args):
        state["rng"], state["buffers"] = rng_state(), _buffers(module)

    def after(module, args, output):
        _restore(state.pop("buffers"))
        set_rng_state(state.pop("rng"))

    hooks = model.register_forward_pre_hook(before), model.register_forward_hook(after)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _drop_graph_keys(module: OptimizedModule, incompatible) -> None:
    """After a parent's load_state_dict: the graphs' keys are not in the original's checkpoint, and
    not missing (their tensors are the original's, loaded by `_load_from_state_dict`)."""
    graphs = module.__dict__.pop("_loading_prefix", "") + "variants."
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(graphs)]
    module._loaded()


def rewrite(model: nn.Module, passes: list[Pass], args: tuple, kwargs: dict, *, dynamic_batch: bool = True):
    """Capture `model` and run `passes` over the graph (passes/manager.py); (graph module, capture, report)."""
    cap = capture(model, args, kwargs, dynamic_batch=dynamic_batch)
    gm, report = PassManager(passes).run(model, cap)
    return gm, cap, report
