"""``hierarchical`` all-reduce: exact inside a host, compressed only across hosts.

On ``N = H * L`` ranks (``H`` hosts, ``L`` ranks each; `commpress.topology`
learns which is which), an all-reduce of a flat tensor of ``S`` bytes runs in
three steps:

1. intra-host reduce-scatter, uncompressed, in the accumulation dtype
   (float32 for 16-bit inputs): local index ``l`` ends with the host's sum of
   shard ``l`` (``ceil(numel / L)`` elements; the last shard is zero-padded),
   added in local-rank order;
2. inter-host compressed all-reduce of shard ``l`` among the ``H`` ranks with
   local index ``l`` (one per host): `two_phase` on the inter-host subgroup
   (`direct` for summable codecs such as ``bf16``), through their public
   functions;
3. intra-host all-gather of the reduced shards, uncompressed.

Steps 1 and 3 are point-to-point sends and receives inside the host
(`_exchange`: each piece goes straight from the input and lands straight in
its place; the reduce-scatter sums the ``L`` pieces into the shard in one
pass). Measured on 2 emulated hosts x 2 ranks (64 MiB float32, 1 Gbit/s,
2 cores, quiet machine, one run each, 15:25 UTC 2026-12-02): 281 ms with
``all_to_all_single`` and its copies, 206 ms now (flat int8 252 ms).

Only step 2 crosses the slow level, and it carries compressed bytes: each
rank sends ``2 (H-1)/H * S / (L * ratio)`` bytes across hosts, so a host
sends ``2 (H-1)/H * S / ratio`` -- the ``1/L`` of flat `two_phase`, where a
host's ``L`` ranks each send ``(N-L)/N`` of their ``2 (N-1)/N * S / ratio``
bytes to other hosts. This is DeepSeek-V3's NVLink/IB split and ZeRO++'s qgZ.

Every rank ends bit-identical: step 2 gives the ``H`` owners of a shard the
same bits (the `two_phase` guarantee), step 3 copies bits, and ``AVG``
divides the same bits by ``N`` on each owner before step 3. Error: one
quantization of each host's partial sum on the way in plus one of the total
(`two_phase`'s), never of a single rank's input; the intra-host sums are
exact float32 additions.

A descriptor (`common.exchange`) over the whole group checks codec, op,
dtype, element count and algorithm before anything moves, so a rank that
runs another algorithm raises on every rank; the inner `two_phase` then
skips its own descriptor for codecs of fixed size.

``reduce`` runs the all-reduce and keeps the result on the root only (it
pays the all-gather the root does not need; the two-level tree is left for
when it matters). Error feedback (``comm.feedback``) applies to the shard
this rank sends across hosts: the residual is of the host's partial sum.

`cost` is the model `auto` can use; its docstring states the formula.

The same algorithm runs reduce-scatter and all-gather in two levels
(`commpress.algorithms.hierarchical_moves`): ``Policy(algorithm=
"hierarchical")`` selects them too, and they fall back to the flat
algorithms where the topology has one level.

Needs the same number of ranks on every host (`topology.of` raises
`ConfigError` otherwise). On one host (``H == 1``) it is a plain exact
all-reduce; with one rank per host (``L == 1``) it is `two_phase`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .. import topology
from . import direct, hierarchical_moves, two_phase
from .chunked import chunk_ranges, run_stages
from .common import Comm, acc_dtype, average, describe, reduce_into, wait_timed
from .hierarchical_moves import inter_comm
from .registry import Algorithm, CodecSpeed, Link, Stage, register_algorithm

__all__ = [
    "Hierarchical",
    "Prepared",
    "prepare",
    "all_reduce",
    "reduce",
    "cost",
    "PIPELINE_BYTES",
]

#: A call whose shards exceed this runs as a pipeline of chunks with shards of this size:
#: chunk k crosses hosts while chunk k+1's reduce-scatter and chunk k-1's all-gather run
#: inside the host. Calls through `commpress.distributed` arrive already cut into
#: ``Engine.chunk_bytes`` pieces (default 4 MiB), which run one after the other; under
#: ``Engine(chunk_bytes=0)`` the whole tensor arrives and this pipeline cuts it.
PIPELINE_BYTES = 4 << 20


@dataclasses.dataclass
class Prepared:
    """The input in the accumulation dtype; the first step is communication, so no encode."""

    x: torch.Tensor


def prepare(comm: Comm, flat: torch.Tensor) -> Prepared:
    """Local work only: the cast to the accumulation dtype (the encode comes after step 1)."""
    return Prepared(flat.to(acc_dtype(flat.dtype)))


def _inter_op(op: Any) -> Any:
    # AVG is applied once, by N, at the end; the levels sum.
    return dist.ReduceOp.SUM if op == dist.ReduceOp.AVG else op


def _inter_algorithm(comm: Comm, op: Any) -> Any:
    """Step 2's algorithm: `direct` for summable codecs under SUM/AVG, else `two_phase`."""
    if comm.codec.summable and op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
        return direct
    return two_phase


