"""Sequence parallelism (issue 16): 2 processes over gloo compute what one process computes.

Each test launches 2 ranks (`dittofx.runtime.sp.launch`); every rank builds the same model (same
seed), runs the 30-step DDIM loop alone (the reference, no sp) and split (["sp"], ["sp", "pab"]), and
returns its figures; the reference for ["sp", "pab"] is the single-process ["pab"] model. The workers
are module-level functions: the spawned ranks import them from here.
"""

import pytest
import torch

import dittofx
from dittofx.errors import PassSpecError
from dittofx.models import zoo
from dittofx.runtime import sp as rt
from tests.passes.pab.test_pab import denoise, rel

TOLERANCE = 1e-5


def _optimize(zm, passes, **kw):
    return dittofx.optimize(zm.model, passes, zm.example_inputs, zm.example_kwargs, **kw)


def _collectives(gm) -> tuple[int, int]:
    """(collective calls in the main graph, in PAB's site graphs)."""
    def count(g):
        return sum(n.op == "call_function" and n.target in rt.COLLECTIVES for n in g.graph.nodes)
    return count(gm), sum(count(s.attention) for s in gm.pab.sites)


def _per_call(stats: rt.CommStats) -> list[tuple[int, int]]:
    """(collective calls, bytes sent) per forward call of the 30-step loop (the calls before it: the
    check of a graph built for the loop's input form, on its first call)."""
    return [(sum(n for n, _ in c.values()), sum(b for _, b in c.values())) for c in stats.calls[-30:]]


def loop_worker(rank, world, name, method="ulysses"):
    """The figures of one model on this rank: max relative differences and collectives per call."""
    zm = zoo.build(name)
    ref = denoise(zm.model, zm)
    sp = _optimize(zm, [dittofx.SequenceParallel(method=method)])
    stats = sp.comm_stats
    stats.reset()
    got = denoise(sp, zm)
    figures = {"sp": rel(got, ref), "sp_calls": _per_call(stats), "notes": list(sp.report.notes),
               "kinds": {k: v[0] for k, v in stats.calls[-1].items()}}
    pab_ref = denoise(_optimize(zm, ["pab"]), zm)
    both = _optimize(zm, ["pab", dittofx.SequenceParallel(method=method)])  # run as sp, pab (the report says)
    stats = both.comm_stats
    stats.reset()
    got = denoise(both, zm)
    figures.update(sp_pab=rel(got, pab_ref), sp_pab_calls=_per_call(stats),
                   collectives=_collectives(both.graph_module), pab_changes=rel(pab_ref, ref),
                   report_stats=str(both.report))
    return figures


def odd_worker(rank, world):
    """63 tokens (7x9 patches) on 2 ranks: Latte as zoo (2 heads: Ulysses) and with 3 heads (all-gather)."""
    from diffusers import LatteTransformer3DModel

    out = {}
    for heads in (2, 3):
        zm = zoo.build("latte")
        if heads == 3:
            torch.manual_seed(0)
            zm.model = LatteTransformer3DModel(num_attention_heads=3, attention_head_dim=16, in_channels=4,
                                               out_channels=8, num_layers=2, sample_size=16, patch_size=2,
                                               cross_attention_dim=48, caption_channels=24, video_length=4).eval()
            zm.example_kwargs = dict(zm.example_kwargs)
        gen = torch.Generator().manual_seed(3)
        zm.example_inputs = (torch.randn(2, 4, 4, 14, 18, generator=gen),)
        ref = denoise(zm.model, zm, steps=8)
        opt = _optimize(zm, ["sp"])
        out[heads] = (rel(denoise(opt, zm, steps=8), ref), list(opt.report.notes))
        if heads == 2:  # and with PAB: the caches of uneven chunks
            both, pab = _optimize(zm, ["sp", "pab"]), _optimize(zm, ["pab"])
            out["pab"] = rel(denoise(both, zm, steps=8), denoise(pab, zm, steps=8))
    out["export"] = _export_refused(zm, opt)
    return out


def _export_refused(zm, opt):
    import tempfile

    from dittofx.errors import ExportError

    try:
        with tempfile.TemporaryDirectory() as d:
            dittofx.export_onnx(opt, f"{d}/x.onnx", example_inputs=zm.example_inputs)
    except ExportError as e:
        return str(e)
    return None


ZOO = ("dit", "pixart", "cogvideox5b", "cogvideox15", "hunyuanvideo", "mochi", "ltx_video", "allegro", "flux", "sd3",
       "easyanimate", "vit", "hf_vit", "videomae")


def forward_worker(rank, world, names):
    """One forward of each model, split and alone: max relative difference and the sp notes."""
    from dittofx import signature

    out = {}
    for name in names:
        zm = zoo.build(name)
        with torch.no_grad():
            ref = signature.tensor_leaves(zm.model(*zm.example_inputs, **zm.example_kwargs))[0][1]
            opt = _optimize(zm, ["sp"])
            got = signature.tensor_leaves(opt(*zm.example_inputs, **zm.example_kwargs))[0][1]
        out[name] = (rel(got, ref), [n for n in opt.report.notes if n.startswith("sp")])
    return out


