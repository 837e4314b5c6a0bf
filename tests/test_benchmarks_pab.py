"""benchmarks/pab.py's config builders and the hook's layer identifiers: the small configs run, and the
hook wraps the attention layers each family's PAB rule is about (not the text refiner of HunyuanVideo)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import pab

EXPECTED = {  # module -> range the hook should give it
    "wan-small": {"blocks.0.attn1": 2, "blocks.0.attn2": 6, "blocks.1.attn1": 2, "blocks.1.attn2": 6},
    "hunyuan-small": {"transformer_blocks.0.attn": 2, "single_transformer_blocks.0.attn": 2},
    "latte-small": {**{f"transformer_blocks.{i}.attn1": 2 for i in range(2)},
                    **{f"transformer_blocks.{i}.attn2": 6 for i in range(2)},
                    **{f"temporal_transformer_blocks.{i}.attn1": 4 for i in range(2)}},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builder_runs_and_hook_wraps_the_right_layers(name):
    family, build, _ = pab.QUICK[name]
    model, x, cond = build()
    with torch.inference_mode():
        out = pab.sample(model(x, timestep=torch.full((x.shape[0],), 500), **cond))
    assert out.shape == x.shape or (family == "latte" and out.shape[1] == 2 * x.shape[1])  # Latte: + variance
    _, _, _, wrapped = pab.hooked(model, pab.HOOK_LAYERS[family])
    assert wrapped == EXPECTED[name]


def test_default_identifiers_misfile_hunyuan_refiner():
    model, _, _ = pab.hunyuan(16, 3, batch=2)
    *_, default = pab.hooked(model, None)
    assert default.get("context_embedder.token_refiner.refiner_blocks.0.attn") == 2