@dataclasses.dataclass
class _InFlight:
    """Intra-host point-to-point transfers posted asynchronously, and their buffers.

    ``parts[j]`` is local index ``j``'s piece (this rank's own piece is a view of its
    input, never copied); ``keep`` holds what must live until the transfers end.
    """

    works: list[Any]
    parts: list[torch.Tensor]
    keep: Any = None


def _exchange(
    comm: Comm,
    topo: topology.Topology,
    sends: Sequence[torch.Tensor],
    recvs: Sequence[torch.Tensor],
    tag: int,
) -> list[Any]:
    """Post ``sends[j]`` to / ``recvs[j]`` from local index ``j`` (this rank's own skipped).

    Point-to-point, not ``all_to_all_single``: no piece is copied into a send buffer
    (the all-gather sends one shard to every peer; an all-to-all would need it
    repeated) and none out of a receive buffer. Every rank posts in local-index
    order, sends first, one ``tag`` per step of a chunk.
    """
    me, works = topo.local_index, []
    with comm.rec.phase("transfer"):
        for j in range(topo.local_size):
            if j != me:
                works.append(dist.isend(sends[j], topo.intra_ranks[j], group=topo.intra, tag=tag))
        for j in range(topo.local_size):
            if j != me:
                works.append(dist.irecv(recvs[j], topo.intra_ranks[j], group=topo.intra, tag=tag))
    comm.rec.bytes_wire += sum(
        sends[j].numel() * sends[j].element_size() for j in range(topo.local_size) if j != me
    )
    return works


def _reduce_scatter_start(
    comm: Comm, topo: topology.Topology, chunk: torch.Tensor, shard_len: int, tag: int
) -> _InFlight:
    """Step 1 posted: piece ``j`` of the (zero-padded) chunk goes to local index ``j``."""
    send = chunk
    if shard_len * topo.local_size != chunk.numel() or not chunk.is_contiguous():
        send = torch.zeros(shard_len * topo.local_size, dtype=chunk.dtype, device=chunk.device)
        send[: chunk.numel()] = chunk
    pieces = list(send.split(shard_len))
    me = topo.local_index
    recv = torch.empty((topo.local_size - 1) * shard_len, dtype=send.dtype, device=send.device)
    got = iter(recv.split(shard_len))
    parts = [pieces[me] if j == me else next(got) for j in range(topo.local_size)]
    return _InFlight(_exchange(comm, topo, pieces, parts, tag), parts, send)


def _reduce_scatter_finish(comm: Comm, f: _InFlight, op: Any, slot: torch.Tensor) -> None:
    """The host's partial sum of this rank's shard, into ``slot``, in local-rank order."""
    for w in f.works:
        wait_timed(comm, w)
    op = _inter_op(op)
    parts = f.parts
    if op == dist.ReduceOp.SUM and slot.dtype.is_floating_point and len(parts) > 1:
        torch.add(parts[0], parts[1], out=slot)  # one pass: no copy of the first piece
        rest = parts[2:]
    else:
        slot.copy_(parts[0])
        rest = parts[1:]
    for p in rest:  # local-rank order: one owner per shard, deterministic
        reduce_into(slot, p, op)


def _all_gather_start(
    comm: Comm, topo: topology.Topology, shard: torch.Tensor, dest: torch.Tensor, tag: int
) -> _InFlight:
    """Step 3 posted: this rank's reduced shard to every local peer, theirs into ``dest``.

    ``dest`` is the chunk of the result; where the chunk was zero-padded the pieces
    land in a padded buffer that `_all_gather_finish` trims.
    """
    n, local = shard.numel(), topo.local_size
    buf = (
        dest
        if n * local == dest.numel()
        else torch.empty(n * local, dtype=dest.dtype, device=dest.device)
    )
    parts = list(buf.split(n))
    parts[topo.local_index].copy_(shard)
    works = _exchange(comm, topo, [shard] * local, parts, tag)
    return _InFlight(works, parts, (buf, dest, shard))


