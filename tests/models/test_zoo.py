"""dittofx.models.zoo: every model builds, runs, exports with torch.export, and depends on all its layers and inputs."""

import pytest
import torch
from torch.utils import _pytree as pytree

from dittofx.errors import ModelSpecError
from dittofx.models import zoo
from tests.models.test_zoo_diffusion import MODELS as DIFFUSION

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
    "cogvideox5b": ("diffusers", (3, 3, 4, 16, 16), (3, 3, 4, 16, 16)),
    "cogvideox15": ("diffusers", (3, 4, 4, 16, 16), (3, 4, 4, 16, 16)),
    "wan": ("diffusers", (3, 4, 3, 16, 16), (3, 4, 3, 16, 16)),
    "hunyuanvideo": ("diffusers", (3, 4, 3, 16, 16), (3, 4, 3, 16, 16)),
    "mochi": ("diffusers", (3, 4, 3, 16, 16), (3, 4, 3, 16, 16)),
    "ltx_video": ("diffusers", (3, 192, 8), (3, 192, 8)),
    "allegro": ("diffusers", (3, 4, 3, 16, 16), (3, 4, 3, 16, 16)),
    "flux": ("diffusers", (3, 64, 16), (3, 64, 16)),
    "sd3": ("diffusers", (3, 4, 16, 16), (3, 4, 16, 16)),
    "easyanimate": ("diffusers", (3, 4, 3, 16, 16), (3, 4, 3, 16, 16)),
}
# inputs a pipeline passes once for every sample: position ids, rotary tables, latent sizes
SHARED = {"img_ids", "txt_ids", "image_rotary_emb", "num_frames", "height", "width", "rope_interpolation_scale"}


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
    two = zoo.build(name, batch=2).example_kwargs
    for k, v in z.example_kwargs.items():  # every batched input has the batch size, shared ones none
        if k in SHARED:
            pairs = zip(pytree.tree_leaves(v), pytree.tree_leaves(two[k]), strict=True)
            assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in pairs), k
        else:
            assert torch.is_tensor(v) and v.shape[0] == 3, k
    with torch.no_grad():
        eager = _out(z.model(*z.example_inputs, **z.example_kwargs))
    assert tuple(eager.shape) == out_shape
    assert torch.isfinite(eager).all()
    if name in DIFFUSION:
        return  # captured (torch.export, attention kept as SDPA) in test_zoo_diffusion, ~10 s each

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


@pytest.mark.parametrize("name", DIFFUSION)
def test_every_pipeline_input_changes_the_output(name):
    # each input the pipeline passes reaches the output: masks (padding removed), rotary tables, position
    # ids, guidance, pooled projections, LTX's rope scale; none is silently ignored by the model
    z = zoo.build(name)
    with torch.no_grad():
        base = _out(z.model(*z.example_inputs, **z.example_kwargs))
        for k, v in z.example_kwargs.items():
            changed = _perturbed(k, v)
            if changed is None:
                continue
            out = _out(z.model(*z.example_inputs, **dict(z.example_kwargs, **{k: changed})))
            assert (out - base).abs().max() > 1e-5, k


def _perturbed(name, value):
    """`value` changed in a way the model must notice, or None where there is no such change (sizes)."""
    if "mask" in name:
        return torch.ones_like(value)  # no padding: the padded samples see two more text tokens
    if torch.is_tensor(value):
        return value + (50 if name == "timestep" and not value.is_floating_point() else 0.25)
    if name == "rope_interpolation_scale":
        return tuple(2 * s for s in value)
    if name == "image_rotary_emb":  # perturb the frequency tables, keep integer positions
        return pytree.tree_map(lambda t: t + 0.25 if t.is_floating_point() else t, value)
    return None


@pytest.mark.slow  # imports the pipelines (their text encoders' code): ~10 s
@pytest.mark.parametrize("name", ["cogvideox5b", "cogvideox15", "allegro"])
def test_rotary_tables_are_the_pipelines(name):
    from types import SimpleNamespace

    from diffusers import AllegroPipeline, CogVideoXPipeline

    z = zoo.build(name)
    pipe = SimpleNamespace(vae_scale_factor_spatial=8, transformer=z.model)
    x = z.example_inputs[0]
    if name == "allegro":  # latents (B, C, F, H, W)
        want = AllegroPipeline._prepare_rotary_positional_embeddings(pipe, 2, x.shape[3] * 8, x.shape[4] * 8,
                                                                     x.shape[2], "cpu")
    else:  # latents (B, F, C, H, W)
        want = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, x.shape[3] * 8, x.shape[4] * 8,
                                                                       x.shape[1], "cpu")
    got = z.example_kwargs["image_rotary_emb"]
    assert pytree.tree_structure(got) == pytree.tree_structure(want)
    assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(want), strict=True))


@pytest.mark.slow  # imports the pipelines: ~10 s
def test_packed_latents_and_position_ids_are_the_pipelines():
    from diffusers import FluxPipeline, LTXPipeline

    def latents(shape):  # the zoo's first draw from its input generator (seed + 1)
        return torch.randn(shape, generator=torch.Generator().manual_seed(1))

    flux = zoo.build("flux")
    assert torch.equal(flux.example_inputs[0], FluxPipeline._pack_latents(latents((2, 4, 16, 16)), 2, 4, 16, 16))
    assert torch.equal(flux.example_kwargs["img_ids"], FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu",
                                                                                              torch.float32))
    ltx = zoo.build("ltx_video")
    assert torch.equal(ltx.example_inputs[0], LTXPipeline._pack_latents(latents((2, 8, 3, 8, 8)), 1, 1))


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
