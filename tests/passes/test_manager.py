"""The pass manager: declared ordering, the prologue, refusals, checks after each pass, and pass
options as dataclasses read by the spec parser, sweeps and tune."""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import dittofx
from dittofx.errors import DittoError, InternalError, PassSpecError, UnsupportedModelError
from dittofx.models import zoo
from dittofx.passes import PAB, RLT, CanonicalizeAttention, Pass, ToMe
from dittofx.passes.base import PassResult
from dittofx.passes.manager import check_order
from dittofx.passes.spec import REGISTRY, parse_pass


@pytest.fixture(scope="module")
def vit():
    return zoo.build("vit")


@dataclass(repr=False)
class BreaksTheGraph(Pass):
    """A pass with a bug: it reroutes the first attention's output to a tensor of another shape."""

    name: ClassVar[str] = "broken"

    def run(self, ctx):
        sdpa = ctx.analysis.sites[0].node
        with ctx.gm.graph.inserting_after(sdpa):
            wrong = ctx.gm.graph.call_function(torch.ops.aten.sum.dim_IntList, (sdpa, [-1]))
        sdpa.replace_all_uses_with(wrong, delete_user_cb=lambda u: u is not wrong)
        return PassResult(changed=True)


def test_a_pass_that_breaks_the_graph_is_an_internal_error_naming_it(vit):
    with pytest.raises(InternalError) as e:
        dittofx.optimize(vit.model, [BreaksTheGraph()], vit.example_inputs)
    text = str(e.value)
    assert "'broken'" in text and "bug in dittofx" in text and "report" in text and "\n" not in text
    assert not isinstance(e.value, DittoError)  # never mistaken for the user's error


def test_the_cli_reports_an_internal_error_with_its_own_exit_code(vit, capsys):
    from dittofx.cli import main

    REGISTRY["broken"] = f"{__name__}:BreaksTheGraph"
    try:
        code = main(["inspect", "zoo:vit", "--pass", "broken", "--quiet"])
    finally:
        del REGISTRY["broken"]
    err = capsys.readouterr().err
    assert code == 3 and "internal error" in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("passes,words", [
    (["pab", "tome:r=2", "sp"], ["sp cannot be given with tome", "drop tome"]),
    (["tome:r=2", "pab", "tome:r=4"], ["pass tome is given twice"]),
    (["rlt", "sp"], ["sp cannot be given with rlt", "tested with: pab, sdpa"]),
])
def test_ordering_constraints_are_one_line_errors_before_any_work(passes, words):
    model = torch.nn.Linear(2, 2)  # never captured: the order is checked first
    with pytest.raises(PassSpecError) as e:
        dittofx.optimize(model, passes, (torch.randn(2, 2),))
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


def test_ordering_is_declared_on_the_passes():
    assert PAB.runs_last and RLT.runs_before == ("tome",)
    rlt, tome, pab = RLT(), ToMe(r=2), PAB()
    assert check_order([rlt, tome, pab]) == [rlt, tome, pab]  # the order the constraints allow, as given
    assert check_order([pab, tome, rlt]) == [rlt, tome, pab]  # moved where the constraints put them
    assert check_order([tome, pab, rlt]) == [rlt, tome, pab]


def test_orders_that_cannot_all_hold_are_one_line():
    @dataclass(repr=False)
    class First(Pass):
        name: ClassVar[str] = "first"
        runs_before: ClassVar[tuple[str, ...]] = ("second",)

    @dataclass(repr=False)
    class Second(Pass):
        name: ClassVar[str] = "second"
        runs_before: ClassVar[tuple[str, ...]] = ("first",)

    msg = _spec_refusal(check_order, [First(), Second()])
    assert "first, second each must come before another of them" in msg


def test_a_reordered_pipeline_says_so_in_the_report():
    zm = zoo.build("videomae")
    opt = dittofx.optimize(zm.model, ["tome:r=2", "rlt"], zm.example_inputs)
    assert [p.split(":")[0] for p in opt.report.passes] == ["rlt", "tome"]
    assert any("passes run as rlt, tome (given as tome, rlt)" in n for n in opt.report.notes)


