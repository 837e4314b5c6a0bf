"""Eager programs: ATen overloads called through their C bindings, parameters read directly."""

import operator

import pytest
import torch
from torch import fx
from torch.utils import _pytree as pytree

import dittofx
from dittofx._torch_compat import fx_emits
from dittofx.models import zoo
from dittofx.runtime.eager import _agrees, binding, eager_program

aten = torch.ops.aten


@pytest.mark.parametrize("name, passes", [("cogvideox", []), ("vit", ["tome:r=4"]), ("videomae", ["rlt"])])
def test_same_outputs_bitwise_with_c_bindings(name, passes):
    zm = zoo.build(name)
    opt = dittofx.optimize(zm.model, passes, zm.example_inputs, zm.example_kwargs)
    gm = opt.graph_module
    program = eager_program(gm)
    ops = [n for n in program.graph.nodes if n.op == "call_function"]
    kept = [n for n in ops if isinstance(n.target, torch._ops.OpOverload)]
    assert len(ops) - len(kept) > 0.8 * sum(n.target is not aten.sym_size.int for n in ops)  # most go through C
    assert all(binding(n.target) is None or n.target._schema.is_mutable or str(n.target) == "aten.to.dtype_layout"
               for n in kept), {str(n.target) for n in kept}
    assert not any(n.op == "get_attr" and "." in n.target for n in program.graph.nodes)
    with torch.inference_mode():
        want = pytree.tree_leaves(gm(*zm.example_inputs, **zm.example_kwargs))
        got = pytree.tree_leaves(program(*zm.example_inputs, **zm.example_kwargs))
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    # the graph itself keeps its overloads (analysis, compile and export read them)
    assert any(n.target is aten.scaled_dot_product_attention.default for n in gm.graph.nodes) or name == "videomae"


def _node(graph, target, args, kwargs, vals):
    for a, v in zip(args, vals):
        a.meta["val"] = v
    return graph.call_function(target, args, kwargs)


def test_a_binding_is_used_only_where_it_computes_the_same():
    g = fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    vals = (torch.randn(2, 3), torch.randn(2, 3))
    add = _node(g, aten.add.Tensor, (x, y), {}, vals)
    to = _node(g, aten.to.dtype_layout, (x,), {"dtype": torch.float64, "layout": torch.strided}, vals[:1])
    assert _agrees(add, aten.add.Tensor, binding(aten.add.Tensor))
    # Tensor.to takes no `layout` keyword: the overload stays
    assert not _agrees(to, aten.to.dtype_layout, binding(aten.to.dtype_layout))
    assert binding(aten.index_add_.default) is None  # mutating overloads keep theirs
    assert binding(aten.sym_size.int) is None


def test_moving_the_module_binds_the_tensors_again():
    zm = zoo.build("vit")
    opt = dittofx.optimize(zm.model, ["tome:r=4"], zm.example_inputs)
    before = opt(*zm.example_inputs)
    opt.to(torch.float64).to(torch.float32)  # new parameter and buffer tensors where .to() made them
    program = opt.variants[0].runner
    tensors = dict(opt.variants[0].gm.named_parameters()) | dict(opt.variants[0].gm.named_buffers())
    bound = {k[len("_attr_"):]: v for k, v in vars(program).items() if k.startswith("_attr_")}
    assert bound and all(any(v is t for t in tensors.values()) for v in bound.values())
    torch.testing.assert_close(opt(*zm.example_inputs), before)


def test_only_bindings_fx_can_write_are_used():
    # HunyuanVideo's mask `a & b` is aten.__and__.Tensor, whose binding torch._C._VariableFunctions.__and__
    # fx cannot name ("cannot find module"); torch.split is a Python wrapper, not split's binding
    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    vals = (torch.rand(3, 4) > 0.5, torch.rand(3, 4) > 0.5)
    both = _node(g, aten.__and__.Tensor, (a, b), {}, vals)
    both.meta["val"] = vals[0] & vals[1]
    parts = g.call_function(aten.split.Tensor, (both, 2, 1))
    first = g.call_function(operator.getitem, (parts, 0))
    g.output((both, g.call_function(aten.bitwise_not.default, (first,))))
    gm = fx.GraphModule(torch.nn.Module(), g)
    program = eager_program(gm)  # fx's code generation raised RuntimeError here before
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert aten.__and__.Tensor not in targets  # bound to torch.Tensor.__and__, a name fx writes
    assert aten.split.Tensor in targets
    assert all(torch.equal(x, y) for x, y in zip(gm(*vals), program(*vals), strict=True))
    for packet in (getattr(aten, name) for name in dir(aten)):
        if isinstance(packet, torch._ops.OpOverloadPacket):
            for overload in packet.overloads():
                fn = binding(getattr(packet, overload))
                assert fn is None or fx_emits(fn), (packet, overload)
