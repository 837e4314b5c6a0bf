"""Outlining a region into a submodule and back, and specialising gated sites: on a tiny captured graph,
which nodes move, which vanish, and the numbers."""

import torch
from torch import fx, nn

from dittofx.rewriter.capture import capture
from dittofx.rewriter.outline import OutlineError, exclusive_cone, inline, outline
from dittofx.rewriter.specialize import cache_layout, site_outputs, specialize

aten = torch.ops.aten


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.a(x).relu() + self.b(x).sigmoid()


class Gate(nn.Module):
    def forward(self, x):
        return None


class Site(nn.Module):
    def __init__(self, child):
        super().__init__()
        self.child = child

    def forward(self, gate, *inputs):
        return self.child(*inputs)


def linears(gm):
    return [n for n in gm.graph.nodes if n.target is aten.linear.default]


def gated():
    """TwoBranches with each branch outlined into a site that reads a gate's value first."""
    model = TwoBranches().eval()
    x = torch.randn(3, 6)
    gm = capture(model, (x,)).graph_module
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    gm.add_submodule("gate", Gate())
    with gm.graph.inserting_after(ph):
        gate = gm.graph.call_module("gate", (ph,))
    sites = {}
    for i, activation in enumerate((aten.relu.default, aten.sigmoid.default)):
        act = next(n for n in gm.graph.nodes if n.target is activation)
        region = exclusive_cone([act], None) & {act, act.args[0]}  # the branch's linear and activation
        call, _ = outline(gm, region, f"sites.{i}", Site, extra_args=(gate,))
        sites[i] = call
    gm.recompile()
    return model, x, gm, gate, sites


def test_outline_moves_the_region_into_a_submodule_sharing_parameters():
    model, x, gm, _, sites = gated()
    assert not linears(gm)  # both linears moved out of the parent
    assert ({n.target for n in gm.graph.nodes if n.op == "call_module"} - {"_guards_fn"}
            == {"gate", "sites.0", "sites.1"})
    child = gm.get_submodule("sites.0").child
    assert len(linears(child)) == 1 and any(n.target is aten.relu.default for n in child.graph.nodes)
    assert {n.target for n in child.graph.nodes if n.op == "get_attr"} and \
        not any(n.op == "placeholder" and "weight" in n.name for n in child.graph.nodes)  # parameters read, not passed
    torch.testing.assert_close(gm(x), model(x))


def test_inline_puts_the_region_back():
    model, x, gm, gate, sites = gated()
    call = sites[0]
    child = gm.get_submodule("sites.0").child
    with gm.graph.inserting_before(call):
        outs = inline(gm.graph, child, tuple(call.args[1:]))
    for user in list(call.users):
        user.replace_all_uses_with(outs[user.args[1]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(call)
    gm.recompile()
    assert len(linears(gm)) == 1
    torch.testing.assert_close(gm(x), model(x))


def test_a_region_that_reads_its_own_output_cannot_be_outlined():
    model = TwoBranches().eval()
    gm = capture(model, (torch.randn(3, 6),)).graph_module
    relu = next(n for n in gm.graph.nodes if n.target is aten.relu.default)
    add = next(n for n in gm.graph.nodes if n.target is aten.add.Tensor)
    try:
        outline(gm, {relu}, "bad", Site, extra_args=(add,))  # the call would read the add its output feeds
    except OutlineError as e:
        assert "own outputs" in str(e)
    else:
        raise AssertionError("outlined a region that reads its own output")


def test_specialize_inlines_computing_sites_and_drops_the_others():
    model, x, gm, gate, sites = gated()
    body = lambda site: gm.get_submodule(site.target).child  # noqa: E731
    n_out = site_outputs(sites, body)
    assert n_out == {0: 1, 1: 1}
    ins, outs = cache_layout(n_out, (True, False))
    assert (ins, outs) == ([(1, 0)], [(0, 0)])

    prog = specialize(gm, gate, sites, (True, False), body)
    called = {n.target for n in prog.graph.nodes if n.op == "call_module"}
    assert not called & {"gate", "sites.0", "sites.1"}  # the gate and the sites are gone
    assert len(linears(prog)) == 1  # site 0 inlined, site 1 absent
    placeholders = [n.name for n in prog.graph.nodes if n.op == "placeholder"]
    assert placeholders[-1] == "cache_1_0"
    kept = model.b(x).sigmoid()  # what site 1 returned on an earlier call
    out, fresh = prog(x, kept)
    torch.testing.assert_close(out, model(x))
    torch.testing.assert_close(fresh, model.a(x).relu())

    nothing = specialize(gm, gate, sites, (False, False), body)
    assert not linears(nothing)
    (out,) = nothing(x, model.a(x).relu(), kept)
    torch.testing.assert_close(out, model(x))


def test_specialize_folds_batch_multiples_batch_major():
    model, x, gm, gate, sites = gated()
    body = lambda site: gm.get_submodule(site.target).child  # noqa: E731
    prog = specialize(gm, gate, sites, (True, False), body, fold={(0, 0): (6,), (1, 0): (6,)}, batch_input=0)
    out, fresh = prog(x, model.b(x).sigmoid().reshape(3, 1, 6))
    assert fresh.shape == (3, 1, 6)  # (B, multiple, *dims): one dynamic batch dim everywhere
    torch.testing.assert_close(out, model(x))
    assert isinstance(prog, fx.GraphModule)
