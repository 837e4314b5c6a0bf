"""ToMe's diffusion mode against tomesd itself (the peer, a dev-only dependency), option for option, on a
small Stable-Diffusion-style UNet2DConditionModel: same settings, same output within 1e-5."""

import copy

import pytest
import torch

import dittofx
from dittofx.errors import PassSpecError
from dittofx.passes.spec import parse_pass
from dittofx.passes.tome import ToMe

tomesd = pytest.importorskip("tomesd")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd():
    """SD1.5's layout, small: two resolution levels with cross-attention transformers, a mid block."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor([10, 500]))
    return unet, inputs, {"encoder_hidden_states": torch.randn(2, 7, 32)}


def call(model, inputs, kwargs, batch=None):
    if batch is not None:
        inputs, kwargs = tuple(t[:batch] for t in inputs), {k: v[:batch] for k, v in kwargs.items()}
    with torch.no_grad():
        out = model(*inputs, **kwargs)
    return out.sample if hasattr(out, "sample") else out[0]


def patched(unet, seed=None, **options):
    """tomesd on a copy; its generator seeded, or (seed None) forked from the global RNG at its first call."""
    ref = tomesd.apply_patch(copy.deepcopy(unet), **options)
    if seed is not None:
        ref._tome_info["args"]["generator"] = torch.Generator().manual_seed(seed)
    return ref


def assert_close(got, want):
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("options,levels", [
    ({}, 1),  # tomesd's defaults: max_downsample=1 (the 16x16 grid only), use_rand=True
    ({"max_downsample": 8}, 2),
    ({"max_downsample": 2, "use_rand": False}, 2),
    ({"sx": 4, "sy": 2, "ratio": 0.6}, 1),
    ({"merge_crossattn": True, "merge_mlp": True}, 1),
    ({"merge_attn": False, "merge_mlp": True, "max_downsample": 8, "use_rand": False}, 2),
], ids=["defaults", "max_downsample=8", "fixed", "sx4_sy2", "cross_mlp", "mlp_only"])
def test_equals_tomesd(sd, options, levels):
    unet, inputs, kwargs = sd
    options = {"ratio": 0.5, **options}
    ref = patched(unet, seed=7, **options)
    seed = None if options.get("use_rand") is False else 7  # use_rand=False with a seed: one draw, kept
    opt = dittofx.optimize(unet, [ToMe(seed=seed, **options)], inputs, kwargs)
    merged = [b.name for b in opt.report.blocks if any("merged" in a for a in b.actions)]
    fine = [b for b in merged if b.startswith(("down_blocks.0.", "up_blocks.1."))]  # the 16x16 level
    assert len(fine) == 3 and len(merged) == (3 if levels == 1 else 7)  # 8x8: down_blocks.1, mid, up_blocks.0
    base = call(unet, inputs, kwargs)
    outs = []
    for _ in range(2):  # consecutive calls: with use_rand, both draw what tomesd's consecutive calls draw
        got, want = call(opt, inputs, kwargs), call(ref, inputs, kwargs)
        assert_close(got, want)
        assert (got - base).abs().max() > 1e-3  # it did merge
        outs.append(got)
    assert torch.equal(outs[0], outs[1]) != options.get("use_rand", True)  # re-drawn on every call


def test_no_attention_at_the_finest_level_as_tomesd():
    """SDXL's layout: no transformer at the latent's resolution, so tomesd's default merges nothing;
    max_downsample=2 merges the next level."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8).eval()
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor([10, 500]))
    kwargs = {"encoder_hidden_states": torch.randn(2, 7, 32)}
    opt = dittofx.optimize(unet, [ToMe(ratio=0.5)], inputs, kwargs)
    assert "the finest is at downsample 2): nothing merged" in str(opt.report)
    assert torch.equal(call(opt, inputs, kwargs), call(unet, inputs, kwargs))
    opt = dittofx.optimize(unet, [ToMe(ratio=0.5, max_downsample=2, seed=1)], inputs, kwargs)
    assert_close(call(opt, inputs, kwargs), call(patched(unet, seed=1, ratio=0.5, max_downsample=2), inputs, kwargs))


