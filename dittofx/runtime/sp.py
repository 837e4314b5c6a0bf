"""Sequence parallelism at run time: the collectives a `SequenceParallel` graph calls, what they
moved, and a launcher that starts the processes.

Each rank runs the same rewritten graph on its own chunk of the tokens. The graph calls plain Python
functions of this module (call_function nodes, so the graph stays readable and fx-traceable):

    local_slice(x, ctx, dim, segments)       this rank's chunk of a replicated tensor (no communication)
    gather(x, ctx, dim, segments)            every rank's chunk, in the global token order (all_gather)
    seq_to_heads(x, ctx, segments)           Ulysses: (B, H, N_local, d) -> (B, H/W, N, d) (all_to_all)
    qkv_to_heads(q, k, v, ctx, segments)     the same for queries, keys and values in one all_to_all
    heads_to_seq(x, ctx, segments)           its inverse, after the attention (all_to_all)

`segments` describe the split axis as a concatenation of segments (outer, n, inner), each of global
size outer * n * inner with its `n` factor cut between the ranks as `torch.tensor_split` cuts n (189
tokens on 2 ranks: 95 + 94); a joint text + video axis is two segments, each rank holding its chunk of
each. `ctx` is the number of a `Context` (process group, rank, world size, `CommStats`) registered
here, so the graph holds no process group. On fake tensors (shape propagation, torch.export of the
graph) the functions compute shapes only and communicate nothing.

Every collective records (kind, bytes this rank sent to the others) in its context's `CommStats`,
per forward call (`stats.calls`, `stats.last`) and in total (`stats.total`).

`launch(fn, nproc, *args)` runs fn(rank, world, *args) in `nproc` processes (spawn) over gloo on a
free localhost port, one thread each, and returns the ranks' return values. NCCL on GPUs is the same
code: `torch.distributed.init_process_group("nccl")` with one device per rank (torchrun).
"""

from __future__ import annotations

import datetime
import itertools
import os
import pickle
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dittofx.rewriter.shard import Segments, chunk, chunk_start, global_size, local_size

# ---------------------------------------------------------------------------------------------
# contexts and counters


@dataclass
class CommStats:
    """What the collectives of one SP graph moved: per forward call and in total, (calls, bytes
    sent by this rank to the others) per kind (all_to_all, all_gather); and per call the wall time
    spent inside them (waiting for the other ranks included)."""

    calls: list[dict[str, list[int]]] = field(default_factory=list)  # one dict per forward call
    total: dict[str, list[int]] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)  # per forward call: wall time inside the collectives

    def begin(self) -> None:
        self.calls.append({})
        self.seconds.append(0.0)

    def record(self, kind: str, nbytes: int, seconds: float = 0.0) -> None:
        if not self.calls:
            self.begin()
        for d in (self.calls[-1], self.total):
            entry = d.setdefault(kind, [0, 0])
            entry[0] += 1
            entry[1] += int(nbytes)
        self.seconds[-1] += seconds

    @property
    def last(self) -> dict[str, list[int]]:
        return self.calls[-1] if self.calls else {}

    def mean(self, start: int = -1) -> dict:
        """Per forward call, averaged over the calls from `start` on (a loop's: -steps): collectives,
        bytes sent, milliseconds inside the collectives, and [collectives, bytes] per kind."""
        calls, seconds = self.calls[start:], self.seconds[start:]
        n = max(len(calls), 1)
        kinds = sorted({k for c in calls for k in c})
        by_kind = {k: [sum(c.get(k, [0, 0])[i] for c in calls) / n for i in (0, 1)] for k in kinds}
        return {"calls_per_call": sum(v[0] for v in by_kind.values()),
                "bytes_per_call": sum(v[1] for v in by_kind.values()),
                "ms_per_call": sum(seconds) / n * 1e3, "by_kind": by_kind}

    def reset(self) -> None:
        self.calls.clear()
        self.total.clear()
        self.seconds.clear()

    @staticmethod
    def describe(d: dict[str, list[int]]) -> str:
        if not d:
            return "no collectives"
        return ", ".join(f"{n} {kind} ({b / 1024:.1f} KiB)" for kind, (n, b) in sorted(d.items()))

    def __str__(self) -> str:
        n = len(self.calls)
        if not n:
            return "no call yet"
        return f"last call {self.describe(self.last)}; {n} calls: {self.describe(self.total)}"


@dataclass
class Context:
    group: object  # a torch.distributed ProcessGroup, or None for the default group
    rank: int
    world: int
    stats: CommStats = field(default_factory=CommStats)


_CONTEXTS: dict[int, Context] = {}
_ids = itertools.count()


def register(group, rank: int, world: int, stats: CommStats | None = None) -> int:
    """A context for one rewritten graph; `stats`: counters it shares (every graph of one pass object,
    i.e. every input form of one optimized model, counts into the same)."""
    key = next(_ids)
    _CONTEXTS[key] = Context(group, rank, world, stats if stats is not None else CommStats())
    return key


