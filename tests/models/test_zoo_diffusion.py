"""Today's diffusion transformers (Wan, HunyuanVideo, Mochi, LTX-Video, CogVideoX 5B / 1.5, Allegro, Flux,
SD3, EasyAnimate) are captured: optimize(model, []) computes what diffusers' own model computes, bit for
bit, on repeated calls and at another batch size."""

import functools

import pytest
import torch
from torch.utils import _pytree as pytree

import dittofx
from dittofx.models import zoo
from dittofx.rewriter.axes import size_hint
from tests.conftest import run

MODELS = ("cogvideox5b", "cogvideox15", "wan", "hunyuanvideo", "mochi", "ltx_video", "allegro", "flux", "sd3",
          "easyanimate")
STATIC_BATCH = {"mochi"}  # its attention loops over the batch in Python (per-sample valid text tokens)
FAST = {"wan", "flux", "sd3", "cogvideox15"}  # ~8 s each on 2 free cores (one capture); the others are marked slow


def _leaves(out):
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


@functools.cache
def _optimized(name):
    zm = zoo.build(name, batch=2)
    return zm, dittofx.optimize(zm.model, [], zm.example_inputs, zm.example_kwargs)


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
def test_no_passes_is_bitwise_equal(name):
    zm, opt = _optimized(name)
    ref = run(zm.model, zm)
    assert type(run(opt, zm)) is type(ref)
    assert _equal(run(opt, zm), ref) and _equal(run(opt, zm), ref)
    other = zoo.build(name, batch=3, seed=5)  # other inputs at another batch, run through the same model
    assert _equal(run(opt, other), run(zm.model, other))
    assert opt.report.dynamic_batch == (name not in STATIC_BATCH)
    assert len(opt.variants) == (2 if name in STATIC_BATCH else 1)
    assert any(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in opt.graph_module.graph.nodes)


@pytest.mark.slow
def test_mochi_records_each_samples_text_length():
    zm, opt = _optimized("mochi")
    gm = opt.variants[0].capture.graph_module
    counts = [size_hint(n.meta["val"].shape[0]) for n in gm.graph.nodes if n.target is torch.ops.aten.nonzero.default]
    valid = zm.example_kwargs["encoder_attention_mask"].sum(1).tolist()  # padded prompts: [6, 4]
    assert valid == [6, 4] and counts == valid * zm.model.config.num_layers
