"""dittofx.models.zoo: every model builds, runs, exports with torch.export, and depends on all its layers."""

import pytest
import torch

from dittofx.errors import ModelSpecError
from dittofx.models import zoo

EXPECTED = {  # name: (family, main input shape for batch 3, output shape)
    "vit": ("timm", (3, 3, 64, 64), (3, 10)),
    "deit_distilled": ("timm", (3, 3, 64, 64), (3, 10)),
    "vit_reg": ("timm", (3, 3, 64, 64), (3, 10)),
    "hf_vit": ("transformers", (3, 3, 64, 64), (3, 10)),
    "videomae": ("transformers", (3, 8, 3, 32, 32), (3, 10)),
    "dit": ("diffusers", (3, 4, 16, 16), (3, 4, 16, 16)),
    "pixart": ("diffusers", (3, 4, 16, 16), (3, 8, 16, 16)),
    "latte": ("diffusers", (3, 4, 4, 16, 16), (3, 8, 4, 16, 16)),
    "cogvideox": ("diffusers", (3, 3, 4, 16, 16), (3, 3, 4, 16, 16)),
}


def _out(o):
    if torch.is_tensor(o):
        return o
    if isinstance(o, (tuple, list)):
        return o[0]
    return o.logits if hasattr(o, "logits") else o.sample


def test_names_are_the_documented_ones():
    assert set(zoo.NAMES) == set(EXPECTED)
    assert set(zoo.FAMILIES) == {"timm", "transformers", "diffusers"}


@pytest.mark.parametrize("name", zoo.NAMES)
def test_build_forward_export(name):
    z = zoo.build(name, batch=3)
    family, in_shape, out_shape = EXPECTED[name]
    assert z.family == family and z.name == name
    assert not z.model.training
    assert tuple(z.example_inputs[0].shape) == in_shape
    for k, v in z.example_kwargs.items():  # every batched input has the batch size
        assert torch.is_tensor(v) and v.shape[0] == 3, k
    with torch.no_grad():
        eager = _out(z.model(*z.example_inputs, **z.example_kwargs))
    assert tuple(eager.shape) == out_shape
    assert torch.isfinite(eager).all()

    ep = torch.export.export(z.model, z.example_inputs, z.example_kwargs, strict=False)
    sdpa = [n for n in ep.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert sdpa, "attention should survive as aten.scaled_dot_product_attention"
    with torch.no_grad():
        exported = _out(ep.module()(*z.example_inputs, **z.example_kwargs))
    torch.testing.assert_close(exported, eager)


@pytest.mark.parametrize("name", ["vit_reg", "deit_distilled", "dit", "latte"])
def test_deterministic_and_seeded(name):
    a, b, c = zoo.build(name), zoo.build(name), zoo.build(name, seed=1)
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k
    assert any(not torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), c.model.state_dict().values()))
    for x, y in zip(a.example_inputs, b.example_inputs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", zoo.NAMES)
def test_no_degenerate_parameters(name):
    # zero-initialised layers (biases, proj_out, adaLN) and 1e-6 tokens would hide bugs in tests
    z = zoo.build(name)
    flat = [n for n, p in z.model.named_parameters() if p.abs().max() < 1e-4]
    assert not flat


@pytest.mark.parametrize("name", ["dit", "latte", "cogvideox", "vit_reg"])
def test_output_depends_on_last_block_and_conditioning(name):
    z = zoo.build(name)
    with torch.no_grad():
        base = _out(z.model(*z.example_inputs, **z.example_kwargs))
        blocks = [m for n, m in z.model.named_modules() if n.endswith(("blocks.1", "blocks.3"))]
        last = blocks[-1]
        p = next(last.parameters())
        saved = p.clone()
        p.add_(0.5)
        changed = _out(z.model(*z.example_inputs, **z.example_kwargs))
        p.copy_(saved)
        assert (changed - base).abs().max() > 1e-3
        if "timestep" in z.example_kwargs:
            kw = dict(z.example_kwargs, timestep=z.example_kwargs["timestep"] + 50)
            assert (_out(z.model(*z.example_inputs, **kw)) - base).abs().max() > 1e-4
        if "encoder_hidden_states" in z.example_kwargs:
            kw = dict(z.example_kwargs, encoder_hidden_states=z.example_kwargs["encoder_hidden_states"] + 1)
            assert (_out(z.model(*z.example_inputs, **kw)) - base).abs().max() > 1e-4


def test_prefix_tokens_match_timm():
    assert zoo.build("vit").model.num_prefix_tokens == 1
    assert zoo.build("deit_distilled").model.num_prefix_tokens == 2
    z = zoo.build("vit_reg")
    assert z.model.num_prefix_tokens == 5 and z.info["prefix_tokens"] == 5
    assert z.model.patch_embed.num_patches + 5 == z.info["tokens"] == 69


def test_unknown_name_is_one_line_error():
    with pytest.raises(ModelSpecError) as e:
        zoo.build("vit_huge")
    msg = str(e.value)
    assert "\n" not in msg and "vit_huge" in msg
    for n in zoo.NAMES:
        assert n in msg


def test_bad_batch():
    with pytest.raises(ModelSpecError):
        zoo.build("vit", batch=0)
