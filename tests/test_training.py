"""Training through an optimized module: `opt.train()` runs a graph captured in train mode (dropout,
stochastic depth, batch-norm statistics as the original's), `opt.eval()` the inference graph; each is
captured once and reused, and gradients reach the original's parameters (shared, not copied)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import dittofx
from dittofx.errors import PassSpecError
from dittofx.models import zoo
from dittofx.passes import RLT, ToMe

timm = pytest.importorskip("timm")

try:
    from .passes.rlt.test_rlt import TS, P, clips, reference_keep, reference_lengths
    from .passes.tome import reference as ref
except ImportError:  # run as a plain file
    from passes.rlt.test_rlt import TS, P, clips, reference_keep, reference_lengths
    from passes.tome import reference as ref


def small_vit(drop: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
        drop_rate=drop, drop_path_rate=drop)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


def small_bn() -> nn.Module:
    torch.manual_seed(0)
    return ConvBN()


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    scale = max(a.abs().max().item(), 1e-12)
    assert (a - b).abs().max().item() <= rel * scale, f"{(a - b).abs().max().item()} > {rel} * {scale}"


def train_step(model, x, seed):
    """Output and every parameter's gradient of one seeded forward + backward; grads cleared after."""
    torch.manual_seed(seed)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    original = getattr(model, "original", model)  # an optimized module's parameters are the original's
    grads = {n: p.grad.clone() for n, p in original.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("make", [small_vit, small_bn], ids=["vit", "batchnorm"])
def test_train_mode_matches_original(make):
    model = make()
    twin = copy.deepcopy(model).train()
    opt = dittofx.optimize(model.eval(), [], (torch.randn(2, 3, 32, 32),))
    assert not opt.training
    opt.train()
    assert opt.training and model.training
    for seed in (1, 2):
        x = torch.randn(3, 3, 32, 32)
        got, got_grads = train_step(opt, x, seed)
        want, want_grads = train_step(twin, x, seed)
        assert_close(want, got, 1e-6)
        assert set(got_grads) == set(want_grads) == {n for n, _ in twin.named_parameters()}
        for name, g in want_grads.items():
            assert_close(g, got_grads[name], 1e-6)
        for (name, a), b in zip(twin.named_buffers(), model.buffers()):  # batch-norm statistics, updated alike
            assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7), name
    # the dropout draws matter: another seed gives another output (not a test that cannot fail)
    torch.manual_seed(3)
    other = opt(x)
    assert not torch.allclose(other, got)


@pytest.mark.parametrize("make", [small_vit, small_bn], ids=["vit", "batchnorm"])
def test_switching_modes_captures_once_each(make):
    model = make()
    twin = copy.deepcopy(model)
    opt = dittofx.optimize(model.eval(), [], (torch.randn(2, 3, 32, 32),))
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        opt.train()
        twin.train()
        torch.manual_seed(5)
        a = opt(x)
        torch.manual_seed(5)
        assert_close(twin(x), a, 1e-6)
        opt.eval()
        twin.eval()
        assert not model.training
        with torch.no_grad():
            assert_close(twin(x), opt(x), 1e-5)
    assert len(opt.variants) == 2
    assert sorted(v.for_training for v in opt.variants) == [False, True]


def test_capture_leaves_statistics_and_generator_alone():
    """The training capture and its check run the model: they must not move the BN statistics or the
    random generator (the first training call then draws what the original's would)."""
    model = small_bn()
    opt = dittofx.optimize(model.eval(), [], (torch.randn(2, 3, 32, 32),))
    before = [b.clone() for b in model.buffers()]
    torch.manual_seed(7)
    state = torch.get_rng_state()
    opt.train()
    opt._variant((torch.randn(2, 3, 32, 32),), {})  # captures the training graph
    torch.set_rng_state(state)  # the randn above drew from it
    for a, b in zip(before, model.buffers()):
        assert torch.equal(a, b)
    assert [v.for_training for v in opt.variants] == [False, True]


def test_sgd_over_opt_parameters_trains_the_original():
    model = small_vit()
    opt = dittofx.optimize(model.train(), [], (torch.randn(2, 3, 32, 32),))
    assert opt.training
    assert {id(p) for p in opt.parameters()} == {id(p) for p in model.parameters()}  # the original's, shared
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sgd = torch.optim.SGD(opt.parameters(), lr=0.1)
    torch.manual_seed(0)
    opt(torch.randn(3, 3, 32, 32)).sum().backward()
    sgd.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "head.weight" in changed and "blocks.0.attn.qkv.weight" in changed
    # the optimized module computes with the updated weights: eval output equals the original's
    opt.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(x), opt(x), 1e-5)


