"""optimize(): a drop-in module, exact with no passes, dynamic batch, re-capture on a new call form."""

import pytest
import torch
from torch.utils import _pytree as pytree

import dittofx
from dittofx.errors import DittoError, PassSpecError
from dittofx.models import zoo
from dittofx.passes.sdpa import CanonicalizeAttention
from tests.conftest import first_tensor, run
from tests.models.test_zoo_diffusion import MODELS as TODAYS_DIFFUSION


def leaves(out):
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("name", [n for n in zoo.NAMES if n not in TODAYS_DIFFUSION])  # those: test_zoo_diffusion
def test_no_passes_is_exact_and_keeps_output_type(name):
    zm = zoo.build(name)
    opt = dittofx.optimize(zm.model, [], zm.example_inputs, zm.example_kwargs)
    out, ref = run(opt, zm), run(zm.model, zm)
    assert type(out) is type(ref)
    assert all(torch.equal(a, b) for a, b in zip(leaves(out), leaves(ref), strict=True))
    assert opt.report.blocks and len(opt.variants) == 1


def test_dynamic_batch_reuses_the_graph():
    zm = zoo.build("dit", batch=2)
    opt = dittofx.optimize(zm.model, [], zm.example_inputs, zm.example_kwargs)
    big = zoo.build("dit", batch=5, seed=3)
    torch.testing.assert_close(first_tensor(run(opt, big)), first_tensor(run(zm.model, big)), rtol=0, atol=0)
    one = zoo.build("dit", batch=1, seed=4)
    torch.testing.assert_close(first_tensor(run(opt, one)), first_tensor(run(zm.model, one)), rtol=0, atol=0)
    assert len(opt.variants) == 1 and opt.report.dynamic_batch


def test_new_call_form_is_captured_again():
    zm = zoo.build("pixart")
    opt = dittofx.optimize(zm.model, ["sdpa"], zm.example_inputs, zm.example_kwargs)
    with torch.no_grad():
        out = opt(*zm.example_inputs, **zm.example_kwargs, return_dict=False)
        ref = zm.model(*zm.example_inputs, **zm.example_kwargs, return_dict=False)
    assert isinstance(out, tuple) and len(opt.variants) == 2
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    # kwargs in another order are the same call form
    with torch.no_grad():
        opt(*zm.example_inputs, **dict(reversed(list(zm.example_kwargs.items()))))
    assert len(opt.variants) == 2


def test_forwards_the_attributes_pipelines_read():
    zm = zoo.build("latte")
    opt = dittofx.optimize(zm.model, [], zm.example_inputs, zm.example_kwargs)
    assert opt.config is zm.model.config
    assert opt.dtype == zm.model.dtype and opt.device == zm.model.device
    # parameters are shared with the model, not copied
    assert {p.data_ptr() for p in opt.parameters()} <= {p.data_ptr() for p in zm.model.parameters()}


def test_example_inputs_inferred_for_timm():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8).eval()
    opt = dittofx.optimize(model, ["sdpa"])
    assert opt.report.blocks[0].tokens == (32 // 8) ** 2 + 1


def test_passes_as_strings_and_objects():
    zm = zoo.build("vit")
    a = dittofx.optimize(zm.model, ["sdpa"], zm.example_inputs)
    b = dittofx.optimize(zm.model, [CanonicalizeAttention()], zm.example_inputs)
    torch.testing.assert_close(run(a, zm), run(b, zm))


@pytest.mark.parametrize("spec, words", [
    ("nope", ["unknown pass 'nope'", "accepted"]),
    ("sdpa:x=1", ["unknown option 'x'", "sdpa"]),
    ("sdpa:x", ["not KEY=VALUE"]),
])
def test_bad_pass_specs_are_one_line(spec, words):
    zm = zoo.build("vit")
    with pytest.raises(PassSpecError) as e:
        dittofx.optimize(zm.model, [spec], zm.example_inputs)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)


def test_not_a_module():
    with pytest.raises(DittoError, match="takes a torch.nn.Module"):
        dittofx.optimize(lambda x: x, [])


def test_capture_failure_is_one_line():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # Python control flow on a tensor value
                return x * 2
            return x

    with pytest.raises(DittoError) as e:
        dittofx.optimize(DataDependent(), [], (torch.randn(2, 3),))
    msg = str(e.value)
    assert "\n" not in msg and "torch.export could not capture DataDependent" in msg and "control flow" in msg