def test_the_prologue_canonicalises_attention_and_is_not_listed():
    class Handwritten(torch.nn.Module):  # patches, one block of hand-written attention, mean pooling
        def __init__(self):
            super().__init__()
            self.patch = torch.nn.Conv2d(3, 16, 4, stride=4)
            self.qkv, self.proj = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)

        def forward(self, image):
            x = self.patch(image).flatten(2).transpose(1, 2)
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
            attn = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)
            x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, 16))
            return x.mean(1)

    model = Handwritten().eval()
    x = torch.randn(2, 3, 12, 12)
    opt = dittofx.optimize(model, ["tome:r=2"], (x,))
    targets = {n.target for n in opt.graph_module.graph.nodes}
    assert torch.ops.aten.scaled_dot_product_attention.default in targets
    assert torch.ops.aten._softmax.default not in targets and torch.ops.aten.softmax.int not in targets
    assert opt.report.passes == ["tome:r=2"]
    assert any("canonicalised" in n for n in opt.report.notes)
    assert any("merged 2 tokens" in n for n in opt.report.notes)  # of 9 patches, in the root module's block
    assert torch.allclose(dittofx.optimize(model, ["tome:r=0"], (x,))(x), model(x), atol=1e-6)


def test_no_block_accepting_a_pass_is_one_refusal_line(vit):
    with pytest.raises(UnsupportedModelError) as e:
        dittofx.optimize(vit.model, [PAB()], vit.example_inputs)
    assert "no timestep input" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UnsupportedModelError) as e:
        dittofx.optimize(vit.model, [RLT()], vit.example_inputs)
    assert str(e.value).startswith("RLT applies to no block of VisionTransformer: blocks.0: no tubelet embedding")


def test_options_are_dataclass_fields_read_by_the_parser_sweeps_and_tune():
    from dittofx.measure.bench import parse_sweep
    from dittofx.measure.tune import ladder

    for cls in (ToMe, RLT, PAB, CanonicalizeAttention):
        assert cls.option_names() == [f.name for f in dataclasses.fields(cls)]
    assert parse_pass("tome:r=8,trace_source=true") == ToMe(r=8, trace_source=True)
    with pytest.raises(PassSpecError, match="accepted: r, prop_attn, trace_source, unmerge_output, ratio, "
                                            "max_downsample, sx, sy, use_rand, merge_attn, merge_crossattn, merge_mlp, "
                                            "seed, grid"):
        parse_pass("tome:speed=2")
    with pytest.raises(PassSpecError):  # dataclasses.replace runs the same checks
        dataclasses.replace(ToMe(), r=-1)
    key, index, points = parse_sweep("temporal=2:6:2", ["tome:r=1", "pab:cross=8"])
    assert (key, index) == ("temporal", 1)
    assert [specs[1] for _, specs in points] == [f"pab:spatial=2,temporal={t},cross=8,timestep_window=(100,800)"
                                                 for t in (2, 4, 6)]
    report = type("R", (), {"timestep_input": None, "blocks": []})()
    what, rungs = ladder(ToMe(prop_attn=False), report, None)
    assert what == "r" and rungs[3].spec == "tome:r=4,prop_attn=False"


def test_public_names():
    import dittofx.passes as passes

    assert dittofx.ToMe is ToMe is passes.ToMe and dittofx.RLT is RLT and dittofx.PAB is PAB
    assert dittofx.CanonicalizeAttention is CanonicalizeAttention
    assert repr(ToMe(r=16)) == "ToMe(r=16)" and ToMe(r=16).spec() == "tome:r=16"


def test_old_import_paths_work_for_a_release_and_say_where_the_name_went():
    import importlib
    import sys

    for old, new, name in [("dittofx.zoo", "dittofx.models.zoo", "build"),
                           ("dittofx.workload", "dittofx.measure.workload", "Workload"),
                           ("dittofx.workload", "dittofx.measure.inputs", "load_inputs"),
                           ("dittofx.runtime_pab", "dittofx.runtime.onnxruntime", "OnnxPABRunner"),
                           ("dittofx.runtime_pab", "dittofx.runtime.pab", "BroadcastState"),
                           ("dittofx.progress", "dittofx.cli.progress", "set_quiet")]:
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"{old} moved to"):
            module = importlib.import_module(old)
        assert getattr(module, name) is getattr(importlib.import_module(new), name)
    from dittofx.passes.tome import grid_destinations, proportional_bias  # the pass module still has them
    from dittofx.runtime import OnnxRuntimeRunner  # noqa: F401 - the runners' old home
    assert grid_destinations and proportional_bias