def test_unseeded_generator_forks_the_global_rng_as_tomesd(sd):
    unet, inputs, kwargs = sd
    ref = patched(unet, ratio=0.5)
    opt = dittofx.optimize(unet, [ToMe(ratio=0.5)], inputs, kwargs)
    torch.manual_seed(11)
    want = [call(ref, inputs, kwargs) for _ in range(2)]
    torch.manual_seed(11)
    got = [call(opt, inputs, kwargs) for _ in range(2)]
    for g, w in zip(got, want):
        assert_close(g, w)


def test_odd_batch_uses_top_left_and_draws_nothing(sd):
    unet, inputs, kwargs = sd
    ref = patched(unet, seed=3, ratio=0.5)
    opt = dittofx.optimize(unet, [ToMe(ratio=0.5, seed=3)], inputs, kwargs)
    odd = [call(opt, inputs, kwargs, batch=1) for _ in range(2)]
    assert torch.equal(odd[0], odd[1])  # fixed destinations
    assert_close(odd[0], call(ref, inputs, kwargs, batch=1))  # tomesd: the top-left ones
    assert_close(call(opt, inputs, kwargs), call(ref, inputs, kwargs))  # the generator was not advanced


def test_ratio0_is_exact(sd):
    unet, inputs, kwargs = sd
    opt = dittofx.optimize(unet, [ToMe(ratio=0.0, max_downsample=8, merge_crossattn=True, merge_mlp=True)],
                           inputs, kwargs)
    assert torch.equal(call(opt, inputs, kwargs), call(unet, inputs, kwargs))


def test_one_resolution_transformer_keeps_fixed_destinations():
    """A DiT has one resolution: max_downsample=1 merges every block, and use_rand's default is off
    there (fixed top-left destinations, exportable)."""
    from dittofx.models import zoo

    zm = zoo.build("dit", batch=2)
    opt = dittofx.optimize(zm.model, [ToMe(ratio=0.5)], zm.example_inputs, zm.example_kwargs)
    merged = [b for b in opt.report.blocks if any("merged" in a for a in b.actions)]
    assert merged and len(merged) == len(opt.report.blocks)
    assert not hasattr(opt.graph_module, "tome_draws")


def test_export_refuses_use_rand(sd, tmp_path, caplog):
    """An exported model cannot hold the generator: refused in one line before any capture, never exported
    without it."""
    pytest.importorskip("onnxscript")
    from dittofx.errors import ExportError

    unet, inputs, kwargs = sd
    opt = dittofx.optimize(unet, [ToMe(ratio=0.5, use_rand=True)], inputs, kwargs)
    with pytest.raises(ExportError, match="use_rand=True") as e:
        dittofx.export_onnx(opt, tmp_path / "unet.onnx", example_inputs=inputs, example_kwargs=kwargs)
    assert "use_rand=False" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "unet.onnx").exists() and "batch cannot be dynamic" not in caplog.text


@pytest.mark.slow
def test_compiled_equals_tomesd(sd):
    unet, inputs, kwargs = sd
    ref = patched(unet, seed=5, ratio=0.5)
    opt = dittofx.optimize(unet, [ToMe(ratio=0.5, seed=5)], inputs, kwargs, compile=True)
    for _ in range(2):  # fullgraph: the draw is one opaque op, run at every call
        assert_close(call(opt, inputs, kwargs), call(ref, inputs, kwargs))


@pytest.mark.parametrize("spec", ["tome:ratio=0.5,max_downsample=0", "tome:ratio=0.5,sx=0", "tome:ratio=0.5,sy=1.5",
                                  "tome:ratio=0.5,use_rand=1", "tome:ratio=0.5,merge_crossattn=2",
                                  "tome:r=4,max_downsample=2", "tome:use_rand=True"])
def test_bad_options(spec):
    with pytest.raises(PassSpecError) as e:
        parse_pass(spec)
    assert "\n" not in str(e.value) and "tome" in str(e.value)


def test_spec_round_trip():
    spec = "tome:ratio=0.5,max_downsample=2,sx=4,sy=2,use_rand=False,merge_crossattn=True,merge_mlp=True,seed=3"
    assert parse_pass(parse_pass(spec).spec()).options() == parse_pass(spec).options()
    assert parse_pass(spec).options()["max_downsample"] == 2
