"""capture(): dynamic batch only where the graph kept it, data-dependent sizes given their example values,
every failure one CaptureError line."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dittofx
from dittofx.errors import CaptureError
from dittofx.rewriter import capture as capture_module
from dittofx.rewriter.analysis import analyze
from dittofx.rewriter.axes import shape_of, size_hint
from dittofx.rewriter.capture import capture
from dittofx.rewriter.edit import refresh_meta

aten = torch.ops.aten


class ValidTextAttention(nn.Module):
    """Mochi's pattern: each sample attends over its video tokens and only its valid (unpadded) text
    tokens, selected with nonzero in a Python loop over the batch."""

    def __init__(self):
        super().__init__()
        self.q, self.kv, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, text, mask):
        outs = []
        for i in range(x.shape[0]):
            keep = torch.nonzero(mask[i], as_tuple=False).flatten()
            kv = self.kv(torch.cat([x[i:i + 1], text[i:i + 1, keep]], dim=1))
            outs.append(F.scaled_dot_product_attention(self.q(x[i:i + 1]), kv, kv))
        return x + self.out(torch.cat(outs))


def _inputs(batch, valid):
    gen = torch.Generator().manual_seed(batch)
    mask = torch.arange(5)[None, :] < torch.tensor(valid)[:, None]
    return torch.randn(batch, 4, 8, generator=gen), torch.randn(batch, 5, 8, generator=gen), mask


def _nonzero_counts(gm):
    return [size_hint(n.meta["val"].shape[0]) for n in gm.graph.nodes if n.target is aten.nonzero.default]


def test_data_dependent_sizes_get_the_example_values():
    x, text, mask = _inputs(3, [5, 2, 4])
    cap = capture(ValidTextAttention().eval(), (x, text, mask))
    # the Python loop pins the batch: said, not hidden behind a batch symbol that guards fail on
    assert not cap.dynamic_batch and any("fixes its batch" in n for n in cap.notes)
    assert any("data-dependent" in n for n in cap.notes)
    assert _nonzero_counts(cap.graph_module) == mask.sum(1).tolist() == [5, 2, 4]
    sdpa = [n for n in cap.graph_module.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert [shape_of(n.args[1]) for n in sdpa] == [(1, 4 + v, 8) for v in (5, 2, 4)]
    analysis = analyze(cap.graph_module, cap.batched_inputs)  # raised GuardOnDataDependentSymNode before
    assert len(analysis.sites) == 3


def test_refresh_meta_keeps_the_recorded_sizes():
    x, text, mask = _inputs(3, [5, 2, 4])
    cap = capture(ValidTextAttention().eval(), (x, text, mask))
    refresh_meta(cap.graph_module, cap.flat_inputs())
    assert _nonzero_counts(cap.graph_module) == [5, 2, 4]


def test_a_pinned_batch_is_captured_at_the_callers_batch():
    # batch 1 is exported at batch 2 for a dynamic batch; a model that pins its batch must then get a
    # graph for the batch it is called with, not for 2
    model = ValidTextAttention().eval()
    x, text, mask = _inputs(1, [3])
    cap = capture(model, (x, text, mask))
    assert not cap.dynamic_batch and cap.example_inputs[0].shape[0] == 1
    assert _nonzero_counts(cap.graph_module) == [3]
    opt = dittofx.optimize(model, [], (x, text, mask))
    with torch.no_grad():
        assert torch.equal(opt(x, text, mask), model(x, text, mask))
        x2, text2, mask2 = _inputs(2, [1, 5])  # another batch: captured again, sizes from the mask at run time
        assert torch.equal(opt(x2, text2, mask2), model(x2, text2, mask2))
    assert len(opt.variants) == 2


class Dynamic(nn.Module):
    def forward(self, x):
        return torch.nn.functional.gelu(x) * 2


def test_dynamic_batch_where_the_graph_keeps_it():
    cap = capture(Dynamic(), (torch.randn(3, 5),))
    assert cap.dynamic_batch and not cap.notes
    assert not any(n.meta.get("unbacked_bindings") for n in cap.graph_module.graph.nodes)


class ValueBranch(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_export_failure_is_one_line_naming_the_model():
    with pytest.raises(CaptureError) as e:
        capture(ValueBranch(), (torch.randn(2, 3),), dynamic_batch=False)
    assert "\n" not in str(e.value) and "ValueBranch" in str(e.value)


def test_any_failure_after_the_export_is_one_capture_error(monkeypatch):
    def broken(gm, flat_inputs):
        raise RuntimeError("recorder broke\nsecond line")

    monkeypatch.setattr(capture_module, "_record_data_dependent_sizes", broken)
    with pytest.raises(CaptureError) as e:
        capture(Dynamic(), (torch.randn(3, 5),))
    msg = str(e.value)
    assert "\n" not in msg and "Dynamic" in msg and "recorder broke" in msg


def test_an_example_batch_of_0_is_refused_in_one_line():
    with pytest.raises(CaptureError) as e:
        capture(Dynamic(), (torch.randn(0, 5),))
    msg = str(e.value)
    assert "\n" not in msg and "batch of 0" in msg and "at least one sample" in msg


class ChecksItsInput(nn.Module):
    """A model that checks its input size as timm's patch embedding does, then computes on it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        assert x.shape[-2] == 6, f"Input height ({x.shape[-2]}) doesn't match model (6)."
        return self.proj(x)


@pytest.mark.parametrize("shape, words", [
    ((2, 7, 8), ["AssertionError", "Input height (7) doesn't match model (6)"]),  # the model's own assertion
    ((2, 6, 5), ["RuntimeError", "shapes cannot be multiplied"]),  # a shape error in its computation
])
def test_the_models_own_failure_on_the_example_is_the_cause(shape, words):
    with pytest.raises(CaptureError) as e:
        capture(ChecksItsInput(), (torch.randn(*shape),))
    msg = str(e.value)
    assert "\n" not in msg and "ChecksItsInput fails on the example inputs" in msg and all(w in msg for w in words)
    assert "control flow" not in msg  # torch.export's advice is not the cause here


def test_control_flow_on_values_still_gets_the_advice():
    with pytest.raises(CaptureError) as e:
        capture(ValueBranch(), (torch.randn(2, 3),))
    assert "control flow" in str(e.value) and "fails on the example" not in str(e.value)


def test_a_training_models_buffers_survive_the_failure_check():
    class Normed(ChecksItsInput):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(7)

        def forward(self, x):
            return super().forward(self.norm(x))

    model = Normed().train()
    before = model.norm.running_mean.clone()
    with pytest.raises(CaptureError, match="doesn't match model"):
        capture(model, (torch.randn(2, 7, 8),))
    assert torch.equal(model.norm.running_mean, before)