def context(key: int) -> Context:
    return _CONTEXTS[key]


def _fake(x: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor) or x.device.type == "meta"


def _bytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


# ---------------------------------------------------------------------------------------------
# the functions the graph calls


def _segment_view(x: torch.Tensor, dim: int, start: int, seg: tuple[int, int, int], size: int) -> torch.Tensor:
    """Positions [start, start + size) of `x` along `dim`, as (..., outer, n_part, inner, ...)."""
    outer, _, inner = seg
    part = x.narrow(dim, start, size)
    return part.reshape(*part.shape[:dim], outer, size // (outer * inner), inner, *part.shape[dim + 1:])


def _chunk_of(x: torch.Tensor, dim: int, segments: Segments, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s chunk of a whole axis `dim` laid out as `segments`."""
    pieces, start = [], 0
    for seg in segments:
        outer, n, inner = seg
        size = outer * n * inner
        v = _segment_view(x, dim, start, seg, size).narrow(dim + 1, chunk_start(n, rank, world), chunk(n, rank, world))
        pieces.append(v.reshape(*x.shape[:dim], -1, *x.shape[dim + 1:]))
        start += size
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def _assemble(parts: list[torch.Tensor], dim: int, segments: Segments, world: int) -> torch.Tensor:
    """The whole axis `dim`, in the global order, from every rank's chunk (parts[r] is rank r's)."""
    starts = [0] * world
    result = []
    for seg in segments:
        outer, n, inner = seg
        pieces = []
        for r, p in enumerate(parts):
            size = outer * chunk(n, r, world) * inner
            pieces.append(_segment_view(p, dim, starts[r], seg, size))
            starts[r] += size
        joined = torch.cat(pieces, dim + 1)  # the ranks' pieces side by side along the n factor
        result.append(joined.reshape(*joined.shape[:dim], -1, *joined.shape[dim + 3:]))
    return result[0] if len(result) == 1 else torch.cat(result, dim)


def local_slice(x: torch.Tensor, ctx: int, dim: int, segments: Segments, begin: bool = False) -> torch.Tensor:
    """This rank's chunk of a replicated tensor whose axis `dim` is laid out as `segments`. `begin`:
    this is where a forward call's tokens are split (the counters start a new call)."""
    c = context(ctx)
    if begin and not _fake(x):
        c.stats.begin()
    return _chunk_of(x, dim, segments, c.rank, c.world)


def gather(x: torch.Tensor, ctx: int, dim: int, segments: Segments) -> torch.Tensor:
    """The whole axis `dim` in the global order from every rank's chunk (all_gather; chunks padded
    to the largest where they differ)."""
    c = context(ctx)
    shape = list(x.shape)
    shape[dim] = global_size(segments)
    if _fake(x):
        return x.new_empty(shape)
    x = x.contiguous()
    sizes = [local_size(segments, r, c.world) for r in range(c.world)]
    most = max(sizes)
    padded = x
    if x.shape[dim] < most:
        pad = list(x.shape)
        pad[dim] = most - x.shape[dim]
        padded = torch.cat([x, x.new_zeros(pad)], dim)
    bufs = [torch.empty_like(padded) for _ in range(c.world)]
    start = time.perf_counter()
    dist.all_gather(bufs, padded.contiguous(), group=c.group)
    c.stats.record("all_gather", _bytes(padded) * (c.world - 1), time.perf_counter() - start)
    return _assemble([b.narrow(dim, 0, s) for b, s in zip(bufs, sizes)], dim, segments, c.world)


def _all_to_all(c: Context, send: list[torch.Tensor], recv_shapes: list[tuple], like: torch.Tensor) -> list:
    """Send send[j] to rank j and receive from rank i a tensor of recv_shapes[i] (one all_to_all_single
    over flat buffers, uneven sizes allowed)."""
    flat_in = torch.cat([s.reshape(-1) for s in send])
    out_sizes = [int(torch.Size(s).numel()) for s in recv_shapes]
    flat_out = like.new_empty(sum(out_sizes))
    start = time.perf_counter()
    dist.all_to_all_single(flat_out, flat_in, output_split_sizes=out_sizes,
                           input_split_sizes=[s.numel() for s in send], group=c.group)
    c.stats.record("all_to_all", sum(_bytes(s) for j, s in enumerate(send) if j != c.rank),
                   time.perf_counter() - start)
    return [p.reshape(s) for p, s in zip(flat_out.split(out_sizes), recv_shapes)]


def _to_heads(xs: tuple[torch.Tensor, ...], ctx: int, segments: Segments) -> torch.Tensor:
    """Tensors of one shape (B, H, N_local, d), split along tokens, in one all_to_all:
    (len(xs), B, H/W, N, d) split along heads, the tokens in their global order."""
    c = context(ctx)
    b, h, _, d = xs[0].shape
    hw = h // c.world
    if _fake(xs[0]):
        return xs[0].new_empty((len(xs), b, hw, global_size(segments), d))
    sizes = [local_size(segments, r, c.world) for r in range(c.world)]
    send = [torch.stack([x.narrow(1, j * hw, hw) for x in xs]) for j in range(c.world)]
    got = _all_to_all(c, send, [(len(xs), b, hw, n, d) for n in sizes], xs[0])
    return _assemble(got, 3, segments, c.world)


def seq_to_heads(x: torch.Tensor, ctx: int, segments: Segments) -> torch.Tensor:
    """Ulysses, before attention: (B, H, N_local, d) split along tokens -> (B, H/W, N, d) split along
    heads, the tokens in their global order (the attention then sums over keys in the same order as
    one process does)."""
    return _to_heads((x,), ctx, segments)[0]


def qkv_to_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int, segments: Segments) -> torch.Tensor:
    """`seq_to_heads` of queries, keys and values of one shape in one all_to_all: (3, B, H/W, N, d).
    The same bytes as three; one collective's latency instead of three."""
    return _to_heads((q, k, v), ctx, segments)