def _all_gather_finish(comm: Comm, f: _InFlight) -> None:
    for w in f.works:
        wait_timed(comm, w)
    buf, dest, _ = f.keep
    if buf is not dest:
        dest.copy_(buf[: dest.numel()])


def all_reduce(
    comm: Comm,
    flat: torch.Tensor,
    op: Any,
    prepared: Prepared | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce the 1-D ``flat`` over ``comm.group`` in three steps (module docstring).

    A tensor of more than `PIPELINE_BYTES` per shard is cut into chunks that
    flow through the three steps as a software pipeline: chunk ``k+1``'s intra-host
    reduce-scatter and chunk ``k-1``'s all-gather are in flight (posted
    asynchronously, in the same order on every rank) while chunk ``k`` crosses hosts.

    Args:
        comm: the call's context (its group is the whole group).
        flat: this rank's 1-D input.
        op: the reduce op (SUM/AVG compress; exact ops need a lossless codec).
        prepared: `prepare`'s output when it already ran.
        out: where to write the result (default: a new tensor).

    Returns:
        The result, 1-D, in the accumulation dtype, bit-identical on every rank.

    Raises:
        ConfigError: the hosts hold different numbers of ranks (on every rank).
        CollectiveError / CodecMismatchError: as `common.exchange`.
    """
    topo = _describe(comm, flat, op)
    x = (prepared or prepare(comm, flat)).x
    n = x.numel()
    per = max(PIPELINE_BYTES // x.element_size(), 1) * topo.local_size
    bounds = chunk_ranges(n, per) or [(0, 0)]
    comms = [
        comm
        if comm.key is None or len(bounds) == 1
        else dataclasses.replace(comm, key=(comm.key, k))
        for k in range(len(bounds))
    ]
    result = torch.empty(n, dtype=x.dtype, device=x.device) if out is None else out
    run_stages(len(bounds), _steps(topo, comms, x, op, bounds, result))
    return result


def stages(
    comms: Sequence[Comm],
    flat: torch.Tensor,
    op: Any,
    bounds: Sequence[tuple[int, int]],
    out: torch.Tensor,
) -> list[Stage]:
    """The three steps as the chunked driver's stages, one descriptor for the call.

    Chunk ``k+1``'s intra-host reduce-scatter and chunk ``k-1``'s all-gather are in
    flight while chunk ``k`` crosses hosts; the inner exchange of a variable-size
    codec runs per chunk on the inter-host subgroup.

    The driver's chunks (``Engine.chunk_bytes``) are merged ``L`` at a time (up to
    shards of `PIPELINE_BYTES`): each chunk is cut into ``L`` shards, and shards
    the size of the flat algorithms' chunks halve the rounds per call. Measured
    on 2 emulated hosts x 2 ranks, 64 MiB, 1 Gbit/s, 2 cores: 4 MiB chunks (2 MiB
    shards) 299 ms, 8 MiB chunks 238 ms in the same run. The stages of the merged
    chunks run at the driver's steps ``0 .. M-1``; the later steps are no-ops.
    """
    topo = _describe(comms[0], flat, op, chunk=bounds[0][1] - bounds[0][0])
    group = _merge_factor(topo, bounds, flat.element_size())
    if group == 1:
        return _steps(topo, comms, flat, op, bounds, out)
    merged = [
        (bounds[i][0], bounds[min(i + group, len(bounds)) - 1][1])
        for i in range(0, len(bounds), group)
    ]
    steps = _steps(topo, comms[::group], flat, op, merged, out)
    count = len(merged)

    def only_merged(fn: Any) -> Any:
        return lambda k, state: fn(k, state) if k < count else state

    return [(lag, only_merged(fn)) for lag, fn in steps]


def _merge_factor(topo: topology.Topology, bounds: Sequence[tuple[int, int]], itemsize: int) -> int:
    """How many of the driver's chunks make one chunk of shards up to `PIPELINE_BYTES`."""
    if topo.local_size == 1 or len(bounds) < 2:
        return 1
    chunk = max((bounds[0][1] - bounds[0][0]) * itemsize, 1)
    return max(1, min(topo.local_size, PIPELINE_BYTES * topo.local_size // chunk))


def _describe(comm: Comm, flat: torch.Tensor, op: Any, chunk: int = 0) -> topology.Topology:
    """The call's topology, after the descriptor check over the whole group."""
    # The descriptor first: `topology.of`'s first call is a collective that a rank on
    # another algorithm would not join (it would hang instead of raising).
    if comm.verify:
        describe(comm, Hierarchical.code, flat, [0] * comm.size, redop=op, chunk=chunk)
    return topology.of(comm.group, comm.device)


def _steps(
    topo: topology.Topology,
    comms: Sequence[Comm],
    x: torch.Tensor,
    op: Any,
    bounds: Sequence[tuple[int, int]],
    out: torch.Tensor,
) -> list[Stage]:
    """The three steps as stages; ``comms[k]`` is chunk ``k``'s context (key, stats).

    Chunk ``k``'s shard goes into slot ``k`` of one shard buffer, which step 2 reduces
    across hosts with the inner algorithm's own stages (`two_phase` / `direct`, fixed-
    size codecs): so chunk ``k`` crosses hosts while chunk ``k+1`` is reduce-scattered
    inside the host and chunk ``k-1`` is gathered, and the inter-host transfers of
    neighbouring chunks overlap too. A variable-size codec crosses one chunk at a
    time (its sizes need an exchange per chunk).
    """
    local, adt = topo.local_size, acc_dtype(x.dtype)
    lens = [math.ceil((b - a) / local) for a, b in bounds]
    if local == 1 and x.dtype == adt:
        # One rank per host: the shards are the input's chunks, reduced in place.
        shards, slots = x, list(bounds)
    else:
        ends = list(itertools.accumulate(lens))
        slots = [(e - n, e) for e, n in zip(ends, lens, strict=True)]
        shards = torch.empty(sum(lens), dtype=adt, device=x.device)
    inner = [inter_comm(c, topo) for c in comms]
    algo = _inter_algorithm(comms[0], op)

    def scatter(k: int, _: Any) -> _InFlight | None:
        if local == 1:
            return None
        a, b = bounds[k]
        return _reduce_scatter_start(comms[k], topo, x[a:b].to(adt), lens[k], 2 * k)

    def shard(k: int, posted: _InFlight | None) -> None:
        (a, b), (lo, hi) = bounds[k], slots[k]
        if posted is not None:
            _reduce_scatter_finish(comms[k], posted, op, shards[lo:hi])
        elif shards is not x:
            shards[lo:hi] = x[a:b]

    def cross(k: int, _: Any) -> None:
        lo, hi = slots[k]
        shards[lo:hi] = algo.all_reduce(inner[k], shards[lo:hi], _inter_op(op))

    crossing: list[Stage] = []
    if topo.hosts > 1:
        crossing = algo.stages(inner, shards, _inter_op(op), slots, shards) or [(0, cross)]
    last = 1 + max((lag for lag, _ in crossing), default=0)

    def gather(k: int, _: Any) -> _InFlight | None:
        (a, b), (lo, hi) = bounds[k], slots[k]
        # AVG divides the owner's bits by N once, after both levels summed.
        average(shards[lo:hi], op, comms[k].size)
        if local == 1:
            if out[a:b].data_ptr() != shards[lo:hi].data_ptr():
                out[a:b] = shards[lo:hi]
            return None
        return _all_gather_start(comms[k], topo, shards[lo:hi], out[a:b], 2 * k + 1)

    def land(k: int, posted: _InFlight | None) -> None:
        if posted is not None:
            _all_gather_finish(comms[k], posted)

    return [
        (0, scatter),
        (1, shard),
        *((1 + lag, fn) for lag, fn in crossing),
        (last, gather),
        (last + 1, land),
    ]


def reduce(
    comm: Comm, flat: torch.Tensor, op: Any, root: int, prepared: Prepared | None = None
) -> torch.Tensor | None:
    """`all_reduce`, the result returned on group rank ``root`` only (None elsewhere)."""
    out = all_reduce(comm, flat, op, prepared)
    return out if comm.rank == root else None


def cost(
    nbytes: int,
    *,
    hosts: int,
    local: int,
    ratio: float,
    intra_Bps: float,
    inter_Bps: float,
    encode_Bps: float,
    decode_Bps: float,
    intra_latency_s: float = 5e-6,
    inter_latency_s: float = 20e-6,
    pipelined: bool = True,
) -> float:
    """Modelled seconds of one hierarchical all-reduce of ``nbytes`` per rank.

    With ``S = nbytes``, ``H = hosts``, ``L = local``, ``r = ratio``::

        t_intra  = 2 (L-1)/L * S / intra_Bps  + 2 (L-1) * intra_latency_s
        t_wire   = 2 (H-1)/H * S / (L r) / inter_Bps + 2 * inter_latency_s
        t_codec  = S/L / encode_Bps + (2H-1)/H * S/L / decode_Bps
        t        = t_intra + (max(t_wire, t_codec) if pipelined else t_wire + t_codec)

    ``t_intra`` is the reduce-scatter plus the all-gather inside a host (ring
    cost, uncompressed); ``t_wire`` the compressed two-phase exchange of one
    shard across hosts; ``t_codec`` its codec work (encode the shard's pieces
    and the shard's sum: ``S/L`` bytes; decode ``H-1`` pieces and ``H``
    sums). ``inter_Bps`` is the *per-rank* share of the slow link: a host
    NIC of ``B`` shared by its ``L`` ranks gives ``B / L`` (the emulation);
    one NIC per GPU (H800 nodes) gives the NIC's rate. Bandwidths are bytes
    per second of payload, codec speeds bytes of input per second per rank.
    ``pipelined`` models overlap of wire and codec time (not measured here
    to be complete on CPU: the codec work and the intra-host copies compete for
    the same cores).

    Example::

        >>> round(cost(64 << 20, hosts=2, local=2, ratio=3.94, intra_Bps=2e9,
        ...            inter_Bps=62.5e6, encode_Bps=1e9, decode_Bps=1e9), 3)
        0.17
    """
    S, H, L = float(nbytes), hosts, local
    t_intra = 2 * (L - 1) / L * S / intra_Bps + 2 * (L - 1) * intra_latency_s
    if H == 1:
        return t_intra
    t_wire = 2 * (H - 1) / H * S / (L * ratio) / inter_Bps + 2 * inter_latency_s
    t_codec = S / L / encode_Bps + (2 * H - 1) / H * S / L / decode_Bps
    inter = max(t_wire, t_codec) if pipelined else t_wire + t_codec
    return t_intra + inter


@register_algorithm
class Hierarchical(Algorithm):
    """Exact inside a host, compressed across hosts; runs only when asked for."""

    name = "hierarchical"
    code = hierarchical_moves.WIRE_CODE
    families = frozenset({"all_reduce", "reduce", "reduce_scatter", "all_gather"})
    # Chunk k of the input is read (reduce-scatter, or the shard itself) before chunk
    # k of the result is written.
    in_place = True

    def cost(
        self,
        nbytes: int,
        world: int,
        link: Link,
        speed: CodecSpeed,
        family: str = "all_reduce",
    ) -> float:
        """`cost` with ``local = link.local`` ranks per host (``world / local`` hosts).

        ``family``: ``"reduce_scatter"`` / ``"all_gather"`` take
        `hierarchical_moves.reduce_scatter_cost` / ``all_gather_cost`` (``nbytes``:
        the input per rank); the all-reduce model otherwise.
        """
        model = {
            "reduce_scatter": hierarchical_moves.reduce_scatter_cost,
            "all_gather": hierarchical_moves.all_gather_cost,
        }.get(family, cost)
        return model(
            nbytes,
            hosts=max(world // link.local, 1),
            local=link.local,
            ratio=speed.ratio,
            intra_Bps=link.intra_bandwidth_Bps,
            inter_Bps=link.bandwidth_Bps,
            encode_Bps=speed.encode_Bps,
            decode_Bps=speed.decode_Bps,
            intra_latency_s=link.intra_latency_s,
            inter_latency_s=link.latency_s,
        )

    all_reduce = staticmethod(all_reduce)
    reduce = staticmethod(reduce)
    prepare = staticmethod(prepare)
    stages = staticmethod(stages)
    reduce_scatter = staticmethod(hierarchical_moves.reduce_scatter)
    all_gather = staticmethod(hierarchical_moves.all_gather)