def peer_worker(rank, world):
    """diffusers' own context parallelism (Ulysses, `enable_parallelism`) on the same Wan weights, and
    dittofx's sp: both equal one process over an 8-step loop; what each sends per step."""
    import copy

    from diffusers import ContextParallelConfig

    zm = zoo.build("wan")
    ref = denoise(zm.model, zm, steps=8)
    ours = _optimize(zm, ["sp"])
    ours.comm_stats.reset()
    got = denoise(ours, zm, steps=8)
    sent = []  # (kind, bytes this rank sends), counted as runtime/sp.py counts its own
    import torch.distributed._functional_collectives as funcol

    real = funcol.all_to_all_single, funcol.all_gather_tensor
    torch.accelerator.device_count = lambda: 1  # diffusers picks rank % device_count(): 0 without a GPU
    peer = copy.deepcopy(zm.model)
    peer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))

    def call(*args, **kwargs):
        return peer(*args, **kwargs, return_dict=False)

    def a2a(x, *a, **k):  # even splits in this model: (world - 1) / world of x leaves the rank
        sent.append(("all_to_all", x.numel() * x.element_size() * (world - 1) // world))
        return real[0](x, *a, **k)

    def gather(x, *a, **k):
        sent.append(("all_gather", x.numel() * x.element_size() * (world - 1)))
        return real[1](x, *a, **k)

    funcol.all_to_all_single, funcol.all_gather_tensor = a2a, gather  # what diffusers' attention and hooks call
    try:
        theirs = denoise(call, zm, steps=8)
    finally:
        funcol.all_to_all_single, funcol.all_gather_tensor = real
    per_step = {k: sum(b for kind, b in sent if kind == k) // 8 for k in ("all_to_all", "all_gather")}
    ours_per_step = {k: sum(c.get(k, [0, 0])[1] for c in ours.comm_stats.calls[-8:]) // 8
                     for k in ("all_to_all", "all_gather")}
    return {"ours": rel(got, ref), "theirs": rel(theirs, ref), "between": rel(got, theirs),
            "their_bytes": per_step, "our_bytes": ours_per_step}


def failing_worker(rank, world):
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    torch.distributed.barrier()  # rank 0 waits for a rank that is gone: launch must not hang
    return rank


def _check_loop(results, name):
    for r in results:
        assert r["sp"] <= TOLERANCE, (name, r["sp"])
        assert r["sp_pab"] <= TOLERANCE, (name, r["sp_pab"])
        assert r["pab_changes"] > 1e-3  # PAB did broadcast: the comparison is not trivial
        main, in_sites = r["collectives"]
        assert main == 1 and in_sites > 0  # the attentions' collectives moved into PAB's sites with them
        full = r["sp_calls"][0]
        assert all(c == full for c in r["sp_calls"])  # without PAB every step communicates alike
        calls = r["sp_pab_calls"]
        assert len(calls) == 30 and calls[0] == full
        assert min(calls) < full  # a broadcast step makes fewer collectives, and moves fewer bytes
        fewest = min(calls)
        assert fewest[1] < full[1]
        assert "\nsp: last call " in r["report_stats"]  # the report shows the counters
        assert "passes run as sp, pab (given as pab, sp)" in r["report_stats"]
    assert results[0]["sp_pab_calls"] == results[1]["sp_pab_calls"]  # every rank makes the same collectives


@pytest.mark.parametrize("name", ["latte", "cogvideox", "wan"])
def test_loop_equals_one_process(name):
    results = rt.launch(loop_worker, 2, name)
    _check_loop(results, name)
    kinds = results[0]["kinds"]
    assert kinds.get("all_to_all", 0) > 0  # Ulysses: 2 heads on 2 ranks
    assert kinds.get("all_gather", 0) == 1  # only the output (the unpatchify) gathers


@pytest.mark.slow
def test_allgather_method_on_joint_attention():
    results = rt.launch(loop_worker, 2, "cogvideox", "allgather")
    _check_loop(results, "cogvideox")
    assert "all_to_all" not in results[0]["kinds"]


def test_uneven_split_heads_not_dividing_and_export():
    results = rt.launch(odd_worker, 2)
    for r in results:
        assert r["export"].startswith("sp: ") and "\n" not in r["export"]  # export_onnx refuses in one line
        for heads in (2, 3):
            assert r[heads][0] <= TOLERANCE, (heads, r[heads][0])
        assert r["pab"] <= TOLERANCE
        assert any("63 tokens split over 2 ranks" in n for n in r[2][1])
        assert any("2 ulysses" in n for n in r[2][1])
        assert any("0 ulysses, 2 all-gather" in n for n in r[3][1])  # 3 heads on 2 ranks
    assert {n for n in results[0][2][1] if "this rank" in n} != {n for n in results[1][2][1] if "this rank" in n}


@pytest.mark.slow
def test_every_zoo_model_forward():
    """The rest of the zoo, one forward each: rotary tables, text masks, class tokens, packed latents."""
    for rank_result in rt.launch(forward_worker, 2, ZOO, timeout=900):
        for name, (diff, notes) in rank_result.items():
            assert diff <= TOLERANCE, (name, diff, notes)
            assert any("tokens split over 2 ranks" in n for n in notes), name


def test_diffusers_context_parallelism_side_by_side():
    """The peer on gloo: diffusers' Ulysses on the same Wan gives the same output, and moves what sp moves."""
    for r in rt.launch(peer_worker, 2):
        assert r["ours"] <= TOLERANCE and r["theirs"] <= TOLERANCE and r["between"] <= TOLERANCE, r
        assert r["our_bytes"] == r["their_bytes"] and r["our_bytes"]["all_to_all"] > 0, r


def test_a_failing_rank_does_not_hang():
    with pytest.raises(rt.LaunchError, match="rank 1: ValueError: rank one fails on purpose"):
        rt.launch(failing_worker, 2, timeout=20)


def test_no_process_group_is_one_line():
    zm = zoo.build("latte")
    with pytest.raises(PassSpecError) as e:
        _optimize(zm, ["sp"])
    text = str(e.value)
    assert "\n" not in text and "process group" in text and "init_process_group" in text and "launch" in text


def test_spec_and_order():
    assert dittofx.SequenceParallel().spec() == "sp:method='ulysses'"
    with pytest.raises(PassSpecError, match="method must be one of ulysses, allgather"):
        dittofx.SequenceParallel(method="ring")
    zm = zoo.build("latte")
    with pytest.raises(PassSpecError, match="sp cannot be given with tome"):
        _optimize(zm, ["pab", "tome:ratio=0.5", "sp"])
    with pytest.raises(PassSpecError, match="sp with compile=True is not supported yet"):
        _optimize(zm, ["sp"], compile=True)


# ---------------------------------------------------------------------------------------------
# the layout arithmetic, in one process


@pytest.mark.parametrize("segments", [((1, 7, 1),), ((1, 6, 1), (1, 11, 1)), ((2, 5, 3),), ((3, 4, 1), (1, 5, 2))])
@pytest.mark.parametrize("world", [2, 3])
def test_chunks_reassemble_in_global_order(segments, world):
    """Every rank's chunk (rt._chunk_of, what local_slice cuts), put back by rt._assemble (what gather and
    Ulysses do after communicating), is the whole tensor; chunk sizes are torch.tensor_split's."""
    total = rt.global_size(segments)
    x = torch.arange(2 * total * 3).reshape(2, total, 3)
    parts = [rt._chunk_of(x, 1, segments, r, world) for r in range(world)]
    assert [p.shape[1] for p in parts] == [rt.local_size(segments, r, world) for r in range(world)]
    torch.testing.assert_close(rt._assemble(parts, 1, segments, world), x, rtol=0, atol=0)
    n = segments[0][1]
    assert [rt.chunk(n, r, world) for r in range(world)] == [len(c) for c in torch.arange(n).tensor_split(world)]


def test_split_follows_views():
    from dittofx.rewriter.shard import Split, fix_sizes, map_split

    tokens = Split(1, ((1, 64, 1),))
    # Latte: (B*F, hw, C) -> (B, F, hw, C) -> permute -> (B*hw, F, C): the tokens inside the batch axis
    assert map_split(tokens, (8, 64, 32), (2, 4, 64, 32)) == Split(2, ((1, 64, 1),))
    assert map_split(Split(1, ((1, 64, 1),)), (2, 64, 4, 32), (128, 4, 32)) == Split(0, ((2, 64, 1),))
    assert map_split(Split(0, ((2, 64, 1),)), (128, 4, 32), (2, 64, 4, 32)) == Split(1, ((1, 64, 1),))
    # an unpatchify cuts the token axis into rows and columns: not a split of one axis any more
    assert map_split(tokens, (8, 64, 32), (8, 8, 8, 32)) is None
    # a joint [text, video] axis kept whole through a head split
    joint = Split(1, ((1, 6, 1), (1, 192, 1)))
    assert map_split(joint, (2, 198, 32), (2, 198, 2, 16)) == joint
    # sizes: the token entry becomes -1; where another entry is -1 already, that one gets its size
    assert fix_sizes([2, 64, 32], 1, [2, 64, 32], 32) == [2, -1, 32]
    assert fix_sizes(["B", -1, 64, 32], 2, [None, 4, 64, 32], 32) == ["B", 4, -1, 32]
    assert fix_sizes([-1, 4, 64], 2, [None, 4, 64], 32) == [-1, 4, 32]
    assert fix_sizes([-1, 4, "n"], 2, [None, 4, 64], 32) is None