def test_tome_gradients_match_reference():
    """ToMe(r=2) in train mode (drop rates 0): output and gradients equal the plain-PyTorch reference's."""
    model = small_vit(drop=0.0)
    twin = copy.deepcopy(model).train()
    opt = dittofx.optimize(model.eval(), [ToMe(r=2)], (torch.randn(2, 3, 32, 32),))
    opt.train()
    x = torch.randn(3, 3, 32, 32)
    got, got_grads = train_step(opt, x, 0)
    reference = ref.timm_vit.__wrapped__  # the reference without its no_grad
    torch.manual_seed(0)
    y = reference(twin, x, [2, 2])
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    assert_close(y.detach(), got, 1e-5)
    for name, p in twin.named_parameters():
        if p.grad is not None:
            assert_close(p.grad, got_grads[name], 1e-5)
    assert set(got_grads) == {n for n, p in twin.named_parameters() if p.grad is not None}


def test_unsupported_pass_in_train_mode_is_refused():
    zm = zoo.build("cogvideox")
    opt = dittofx.optimize(zm.model.eval(), ["pab"], zm.example_inputs, zm.example_kwargs, check=False)
    with pytest.raises(PassSpecError, match="training with pab.* is not supported"):
        opt.train()
    assert not opt.training and not zm.model.training


def test_model_in_train_mode_with_an_inference_pass_is_optimized_for_inference(caplog):
    """A model built in code is in train mode; given with pab it gets the inference graph, said once."""
    zm = zoo.build("latte")
    zm.model.train()
    with caplog.at_level("WARNING", logger="dittofx"):
        opt = dittofx.optimize(zm.model, ["pab"], zm.example_inputs, zm.example_kwargs)
    assert not opt.training and zm.model.training
    assert any("is in train mode, but pab" in r.getMessage() and "model.eval()" in r.getMessage()
               for r in caplog.records)
    assert all(not v.for_training for v in opt.variants)
    with torch.no_grad():
        got = opt(*zm.example_inputs, **zm.example_kwargs)[0]
        want = zm.model.eval()(*zm.example_inputs, **zm.example_kwargs)[0]
    torch.testing.assert_close(got, want)  # PAB's first call computes every attention: the eval model's output


def test_tome_with_dropout_is_checked_and_seeded():
    """ToMe(r=2) in train mode with dropout and stochastic depth: the safety net (check=True) replays the
    generator for the graph, and a call's draws follow the seed."""
    model = small_vit(drop=0.1)
    opt = dittofx.optimize(model.eval(), [ToMe(r=2)], (torch.randn(2, 3, 32, 32),))
    opt.train()
    x = torch.randn(3, 3, 32, 32)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(opt(x))
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    outs[0].sum().backward()
    assert all(p.grad is not None for p in model.blocks.parameters())
    assert [v.for_training for v in opt.variants] == [False, True]
    assert opt.report.passes == ["tome:r=2"] and not opt.report.unchanged


# -- RLT ------------------------------------------------------------------------------------------


def videomae(dropout: float = 0.0) -> nn.Module:
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    torch.manual_seed(0)
    return VideoMAEForVideoClassification(VideoMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=P, num_frames=8, tubelet_size=TS, num_labels=5, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout))


def clip_loss(model, clip, keep, table, label):
    """Cross-entropy of one clip run alone on its kept tokens, plus the length table's rows (the
    paper's RLT, plain PyTorch, with gradients)."""
    emb = model.videomae.embeddings
    x = (emb.patch_embeddings(clip[None]) + emb.position_embeddings)[:, keep.flatten()]
    x = x + table[torch.tensor(reference_lengths(keep)) - 1]
    for layer in model.videomae.encoder.layer:
        x = layer(x)
    logits = model.classifier(model.fc_norm(x.mean(1)))
    return nn.functional.cross_entropy(logits, label[None], reduction="sum")


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_rlt_gradients_equal_each_clip_alone(layout):
    """Clips keeping 28, 16 and 64 tokens, packed (block-diagonal attention, per-clip pooling) or padded:
    the loss and every gradient, the length embedding's included, equal those of each clip run alone."""
    model = videomae()
    twin = copy.deepcopy(model).train()
    x = clips(["partial", "static", "noise"], seed=7)
    x[0, 4:] = x[0, 4:].flip(-1)  # a cut: runs of several lengths
    labels = torch.tensor([1, 3, 4])
    opt = dittofx.optimize(model.eval(), [RLT(length_embedding=True, layout=layout)], (x,)).train()
    table = opt.learned["rlt.length_embedding"]
    assert table.shape == (4, 32) and not table.any() and table.requires_grad  # zero-initialised
    assert any(p is table for p in opt.parameters())
    with torch.no_grad():
        table.copy_(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)))
    ref_table = table.detach().clone().requires_grad_()

    loss = nn.functional.cross_entropy(opt(x).logits, labels, reduction="sum")
    loss.backward()
    keeps = [reference_keep(c, TS, P, 0.1) for c in x]
    kept = [int(k.sum()) for k in keeps]
    assert kept == opt.report.stats["rlt"].kept and len(set(kept)) > 1
    want = sum(clip_loss(twin, c, k, ref_table, y) for c, k, y in zip(x, keeps, labels))
    want.backward()
    assert_close(want.detach(), loss.detach(), 1e-5)
    assert_close(ref_table.grad, table.grad, 1e-5)
    assert ref_table.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name, p in twin.named_parameters():
        if p.grad is not None:
            assert_close(p.grad, grads[name], 1e-5)
    assert set(grads) == {n for n, p in twin.named_parameters() if p.grad is not None}