def test_example_size_the_model_refuses_is_named_not_control_flow():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8).eval()
    with pytest.raises(DittoError) as e:
        dittofx.optimize(model, ["sdpa"], (torch.randn(1, 3, 48, 48),))
    msg = str(e.value)
    assert "\n" not in msg and "Input height (48) doesn't match model (32)" in msg and "control flow" not in msg


def test_an_example_batch_of_0_is_refused():
    zm = zoo.build("vit")
    with pytest.raises(DittoError, match="batch of 0"):
        dittofx.optimize(zm.model, [], (zm.example_inputs[0][:0],))


@pytest.mark.parametrize("assign", [False, True])
def test_checkpoints_load_both_ways_and_the_next_call_uses_them(assign):
    zm, other = zoo.build("vit"), zoo.build("vit", seed=1)  # same architecture, other weights
    opt = dittofx.optimize(zm.model, [], zm.example_inputs)
    assert list(opt.state_dict()) == list(zm.model.state_dict())
    opt.load_state_dict(other.model.state_dict(), assign=assign)  # the original's checkpoint into the drop-in
    assert torch.equal(run(opt, zm), run(other.model, zm))
    fresh = zoo.build("vit", seed=2).model
    fresh.load_state_dict(opt.state_dict())  # and the drop-in's into the original
    assert torch.equal(run(fresh, zm), run(other.model, zm))


def test_checkpoints_of_a_model_holding_the_drop_in_load_both_ways():
    zm, other = zoo.build("vit"), zoo.build("vit", seed=1)
    holder = torch.nn.Sequential(dittofx.optimize(zm.model, [], zm.example_inputs))
    assert list(holder.state_dict()) == list(torch.nn.Sequential(zm.model).state_dict())
    holder.load_state_dict(torch.nn.Sequential(other.model).state_dict())
    assert torch.equal(run(holder, zm), run(other.model, zm))
    fresh = torch.nn.Sequential(zoo.build("vit", seed=2).model)
    fresh.load_state_dict(holder.state_dict())
    assert torch.equal(run(fresh, zm), run(other.model, zm))
    with pytest.raises(RuntimeError, match="Missing key") as e:  # strict loading still says what is missing
        holder.load_state_dict({k: v for k, v in holder.state_dict().items() if not k.endswith("head.bias")})
    assert '"0.head.bias"' in str(e.value) and "variants" not in str(e.value)


def test_loaded_weights_are_not_mixed_with_pab_caches_of_the_old_ones():
    zm, other = zoo.build("latte"), zoo.build("latte", seed=1)
    opt = dittofx.optimize(zm.model, ["pab"], zm.example_inputs, zm.example_kwargs, check=False)

    def at(model, t):
        with torch.no_grad():
            kwargs = {**zm.example_kwargs, "timestep": torch.full_like(zm.example_kwargs["timestep"], t)}
            return model(*zm.example_inputs, **kwargs).sample

    at(opt, 600)  # a generation's first step: its caches hold attention of the old weights
    opt.load_state_dict(other.model.state_dict())
    torch.testing.assert_close(at(opt, 500), at(other.model, 500))  # broadcast from them: 1.39 off


class Shifted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.register_buffer("shift", torch.randn(3))

    def forward(self, x):
        return self.proj(x) + self.shift


def test_after_a_conversion_the_graph_and_the_original_share_the_tensors():
    model = Shifted()
    opt = dittofx.optimize(model, [], (torch.randn(2, 4),))
    opt.double()  # .double() makes a new buffer tensor: the graph must read the original's
    assert model.shift.dtype == torch.float64
    other = Shifted().double()
    opt.load_state_dict(other.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(opt(x), other(x))


def test_compile_mode_shows_its_first_call_as_a_stage(caplog):
    opt = dittofx.optimize(torch.nn.Linear(4, 3), [], (torch.randn(2, 4),), compile=True, check=False)
    with caplog.at_level("DEBUG", logger="dittofx"), torch.no_grad():
        opt(torch.randn(2, 4))
        opt(torch.randn(2, 4))
    stages = [(r.dittofx_stage, r.title) for r in caplog.records if getattr(r, "dittofx_stage", None)]
    assert stages == [("start", "torch.compile the rewritten graph (first call)"),
                      ("done", "torch.compile the rewritten graph (first call)")]
