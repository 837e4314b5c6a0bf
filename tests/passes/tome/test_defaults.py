"""ToMe without r: r is chosen from the graph's token count and depth, said in the report, and the
result is the reference's ToMe at that r; a diffusion transformer is refused with the accepted form."""

import pytest
import timm
import torch

import dittofx
from dittofx.errors import PassSpecError
from dittofx.models import zoo
from dittofx.passes.tome import ToMe

try:  # tests/passes is a package
    from . import reference as ref
except ImportError:  # run as loose files
    import reference as ref


def test_default_r_of_a_vit_b_shaped_model_is_the_papers_mild_setting():
    # ViT-B/16's token count and depth (197 tokens, 12 blocks), narrow so that it is cheap
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=48, num_heads=2).eval()
    x = torch.rand(2, 3, 224, 224)
    opt = dittofx.optimize(model, ["tome"], (x,), check=False)  # checked against the reference below
    assert "tome: r=8 (default for 12 blocks of 197 tokens" in " ".join(opt.report.notes)
    assert opt.report.blocks[-1].tokens == 197 - 11 * 8
    with torch.no_grad():
        want = ref.timm_vit(model, x, [8] * 12)
        torch.testing.assert_close(opt(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_default_r_follows_the_token_count_and_depth():
    zm = zoo.build("vit", batch=2)  # 65 tokens (1 class token), 4 blocks: r = 64 // 8
    x = zm.example_inputs[0]
    for spec in ("tome", ToMe()):
        opt = dittofx.optimize(zm.model, [spec], zm.example_inputs, check=False)
        assert "tome: r=8 (default for 4 blocks of 65 tokens" in " ".join(opt.report.notes)
        with torch.no_grad():
            want = ref.timm_vit(zm.model, x, [8] * 4)
            torch.testing.assert_close(opt(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_explicit_r_is_kept_and_not_called_a_default():
    zm = zoo.build("vit", batch=2)
    opt = dittofx.optimize(zm.model, ["tome:r=4"], zm.example_inputs, check=False)
    assert not any("default" in n for n in opt.report.notes)
    assert opt.report.blocks[-1].tokens == 65 - 3 * 4


def test_no_r_on_a_diffusion_transformer_asks_for_a_ratio():
    zm = zoo.build("dit", batch=1)
    with pytest.raises(PassSpecError) as e:
        dittofx.optimize(zm.model, ["tome"], zm.example_inputs, zm.example_kwargs, check=False)
    assert "\n" not in str(e.value) and "tome:ratio=0.5" in str(e.value)