def test_length_embedding_trains_saves_and_loads():
    """One embedding for every graph (the eval graph reads what training learned), in state_dict under
    `dittofx.rlt.length_embedding`, loaded back; an original's checkpoint leaves it as it is."""
    model = videomae()
    x = clips(["partial", "static"], seed=3)
    opt = dittofx.optimize(model.eval(), [RLT(length_embedding=True)], (x,)).train()
    adam = torch.optim.AdamW(opt.parameters(), lr=1e-2)
    for _ in range(2):
        nn.functional.cross_entropy(opt(x).logits, torch.tensor([0, 1])).backward()
        adam.step()
        adam.zero_grad()
    opt.eval()
    table = opt.learned["rlt.length_embedding"]
    assert table.abs().sum() > 0 and len(opt.variants) == 2
    assert all(v.gm.rlt.length_embedding is table for v in opt.variants)
    state = opt.state_dict()
    assert set(state) == set(model.state_dict()) | {"dittofx.rlt.length_embedding"}
    names = [n for n, _ in opt.named_parameters()]
    assert names == [n for n, _ in model.named_parameters()] + ["dittofx.rlt.length_embedding"]
    assert [id(p) for _, p in opt.named_parameters()] == [id(p) for p in opt.parameters()]
    with torch.no_grad():
        out = opt(x).logits

    fresh = dittofx.optimize(videomae().eval(), [RLT(length_embedding=True)], (x,))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.learned["rlt.length_embedding"], table)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, out)
    fresh.load_state_dict(videomae().state_dict())  # the original's checkpoint: the embedding stays
    assert torch.equal(fresh.learned["rlt.length_embedding"], table)
    holder = nn.Sequential(fresh)  # inside a parent module, under its prefix
    assert "0.dittofx.rlt.length_embedding" in holder.state_dict()
    holder.load_state_dict({**holder.state_dict(), "0.dittofx.rlt.length_embedding": torch.zeros(4, 32)})
    assert not fresh.learned["rlt.length_embedding"].any()


def test_rlt_with_dropout_is_checked_and_seeded():
    model = videomae(dropout=0.1)
    x = clips(["partial", "static", "noise"], seed=2)
    opt = dittofx.optimize(model.eval(), [RLT()], (x,)).train()
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(opt(x).logits)
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    outs[0].sum().backward()
    assert all(p.grad is not None for p in model.videomae.encoder.parameters())


# -- torch.compile ----------------------------------------------------------------------------------


def _compile_case(which):
    if which == "rlt":
        model, x = videomae(), clips(["partial", "static", "noise"], seed=2)
        opt = dittofx.optimize(model.eval(), [RLT(length_embedding=True)], (x,)).train()
        return opt, x, lambda out: out.logits
    model, x = small_vit(drop=0.0), torch.randn(3, 3, 32, 32)
    return dittofx.optimize(model.eval(), [ToMe(r=2)], (x,)).train(), x, lambda out: out


@pytest.mark.parametrize("which", ["rlt", pytest.param("tome", marks=pytest.mark.slow)])
def test_compiled_training_step_equals_eager(which):
    """dittofx.compile of a whole step (forward, cross-entropy, backward, AdamW): three steps' losses
    and the last step's gradients equal those of the same steps run eagerly (1e-5, 1e-4: AdamW's steps
    carry rounding where a gradient is ~0, as a key's bias's); once the training graph is
    captured (the first call), the one graph break is the step's own backward() call, none in the
    rewritten part (RLT's kept-token count included)."""
    import torch._dynamo as dynamo

    labels = torch.tensor([1, 3, 4])
    runs = []
    for compiled in (False, True):
        opt, x, logits = _compile_case(which)
        adam = torch.optim.AdamW(opt.parameters(), lr=1e-2)

        def step(x, labels):
            adam.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(logits(opt(x)), labels)
            loss.backward()
            adam.step()
            return loss.detach()

        dynamo.reset()
        run = dittofx.compile(step) if compiled else step
        losses = torch.stack([run(x, labels) for _ in range(3)])
        runs.append((losses, [p.grad for p in opt.parameters()]))
    (want, want_grads), (got, got_grads) = runs
    assert_close(want, got, 1e-5)
    assert want[-1] < want[0]
    for a, b in zip(want_grads, got_grads):
        assert_close(a, b, 1e-4)
    # where the step breaks, now that the training graph exists (the first call built it, eagerly)
    with dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        explained = dynamo.explain(step)(x, labels)
    frames = [f"{f.filename}:{f.lineno}" for b in explained.break_reasons for f in b.user_stack]
    assert any("backward" in str(b.reason) for b in explained.break_reasons)
    assert not [f for f in frames if os.sep + "dittofx" + os.sep in f or "eval_with_key" in f], frames