def heads_to_seq(x: torch.Tensor, ctx: int, segments: Segments) -> torch.Tensor:
    """Ulysses, after attention: (B, H/W, N, d) in the global order -> (B, H, N_local, d)."""
    c = context(ctx)
    b, hw, _, d = x.shape
    mine = local_size(segments, c.rank, c.world)
    if _fake(x):
        return x.new_empty((b, hw * c.world, mine, d))
    send = [_chunk_of(x, 2, segments, r, c.world).contiguous() for r in range(c.world)]
    got = _all_to_all(c, send, [(b, hw, mine, d)] * c.world, x)
    return torch.cat(got, 1)


COLLECTIVES = (gather, seq_to_heads, qkv_to_heads, heads_to_seq)


class SPGraph(torch.nn.Module):
    """Held by a sequence-parallel graph as `gm.sp`: its process group, rank, world size and
    communication counters (`stats`); it marks the graph as not exportable to one ONNX model."""

    not_exportable = ("sp: a sequence-parallel model calls torch.distributed collectives between its ranks, which "
                      "an ONNX model cannot hold: export the model without the sp pass")

    def __init__(self, ctx: int, method: str):
        super().__init__()
        self.ctx, self.method = ctx, method

    @property
    def context(self) -> Context:
        return context(self.ctx)

    @property
    def stats(self) -> CommStats:
        return self.context.stats

    def extra_repr(self) -> str:
        c = self.context
        return f"rank={c.rank}, world={c.world}, method={self.method!r}"


# ---------------------------------------------------------------------------------------------
# the launcher


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn, world: int, port: int, out_dir: str, timeout: float, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    def failed(e: BaseException) -> None:  # written before the group goes: the first failure is the first file
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
    except BaseException as e:
        failed(e)
        raise
    try:
        value = fn(rank, world, *args)
    except BaseException as e:
        failed(e)
        raise
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.pt"), "wb") as f:
        torch.save(value, f, pickle_module=pickle)


class LaunchError(RuntimeError):
    """A rank failed: its exception's type and message (and traceback in `details`)."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def launch(fn, nproc: int, *args, timeout: float = 300.0) -> list:
    """Run fn(rank, nproc, *args) in `nproc` processes (torch.multiprocessing, spawn) joined by a gloo
    process group on a free localhost port, one thread each; the ranks' return values, in rank order.
    `fn` must be importable by the child processes (a module-level function). A rank that fails makes
    the others stop (its exception is raised here as LaunchError with its message); `timeout` bounds
    the group's set-up and every collective, so a rank waiting for a failed one does not hang."""
    import torch.multiprocessing as mp

    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"launch: nproc must be a positive integer, got {nproc!r}")
    with tempfile.TemporaryDirectory(prefix="dittofx-sp-") as out_dir:
        try:
            mp.start_processes(_worker, args=(fn, nproc, free_port(), out_dir, timeout, args), nprocs=nproc,
                               join=True, start_method="spawn")
        except Exception as e:  # the first rank's own message, not the spawn wrapper's
            errors = sorted((f for f in os.listdir(out_dir) if f.endswith(".err")),
                            key=lambda f: os.stat(os.path.join(out_dir, f)).st_mtime_ns)
            if errors:
                with open(os.path.join(out_dir, errors[0])) as f:
                    text = f.read()
                rank = errors[0].split(".")[0]
                raise LaunchError(f"rank {rank}: {text.splitlines()[0]}", text) from None
            raise LaunchError(f"a rank failed: {e}") from e
        values = []
        for rank in range(nproc):
            with open(os.path.join(out_dir, f"{rank}.pt"), "rb") as f:
                values.append(torch.load(f, weights_only=False))
        return values
