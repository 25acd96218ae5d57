"""``hierarchical`` reduce-scatter and all-gather (ZeRO++ style): compressed only across hosts.

On ``N = H * L`` ranks (``H`` hosts, ``L`` ranks each; `commpress.topology`),
block ``g`` of a collective belongs to group rank ``g``, wherever that rank
lives: hosts may hold contiguous blocks of ranks (``torchrun``), interleave,
or be scattered. `Topology.by_local` gives the layout: ``by_local[j][p]`` is
the group rank that is rank ``j`` of its host's intra group and rank ``p`` of
inter group ``j`` (the ``H`` ranks with local index ``j``, one per host).

Reduce-scatter of an input of ``S`` bytes (``N`` blocks of ``S/N``):

1. intra-host all-to-all, uncompressed, in the accumulation dtype (float32
   for 16-bit inputs): local index ``j`` receives, from each of its host's
   ranks, the blocks of the ``H`` ranks in ``by_local[j]`` (in that order) and
   sums them in local-rank order -- the host's partial sums of those blocks;
2. inter-host compressed reduce-scatter (`two_phase.reduce_scatter`) of those
   ``H`` partial blocks among inter group ``j``: rank ``p`` keeps block
   ``by_local[j][p]`` -- its own. Only compressed bytes cross hosts.

Every rank ends with exactly its block; each block is summed on one rank in
one fixed order (the local ranks' partials, then `two_phase`'s own piece
first and the others in inter-rank order), so reruns give the same bits.
Error: one quantization of each other host's partial sum (never of a single
rank's input); the intra-host sums are exact float32 additions. The
reverse order (compress first, then reduce inside the host) would quantize
every rank's input and send ``L`` times the bytes across hosts.

All-gather of ``N`` pieces of ``s`` bytes (output ``S = N s``):

1. inter-host compressed all-gather (`transport.all_gather`) of this rank's
   piece among inter group ``j``: each rank ends with the ``H`` pieces of
   ``by_local[j]``, decoded -- its own piece too, so the ``H`` ranks hold the
   same bits (the transport guarantee);
2. intra-host all-gather of those ``H`` decoded pieces, uncompressed, in
   the tensor's dtype: every rank gets the other local indices' pieces as
   bits, so all ``N`` ranks hold identical outputs.

Inter first, because it is the order that sends each piece across hosts only
once per other host, the least possible: ``(H-1) s / r`` per rank. Gathering
inside the host first would leave each rank with ``L`` pieces to forward,
``L`` times those bytes across hosts, or the same bytes plus a second
intra-host round. It also leaves ``H`` decodes per rank instead of ``N``.

Bytes across hosts (``r``: the ratio of the packets, headers included);
"sent" counts each copy that leaves the rank, ``bytes_wire`` what commpress
hands the backend (`commpress.stats`: an all-gather's buffer once):

========================  ===========================  =======================
op                        sent across hosts, per rank  inter step's bytes_wire
========================  ===========================  =======================
reduce-scatter (S input)  ``(H-1)/H * S / (L r)``      the same
all-gather (S output)     ``(H-1)/H * S / (L r)``      ``S / (N r)``
========================  ===========================  =======================

so a host sends ``(H-1)/H * S / r`` either way. Flat `two_phase`
reduce-scatter sends ``L`` times that: each of the host's ``L`` ranks sends
``N-L`` of its ``N-1`` pieces to other hosts. A flat all-gather's count
depends on the backend: pieces sent straight to every rank make it ``L``
times too; gloo's ring, which visits the hosts' blocks in order, forwards
``N-1`` pieces out of each host, ``(N-1)/(N-L)`` times the hierarchical
bytes (1.5x on 2 x 2, 1.25x on 3 x 2: measured in ``docs/cluster.md``).
Inside a host each rank sends ``(L-1)/L * S`` bytes of the accumulation
dtype (reduce-scatter) or ``(L-1)/L * S`` bytes of the tensor's dtype
(all-gather), uncompressed.

Before anything moves, a descriptor over the whole group (`common.describe`,
the algorithm's `WIRE_CODE`) checks codec, op, dtype, element count and
algorithm, so a rank on the flat algorithm raises on every rank; it runs
before `topology.of`, whose first call per group is a collective of its own
that a flat rank would not join. The inner steps then skip their descriptor
for codecs of fixed size. Where the topology has no two levels (``H == 1``
or ``L == 1``) the flat algorithm runs instead (`two_phase.reduce_scatter`,
`transport.all_gather`), after that descriptor: one more small round than a
flat call. A layout with different numbers of ranks per host raises
`ConfigError` on every rank (from `topology.of`).

All-gather pieces may differ in size between ranks, like torch's list form:
the sizes come from the descriptor (each rank's own element count), and the
intra-host step pads every local index's pieces to the longest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .. import topology
from . import transport, two_phase
from .common import Comm, acc_dtype, describe, reduce_into, wait_timed

__all__ = [
    "WIRE_CODE",
    "inter_comm",
    "two_level",
    "reduce_scatter",
    "all_gather",
    "reduce_scatter_cost",
    "all_gather_cost",
]

#: The ``hierarchical`` algorithm's word in the collective descriptor (all its ops).
WIRE_CODE = 6


def inter_comm(comm: Comm, topo: topology.Topology) -> Comm:
    """``comm`` on the inter-host subgroup (one rank per host with this local index)."""
    return dataclasses.replace(
        comm,
        group=topo.inter,
        rank=topo.inter_rank,
        size=topo.hosts,
        # The whole group's descriptor was checked already; only sizes of variable-size
        # payloads still need the inner exchange.
        verify=not comm.codec.fixed_size,
    )


def two_level(topo: topology.Topology) -> bool:
    """Whether ``topo`` has both levels (``H >= 2`` hosts of ``L >= 2`` ranks)."""
    return topo.hosts >= 2 and topo.local_size >= 2


def reduce_scatter(
    comm: Comm, flat: torch.Tensor, bounds: Sequence[tuple[int, int]], op: Any
) -> torch.Tensor:
    """Reduce block ``bounds[rank]`` of ``flat`` over the group, in two levels.

    Args:
        comm: the call's context (its group is the whole group).
        flat: this rank's 1-D input (all blocks).
        bounds: ``world`` ``(start, stop)`` ranges, the same on every rank; block
            ``g`` is group rank ``g``'s (the faces pass equal blocks).
        op: the reduce op (AVG is *not* applied here: the caller divides, as after
            `two_phase.reduce_scatter`).

    Returns:
        This rank's reduced block, 1-D, in the accumulation dtype.

    Raises:
        ConfigError: the hosts hold different numbers of ranks (on every rank).
        CollectiveError / CodecMismatchError: as `common.exchange`.
    """
    if comm.verify:
        describe(comm, WIRE_CODE, flat, [0] * comm.size, redop=op)
    topo = topology.of(comm.group, comm.device)
    if not two_level(topo):
        return two_phase.reduce_scatter(comm, flat, bounds, op)
    adt, local, me = acc_dtype(flat.dtype), topo.local_size, topo.local_index
    sum_op = dist.ReduceOp.SUM if op == dist.ReduceOp.AVG else op
    x = flat.to(adt)
    lens = [b - a for a, b in bounds]
    # Local index j gets the blocks of by_local[j] (in inter-rank order), each sent
    # straight from the input (point-to-point: no permuting copy into a send buffer);
    # the H blocks of this rank's column arrive from every peer into one buffer.
    mine_blocks = topo.by_local[me]
    mine = sum(lens[g] for g in mine_blocks)
    recv = torch.empty((local - 1) * mine, dtype=adt, device=x.device)
    works, sent = [], 0
    with comm.rec.phase("transfer"):
        for j in range(local):
            if j != me:
                for i, g in enumerate(topo.by_local[j]):
                    a, b = bounds[g]
                    works.append(dist.isend(x[a:b], topo.intra_ranks[j], topo.intra, tag=i))
                    sent += (b - a) * x.element_size()
        got = iter(recv.split(mine))
        parts: list[Any] = []
        for j in range(local):
            if j == me:
                parts.append(None)
                continue
            part, pos = next(got), 0
            for i, g in enumerate(mine_blocks):
                piece = part[pos : pos + lens[g]]
                works.append(dist.irecv(piece, topo.intra_ranks[j], topo.intra, tag=i))
                pos += lens[g]
            parts.append(part)
    comm.rec.bytes_wire += sent
    for w in works:
        wait_timed(comm, w)
    partial = torch.empty(mine, dtype=adt, device=x.device)
    pos = 0
    for g in mine_blocks:  # per block, local-rank order: one owner, deterministic
        n, (a, b) = lens[g], bounds[g]
        pieces = [x[a:b] if p is None else p[pos : pos + n] for p in parts]
        dst = partial[pos : pos + n]
        if sum_op == dist.ReduceOp.SUM and adt.is_floating_point:
            torch.add(pieces[0], pieces[1], out=dst)
            rest = pieces[2:]
        else:
            dst.copy_(pieces[0])
            rest = pieces[1:]
        for q in rest:
            reduce_into(dst, q, sum_op)
        pos += n
    del recv, parts
    inner_bounds, pos = [], 0
    for g in topo.by_local[me]:
        inner_bounds.append((pos, pos + lens[g]))
        pos += lens[g]
    return two_phase.reduce_scatter(inter_comm(comm, topo), partial, inner_bounds, sum_op)


def all_gather(comm: Comm, tensor: torch.Tensor, outputs: Sequence[torch.Tensor]) -> None:
    """Every rank's ``tensor`` into ``outputs[rank]`` on every rank, in two levels.

    Args:
        comm: the call's context (its group is the whole group).
        tensor: this rank's piece (any shape; it travels flat).
        outputs: ``world`` tensors; ``outputs[g]`` receives group rank ``g``'s piece.

    Raises:
        ConfigError: the hosts hold different numbers of ranks (on every rank).
        CollectiveError / CodecMismatchError: as `common.exchange`; an output whose
            element count is not its rank's (on the rank that passed it, after every
            transfer, so the others complete).
    """
    numels = [o.numel() for o in outputs]
    if comm.verify:
        table = describe(comm, WIRE_CODE, tensor, [0] * comm.size, same_numel=False)
        numels = [table.numel(g) for g in range(comm.size)]
    topo = topology.of(comm.group, comm.device)
    if not two_level(topo):
        transport.all_gather(comm, tensor, outputs)
        return
    cols, me = topo.by_local, topo.local_index
    dt, dev = tensor.dtype, tensor.device
    if all(
        o.is_contiguous() and o.dtype == dt and o.numel() == n > 0
        for o, n in zip(outputs, numels, strict=True)
    ):
        _all_gather_direct(comm, topo, tensor, [o.view(-1) for o in outputs])
        return
    lengths = [sum(numels[g] for g in col) for col in cols]
    longest = max(lengths)
    block = torch.zeros(longest, dtype=dt, device=dev)
    pieces, pos = [], 0
    for g in cols[me]:
        pieces.append(block[pos : pos + numels[g]])
        pos += numels[g]
    transport.all_gather(inter_comm(comm, topo), tensor, pieces)
    gathered = torch.empty(topo.local_size * longest, dtype=dt, device=dev)
    with comm.rec.phase("transfer"):
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        work = gather(gathered, block, group=topo.intra, async_op=True)
    comm.rec.bytes_wire += block.numel() * block.element_size()  # as allgatherv counts
    wait_timed(comm, work)
    for j, col in enumerate(cols):
        pos = j * longest
        for g in col:
            _land(comm, outputs[g], gathered[pos : pos + numels[g]], g)
            pos += numels[g]


def _all_gather_direct(
    comm: Comm, topo: topology.Topology, tensor: torch.Tensor, outs: Sequence[torch.Tensor]
) -> None:
    """`all_gather` where every output is a contiguous, non-empty tensor of its piece.

    The inter-host step decodes straight into the outputs of this rank's column; the
    intra-host step sends each of those outputs to every local peer and receives the
    peers' columns straight into theirs (point-to-point: no gather buffer, no copy
    out of it). Measured with it (2 x 2 emulated hosts, 1 Gbit/s, 64 MiB output,
    see benchmarks/results/multihost.md).
    """
    cols, me = topo.by_local, topo.local_index
    transport.all_gather(inter_comm(comm, topo), tensor, [outs[g] for g in cols[me]])
    works, sent = [], 0
    with comm.rec.phase("transfer"):
        for j in range(topo.local_size):
            if j != me:
                for i, g in enumerate(cols[me]):
                    works.append(dist.isend(outs[g], topo.intra_ranks[j], topo.intra, tag=i))
                    sent += outs[g].numel() * outs[g].element_size()
        for j in range(topo.local_size):
            if j != me:
                for i, g in enumerate(cols[j]):
                    works.append(dist.irecv(outs[g], topo.intra_ranks[j], topo.intra, tag=i))
    comm.rec.bytes_wire += sent
    for w in works:
        wait_timed(comm, w)


def _land(comm: Comm, out: torch.Tensor, piece: torch.Tensor, g: int) -> None:
    if out.numel() != piece.numel():
        raise comm.fail(
            f"output {g} has {out.numel()} elements but rank {g} sent {piece.numel()}; "
            "the output list must match every rank's tensor"
        )
    out.copy_(piece.view(out.shape))


def reduce_scatter_cost(
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
) -> float:
    """Modelled seconds of one hierarchical reduce-scatter of an ``nbytes`` input per rank.

    With ``S = nbytes``, ``H = hosts``, ``L = local``, ``r = ratio``::

        t_intra = (L-1)/L * S / intra_Bps + (L-1) * intra_latency_s
        t_wire  = (H-1)/H * S / (L r) / inter_Bps + (H-1) * inter_latency_s
        t_codec = (H-1)/H * S/L / encode_Bps + (H-1)/H * S/L / decode_Bps
        t       = t_intra + t_wire + t_codec

    The all-to-all inside the host, then `two_phase`'s phase 1 on the host's
    partial sums (``S/L`` bytes, of which ``H-1`` pieces are encoded, sent and
    decoded). ``inter_Bps`` is the per-rank share of the slow link, as in
    `hierarchical.cost`. On one level it is the flat ``two_phase`` phase 1.

    Example::

        >>> round(reduce_scatter_cost(64 << 20, hosts=2, local=2, ratio=3.94,
        ...       intra_Bps=2e9, inter_Bps=62.5e6, encode_Bps=1e9, decode_Bps=1e9), 3)
        0.118
    """
    S, H, L = float(nbytes), hosts, local
    t_intra = (L - 1) / L * S / intra_Bps + (L - 1) * intra_latency_s
    cross = (H - 1) / H * S / L
    t_wire = cross / ratio / inter_Bps + (H - 1) * inter_latency_s
    return t_intra + t_wire + cross / encode_Bps + cross / decode_Bps


def all_gather_cost(
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
) -> float:
    """Modelled seconds of one hierarchical all-gather of an ``nbytes`` piece per rank.

    With ``s = nbytes`` (the output is ``S = H L s``)::

        t_codec = s / encode_Bps + H s / decode_Bps
        t_wire  = (H-1) s / r / inter_Bps + (H-1) * inter_latency_s
        t_intra = (L-1) H s / intra_Bps + (L-1) * intra_latency_s
        t       = t_codec + t_wire + t_intra

    One encode of the piece, ``H`` decodes (the inter group's pieces, this
    rank's own included), the compressed pieces of the ``H-1`` other hosts,
    then the ``H`` decoded pieces of each of the ``L-1`` other local ranks.

    Example::

        >>> round(all_gather_cost(16 << 20, hosts=2, local=2, ratio=3.94,
        ...       intra_Bps=2e9, inter_Bps=62.5e6, encode_Bps=1e9, decode_Bps=1e9), 3)
        0.135
    """
    s, H, L = float(nbytes), hosts, local
    t_codec = s / encode_Bps + H * s / decode_Bps
    t_wire = (H - 1) * s / ratio / inter_Bps + (H - 1) * inter_latency_s
    t_intra = (L - 1) * H * s / intra_Bps + (L - 1) * intra_latency_s
    return t_codec + t_wire + t_intra