# ---------------------------------------------------------------------------------------------
# specs and pass lists the parser refuses, in one line


def _spec_refusal(fn, *args) -> str:
    with pytest.raises(PassSpecError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_an_option_given_twice_is_refused_not_overwritten():
    assert "option 'r' is given twice in 'tome:r=4,r=8'" in _spec_refusal(parse_pass, "tome:r=4,r=8")
    assert "given twice" in _spec_refusal(parse_pass, "pab:spatial=2, spatial=2")


def test_a_pass_given_twice_is_said_as_such(vit):
    msg = _spec_refusal(check_order, [PAB(), PAB()])
    assert msg.startswith("pass pab is given twice") and "give each pass once" in msg
    assert "pass tome is given twice (tome:r=2 and tome:r=4)" in _spec_refusal(check_order, [ToMe(r=2), ToMe(r=4)])
    assert "given twice" in _spec_refusal(dittofx.optimize, vit.model, ["pab", "pab"], vit.example_inputs)


@pytest.mark.parametrize("spec", ["rlt:tau=inf", "rlt:tau=1e309", "rlt:tau=-Infinity", "rlt:tau=nan",
                                  "pab:timestep_window=(0,1e309)", "tome:r=(8,1e999)"])
def test_numbers_that_are_not_finite_are_refused_alike(spec):
    key = spec.split(":")[1].split("=")[0]
    msg = _spec_refusal(parse_pass, spec)
    assert f"{key}=" in msg and "is not a finite number" in msg


def test_a_pass_object_holding_a_non_finite_option_is_refused():
    assert "not a finite number" in _spec_refusal(dittofx.optimize, torch.nn.Linear(2, 2), [RLT(tau=float("inf"))],
                                                   (torch.randn(2, 2),))


@pytest.mark.parametrize("passes, got", [({"tome:r=2": 1}, "dict"), ({"tome:r=2"}, "set"), (3, "int"),
                                         (b"tome", "bytes")])
def test_passes_must_be_a_list_of_specs_or_passes(passes, got):
    msg = _spec_refusal(dittofx.optimize, torch.nn.Linear(2, 2), passes, (torch.randn(2, 2),))
    assert "a list of pass specs" in msg and f"got a {got}" in msg


@dataclass(repr=False)
class Fussy(Pass):
    """A pass with an internal field and a constructor that fails in a way it did not plan for."""

    name: ClassVar[str] = "fussy"
    level: int = 1
    cache: dict = dataclasses.field(default_factory=dict, init=False)

    def __post_init__(self):
        self.doubled = self.level * 2 + 1  # TypeError for a text level


def test_the_accepted_options_are_the_constructors_and_its_failures_are_one_line():
    REGISTRY["fussy"] = f"{__name__}:Fussy"
    try:
        assert Fussy.option_names() == ["level"]
        assert "unknown option 'cache' for pass fussy; accepted: level" in _spec_refusal(parse_pass, "fussy:cache=1")
        msg = _spec_refusal(parse_pass, "fussy:level=abc")
        assert msg.startswith("fussy: cannot take level=abc") and "accepted options: level" in msg
    finally:
        del REGISTRY["fussy"]
    assert "unknown option 'args' for pass sdpa; accepted: none" in _spec_refusal(parse_pass, "sdpa:args=1")


# ---------------------------------------------------------------------------------------------
# a pass that changed nothing is said


def test_a_pass_that_changed_nothing_is_said_in_the_report_and_the_log(vit, caplog):
    with caplog.at_level("WARNING", logger="dittofx"):
        opt = dittofx.optimize(vit.model, ["tome:r=0"], vit.example_inputs)
    line = "pass 'tome:r=0' changed nothing: "
    assert list(opt.report.unchanged) == ["tome:r=0"]
    assert sum(ln.startswith(line) for ln in str(opt.report).splitlines()) == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == \
        [ln for ln in str(opt.report).splitlines() if ln.startswith(line)]
    caplog.clear()
    with caplog.at_level("WARNING", logger="dittofx"):  # its exactness check runs tome:r=0: not the user's pass
        opt = dittofx.optimize(vit.model, ["tome:r=2"], vit.example_inputs)
    assert not opt.report.unchanged and "changed nothing" not in str(opt.report)
    assert not [r for r in caplog.records if "changed nothing" in r.getMessage()]
