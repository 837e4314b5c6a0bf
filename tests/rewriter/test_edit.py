"""Graph-editing helpers on tiny captured graphs: which nodes appear, which vanish, and the numbers."""

import operator

import torch
from torch import nn
from torch._subclasses.fake_tensor import DynamicOutputShapeException

from dittofx.rewriter.capture import capture
from dittofx.rewriter.edit import (
    Inserter,
    arg,
    refresh_meta,
    remove_dead,
    replace_node,
    reroute,
    set_arg,
    values_at,
)

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).relu().unsqueeze(1).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, mask)


def graph(positional_mask=True):
    x, mask = torch.randn(2, 5, 8), torch.zeros(2, 1, 5, 5)
    cap = capture(Tiny().eval(), (x, mask))
    if not positional_mask:  # as a pass may write it
        sdpa = only(cap.graph_module, SDPA)
        sdpa.args, sdpa.kwargs = sdpa.args[:3], {"attn_mask": sdpa.args[3]}
    return cap.graph_module, cap.flat_inputs()


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def only(gm, target):
    found = [n for n in gm.graph.nodes if n.target is target]
    assert len(found) == 1, (target, targets(gm))
    return found[0]


def test_arguments_by_schema_name_positional_or_keyword():
    for positional in (True, False):
        gm, _ = graph(positional)
        sdpa = only(gm, SDPA)
        mask = arg(sdpa, "attn_mask")
        assert mask is not None and mask.op == "placeholder"
        assert arg(sdpa, "is_causal", False) is False and arg(sdpa, "scale") is None
        set_arg(sdpa, "attn_mask", None)
        assert arg(sdpa, "attn_mask") is None
        assert len(sdpa.args) == (4 if positional else 3)  # positional stays positional


def test_inserter_chain_and_reroute():
    gm, flat = graph()
    relu = only(gm, aten.relu.default)
    before = gm(*flat)
    add = Inserter(relu)
    doubled = add(aten.mul.Tensor, relu, 2.0)
    halved = add(aten.mul.Tensor, doubled, 0.5)
    reroute(relu, halved, skip=add.nodes)
    gm.recompile()
    order = list(gm.graph.nodes)
    assert order.index(relu) < order.index(doubled) < order.index(halved)
    assert all(u in add.nodes for u in relu.users)  # every other reader now reads the chain's end
    assert targets(gm).count(aten.mul.Tensor) == 2
    torch.testing.assert_close(gm(*flat), before)
    assert halved.meta["nn_module_stack"] == relu.meta["nn_module_stack"]  # the scope of `like`


def test_getitems_and_reroute_only_some_users():
    gm, flat = graph()
    chunk = only(gm, aten.split.Tensor) if aten.split.Tensor in targets(gm) else only(gm, aten.chunk.default)
    q = next(u for u in chunk.users if u.target is operator.getitem and u.args[1] == 0)
    add = Inserter(chunk)
    items = add.getitems(chunk, 3)
    assert [i.args[1] for i in items] == [0, 1, 2]
    reroute(q, items[0], skip=add.nodes, only=set())  # `only` empty: nobody moves
    assert all(u not in items for u in q.users)


def test_replace_node_removes_the_old_one():
    x, mask = torch.randn(2, 5, 8), torch.zeros(2, 1, 5, 5)
    model = Tiny().eval()
    gm = capture(model, (x, mask)).graph_module
    relu = only(gm, aten.relu.default)
    gelu = replace_node(relu, aten.gelu.default, (relu.args[0],))
    gm.recompile()
    assert aten.relu.default not in targets(gm) and gelu.target is aten.gelu.default
    q, k, v = torch.nn.functional.gelu(model.qkv(x)).unsqueeze(1).chunk(3, dim=-1)
    torch.testing.assert_close(gm(x, mask), torch.nn.functional.scaled_dot_product_attention(q, k, v, mask))


def test_values_at_reads_intermediates_on_the_example():
    gm, flat = graph()
    relu = only(gm, aten.relu.default)
    values = values_at(gm, [relu], flat)
    assert (values[relu] >= 0).all() and values[relu].shape == (2, 5, 24)


def test_remove_dead_keeps_asserts_and_mutations():
    gm, flat = graph()
    relu = only(gm, aten.relu.default)
    unused = Inserter(relu)(aten.exp.default, relu)
    assert unused in gm.graph.nodes
    asserts = [n for n in gm.graph.nodes if "assert" in str(n.target)]
    assert remove_dead(gm) >= 1
    assert unused not in gm.graph.nodes and all(a in gm.graph.nodes for a in asserts)


def test_refresh_keeps_the_symbolic_batch_and_falls_back_for_data_dependent_sizes():
    gm, flat = graph()
    assert isinstance(only(gm, SDPA).meta["val"].shape[0], torch.SymInt)
    relu = only(gm, aten.relu.default)
    Inserter(relu)(aten.mul.Tensor, relu, 1.0)
    refresh_meta(gm, flat)
    assert isinstance(only(gm, SDPA).meta["val"].shape[0], torch.SymInt)  # the capture's ShapeEnv

    positive = int((values_at(gm, [relu], flat)[relu] != 0).sum())

    def keep_positive(x):  # a size that depends on the data; static metadata takes the example's count
        try:
            idx = x.reshape(-1).nonzero().squeeze(1)
        except DynamicOutputShapeException:
            idx = torch.arange(positive)
        return x.reshape(-1)[idx]

    node = Inserter(relu)(keep_positive, relu)
    refresh_meta(gm, flat)
    assert tuple(node.meta["val"].shape) == (positive,) and isinstance(node.meta["val"].shape[0], int)
