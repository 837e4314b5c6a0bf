"""The safety net of optimize(): at the passes' exact setting the rewritten module must compute what the
model does, or optimize() refuses in one line naming the pass and the first block that differs."""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import dittofx
from dittofx.errors import InexactRewriteError
from dittofx.models import zoo
from dittofx.passes import PAB, Pass, ToMe
from dittofx.passes.base import PassResult
from dittofx.passes.exact import difference


@pytest.fixture(scope="module")
def dit():
    return zoo.build("dit")


@dataclass(repr=False)
class ScalesOneAttention(Pass):
    """A pass with a silent bug: the graph still runs, but one block's attention output is scaled.
    `factor=1.0` is its exact setting (and then it changes nothing)."""

    name: ClassVar[str] = "scales"
    factor: float = 1.5
    block: int = 1

    def exact(self):
        return dataclasses.replace(self, factor=1.0)

    def run(self, ctx):
        site = ctx.analysis.blocks[self.block].sites[0]
        out = site.output
        with ctx.gm.graph.inserting_after(out):
            scaled = ctx.gm.graph.call_function(torch.ops.aten.mul.Tensor, (out, self.factor))
        out.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
        return PassResult(changed=True)


@dataclass(repr=False)
class AlwaysScales(ScalesOneAttention):
    """The same bug at its exact setting too (its exact setting is itself)."""

    name: ClassVar[str] = "always_scales"

    def exact(self):
        return self


def test_a_silently_wrong_pass_is_refused_naming_the_pass_and_the_block(dit):
    with pytest.raises(InexactRewriteError) as e:
        dittofx.optimize(dit.model, [AlwaysScales(block=1)], dit.example_inputs, dit.example_kwargs)
    text = str(e.value)
    name = dittofx.optimize(dit.model, [], dit.example_inputs, dit.example_kwargs).report.blocks[1].name
    assert "'always_scales" in text and f"block {name}" in text and "\n" not in text
    assert "check=False" in text


def test_the_check_runs_the_exact_setting_not_the_setting_given(dit):
    # factor 1.5 changes the output (that is the pass's approximation); at its exact setting it does not
    opt = dittofx.optimize(dit.model, [ScalesOneAttention(block=0)], dit.example_inputs, dit.example_kwargs)
    with torch.no_grad():
        assert difference(dit.model(*dit.example_inputs, **dit.example_kwargs),
                          opt(*dit.example_inputs, **dit.example_kwargs)) is not None


def test_check_false_skips_it(dit):
    opt = dittofx.optimize(dit.model, [AlwaysScales()], dit.example_inputs, dit.example_kwargs, check=False)
    assert opt.variants[0].gm is not None


def test_the_check_leaves_no_state_behind():
    z = zoo.build("latte")
    opt = dittofx.optimize(z.model, [PAB()], z.example_inputs, z.example_kwargs)
    schedule = opt.graph_module.pab
    assert sum(schedule.state.computed) == 0 and sum(schedule.state.broadcast) == 0


def test_tome_and_pab_exact_settings():
    assert ToMe(r=8).exact().r == 0 and ToMe(ratio=0.5).exact().ratio == 0.0
    pab = PAB()
    assert pab.exact() is pab  # its first call computes every attention


def test_difference_tolerates_rounding_not_errors():
    x = torch.randn(4, 8)
    assert difference((x,), (x + 1e-7,)) is None
    assert difference((x,), (x * 1.01,)) is not None
    assert difference((x,), (x[:2],)) is not None
    assert difference({"a": x}, {"b": x}) is not None
    assert difference((torch.arange(3),), (torch.arange(3) + 1,)) is not None
