"""``two_phase`` all-reduce (the default for non-summable codecs) and reduce-scatter.

Phase 1, reduce-scatter: the flat tensor is split into ``world`` contiguous
chunks (`chunk_bounds`: the first ``numel % world`` are one element longer);
each rank encodes every chunk but its own and one ``all_to_all`` sends chunk
``j`` to rank ``j`` (sizes known to all from the descriptor exchange). Rank
``j`` decodes the ``world - 1`` pieces of its chunk, adds its own piece
exactly (it never crossed the wire: no encode, no decode, no error), and
reduces in rank order in the accumulation dtype (float32 for 16-bit floats).

Phase 2, all-gather: each rank encodes its reduced chunk (divided by
``world`` first for AVG), the packets are all-gathered and decoded. The
owner of a chunk uses the *decoded* copy of its own encoded sum, so every
rank ends bit-identical. Packet sizes of phase 2 come from the codec when it
has a fixed size, else from one more all-gather of one ``int64`` per rank.

Wire bytes per rank: about ``2 (world-1)/world * size / ratio``, like a
ring all-reduce. Error: the other ranks' quantization errors on the way
in, plus one re-quantization of the sum (``gather`` avoids the second).

Chunked, for fixed-size codecs (`stages`, run by `chunked`): the phases of
successive chunks overlap, transfers posted asynchronously while this thread
does the codec work of the neighbouring chunks.

``reduce`` runs phase 1 and sends the encoded chunks to the root instead of
all-gathering them; ``reduce_scatter`` is phase 1 alone, on the chunks the
caller's tensors define.

With error feedback, a rank's residual is its compensated input minus the
decoded pieces it sent (the re-quantization of phase 2 is not fed back: it
is common to all ranks and bounded by one quantization step of the sum).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .common import (
    Comm,
    acc_dtype,
    allgatherv,
    allgatherv_start,
    alltoallv,
    alltoallv_start,
    average,
    chunk_bounds,
    describe,
    encode_pack,
    encode_pack_many,
    gather_sizes,
    packed_size,
    reduce_into,
    unpack_decode,
    wait_timed,
)
from .registry import Algorithm, CodecSpeed, Link, Stage, register_algorithm

__all__ = [
    "Prepared",
    "prepare",
    "all_reduce",
    "stages",
    "TwoPhase",
    "reduce",
    "reduce_scatter",
    "chunk_bounds",
]


@dataclass
class Prepared:
    """One rank's phase-1 buffers: chunk ``j`` encoded in ``bufs[j]``.

    ``own`` is this rank's own chunk (compensated under error feedback), which enters
    the sum exactly; ``dtype`` is the dtype of the encoded pieces.
    """

    own: torch.Tensor
    dtype: torch.dtype
    bounds: list[tuple[int, int]]
    bufs: list[torch.Tensor]


def prepare(
    comm: Comm, flat: torch.Tensor, bounds: Sequence[tuple[int, int]] | None = None
) -> Prepared:
    """Encode every chunk of ``flat`` (plus its residual under error feedback); local work only.

    ``bounds`` default to `chunk_bounds` of ``flat`` into ``world`` chunks.
    """
    bounds = list(bounds) if bounds is not None else chunk_bounds(flat.numel(), comm.size)
    if comm.feedback is not None:
        return _prepare_fed_back(comm, flat, bounds)
    start, stop = bounds[comm.rank]
    # This rank's own chunk never crosses the wire: it enters the sum exactly. The others
    # are encoded straight into one send buffer (fixed-size codecs).
    bufs = encode_pack_many(
        comm, [None if j == comm.rank else flat[a:b] for j, (a, b) in enumerate(bounds)]
    )
    return Prepared(flat[start:stop], flat.dtype, bounds, bufs)


def _prepare_fed_back(comm: Comm, flat: torch.Tensor, bounds: list[tuple[int, int]]) -> Prepared:
    """Error feedback one piece at a time: compensate piece ``j`` with its residual,
    encode it, and store what the receiver will not see as the new residual, in place
    (no full-size copy). The own piece never crosses the wire: its residual is zero."""
    fb = comm.feedback
    assert fb is not None
    r = fb.residual(comm.key, flat)
    bufs: list[torch.Tensor] = []
    own = r[:0]
    for j, (a, b) in enumerate(bounds):
        x = flat[a:b].to(r.dtype) + r[a:b]
        if j == comm.rank:
            own = x
            r[a:b].zero_()
            bufs.append(torch.empty(0, dtype=torch.uint8, device=comm.device))
            continue
        buf = encode_pack(comm, x)
        unpack_decode(comm, buf, out=r[a:b])
        torch.sub(x, r[a:b], out=r[a:b])
        # A NaN/Inf input must not poison every later step (the NaN itself still goes out).
        r[a:b].nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        bufs.append(buf)
    return Prepared(own, r.dtype, bounds, bufs)


def reduce_scatter(
    comm: Comm,
    flat: torch.Tensor,
    bounds: Sequence[tuple[int, int]],
    op: Any,
    prepared: Prepared | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Phase 1: reduce chunk ``bounds[rank]`` of ``flat`` over the group.

    Args:
        flat: this rank's 1-D input (all chunks).
        bounds: ``world`` ``(start, stop)`` ranges, the same on every rank.
        op: the reduce op (AVG is *not* applied here: the caller divides).
        prepared: `prepare`'s output for these bounds when the encode already ran.
        out: where to reduce (this rank's chunk, in the accumulation dtype); may be the
            chunk of ``flat`` itself, which the sum then overwrites in place.

    Returns:
        This rank's reduced chunk, 1-D, in the accumulation dtype (``out`` when given).
    """
    p = prepared or prepare(comm, flat, bounds)
    start, stop = bounds[comm.rank]
    if comm.verify:
        d = describe(comm, TwoPhase.code, flat, [b.numel() for b in p.bufs], redop=op)
        recv_sizes = d.sizes_to(comm.rank)
    else:
        recv_sizes = _phase1_sizes(comm, stop - start, p.dtype)
    received = alltoallv(comm, p.bufs, recv_sizes)
    return _sum_received(comm, flat.dtype, p, received, op, out)


def _sum_received(
    comm: Comm,
    dtype: torch.dtype,
    p: Prepared,
    received: list[torch.Tensor],
    op: Any,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode this rank's chunk from every rank and reduce (`prepare` fed back the error).

    SUM/AVG of floating tensors decode straight into the accumulator (decode-and-add,
    no temporary per piece): this rank's own exact piece first, then the others in rank
    order. Every rank ends with the same result all the same: phase 2 spreads the
    owner's sum. Other ops reduce in rank order through temporaries.
    """
    start, stop = p.bounds[comm.rank]
    adt = acc_dtype(dtype)
    own = p.own
    if op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG) and adt.is_floating_point:
        acc = out if out is not None else torch.empty(stop - start, dtype=adt, device=own.device)
        if acc.data_ptr() != own.data_ptr():
            acc.copy_(own)
        for r, b in enumerate(received):
            if r != comm.rank:
                unpack_decode(comm, b, stop - start, r, out=acc, accumulate=True)
    else:
        acc = None
        for r, b in enumerate(received):
            y = own.to(adt) if r == comm.rank else unpack_decode(comm, b, stop - start, r).to(adt)
            if acc is None:
                acc = y.clone()
            else:
                reduce_into(acc, y, op)
        assert acc is not None  # world size >= 2 here
        if out is not None:
            out.copy_(acc)
            acc = out
    return acc


def _phase1_sizes(comm: Comm, numel: int, dtype: torch.dtype) -> list[int]:
    """Packed sizes this rank receives in phase 1 (nothing from itself)."""
    size = packed_size(comm, (numel,), dtype)
    return [0 if r == comm.rank else size for r in range(comm.size)]


def _phase2_sizes(
    comm: Comm, bounds: Sequence[tuple[int, int]], dtype: torch.dtype, buf: torch.Tensor
) -> list[int]:
    if comm.codec.fixed_size:
        return [packed_size(comm, (b - a,), dtype) for a, b in bounds]
    return gather_sizes(comm, buf.numel())


def _own_sum(
    comm: Comm,
    flat: torch.Tensor,
    op: Any,
    prepared: Prepared | None,
    out: torch.Tensor | None = None,
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    p = prepared or prepare(comm, flat)
    bounds = p.bounds
    a, b = bounds[comm.rank]
    s = reduce_scatter(comm, flat, bounds, op, p, None if out is None else out[a:b])
    return bounds, average(s, op, comm.size)


def all_reduce(
    comm: Comm,
    flat: torch.Tensor,
    op: Any,
    prepared: Prepared | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce the 1-D ``flat`` over the group; returns the result (accumulation dtype).

    ``prepared``: `prepare`'s output when the encode already ran (pipelining).
    ``out``: 1-D destination in the accumulation dtype; may be ``flat`` itself (the
    in-place all-reduce: no full-size temporary), since every chunk of ``flat`` was
    encoded before any of ``out`` is written.
    """
    if out is None:
        out = torch.empty(flat.numel(), dtype=acc_dtype(flat.dtype), device=flat.device)
    bounds, s = _own_sum(comm, flat, op, prepared, out)
    # The owner too takes the decoded copy of its encoded sum (bit-identical ranks):
    # the encode writes it back into ``s`` (a region of ``out``) in the same pass.
    buf = encode_pack(comm, s, roundtrip=True)
    parts = allgatherv(comm, buf, _phase2_sizes(comm, bounds, s.dtype, buf))
    del buf
    for r, ((a, b), part) in enumerate(zip(bounds, parts, strict=True)):
        if r != comm.rank:
            unpack_decode(comm, part, b - a, r, out=out[a:b])
    return out


def reduce(
    comm: Comm, flat: torch.Tensor, op: Any, root: int, prepared: Prepared | None = None
) -> torch.Tensor | None:
    """Phase 1, then the encoded chunks go to group rank ``root``, which returns the result."""
    bounds, s = _own_sum(comm, flat, op, prepared)
    buf = encode_pack(comm, s)
    sizes = _phase2_sizes(comm, bounds, s.dtype, buf)
    send: list[torch.Tensor | None] = [None] * comm.size
    send[root] = buf
    parts = alltoallv(comm, send, sizes if comm.rank == root else [0] * comm.size)
    if comm.rank != root:
        return None
    out = torch.empty(flat.numel(), dtype=s.dtype, device=s.device)
    for r, ((a, b), part) in enumerate(zip(bounds, parts, strict=True)):
        out[a:b] = unpack_decode(comm, part, b - a, r)
    return out


def stages(
    comms: Sequence[Comm],
    flat: torch.Tensor,
    op: Any,
    bounds: Sequence[tuple[int, int]],
    out: torch.Tensor,
) -> list[Stage] | None:
    """The chunked all-reduce's three stages, transfers in flight behind the codec work.

    For codecs of fixed size only (every packed size is computable locally). Stage 1
    encodes chunk ``k`` and posts its ``all_to_all``; stage 2 sums what arrived for
    chunk ``k-1``, re-encodes the sum and posts its ``all_gather``; stage 3 decodes
    chunk ``k-2``. One descriptor exchange covers the whole call (``comms[0]`` carries
    it, here; ``comms[k]`` is chunk ``k``'s context, with its own error-feedback key
    and stats record).

    Args:
        comms: one `Comm` per chunk.
        flat: this rank's 1-D input.
        op: SUM or AVG.
        bounds: the chunks' ``(start, stop)`` ranges in ``flat``.
        out: 1-D result in the accumulation dtype, written chunk by chunk; may be
            ``flat`` itself (chunk ``k`` is written only after it was encoded).
    """
    if not comms[0].codec.fixed_size:
        return None  # the sizes of phase 2 are only known after an exchange per chunk
    first = comms[0]
    dtype = flat.dtype
    if first.verify:
        chunk = bounds[0][1] - bounds[0][0]
        describe(first, TwoPhase.code, flat, [flat.numel()] * first.size, redop=op, chunk=chunk)
    rank, world = first.rank, first.size

    def scatter(k: int, _: Any) -> tuple[Prepared, Any, list[torch.Tensor]]:
        a, b = bounds[k]
        p = prepare(comms[k], flat[a:b])
        lo, hi = p.bounds[rank]
        recv_sizes = _phase1_sizes(comms[k], hi - lo, p.dtype)
        return (p, *alltoallv_start(comms[k], p.bufs, recv_sizes))

    def sum_and_gather(k: int, posted: tuple[Prepared, Any, list[torch.Tensor]]) -> Any:
        p, work, received = posted
        wait_timed(comms[k], work)
        lo, hi = p.bounds[rank]
        base = bounds[k][0]
        s = _sum_received(comms[k], dtype, p, received, op, out[base + lo : base + hi])
        del received, posted
        average(s, op, world)
        buf = encode_pack(comms[k], s, roundtrip=True)  # s: the owner's decoded sum
        sizes = [packed_size(comms[k], (hi - lo,), s.dtype) for lo, hi in p.bounds]
        return (p.bounds, *allgatherv_start(comms[k], buf, sizes))

    def decode(k: int, posted: tuple[list[tuple[int, int]], Any, list[torch.Tensor]]) -> None:
        chunk_parts, work, parts = posted
        wait_timed(comms[k], work)
        base = bounds[k][0]
        for r, ((lo, hi), part) in enumerate(zip(chunk_parts, parts, strict=True)):
            if r != rank:
                unpack_decode(comms[k], part, hi - lo, r, out=out[base + lo : base + hi])

    return [(0, scatter), (1, sum_and_gather), (2, decode)]


@register_algorithm
class TwoPhase(Algorithm):
    """Reduce-scatter by all-to-all, local sum, re-encode, all-gather; module docstring."""

    name = "two_phase"
    code = 2
    families = frozenset({"all_reduce", "reduce", "reduce_scatter"})
    auto_order = 2
    in_place = True

    def cost(
        self, nbytes: int, world: int, link: Link, speed: CodecSpeed, family: str = "all_reduce"
    ) -> float:
        """Two rounds of ``(N-1)/N * S/r`` bytes, plus the codec work.

        ``S/enc`` (phase-1 pieces) + ``(N-1)/N * S/dec`` (decode-and-add) +
        ``S/N/enc`` (the sum) + ``S/dec`` (phase 2) + one small descriptor round.
        A reduce-scatter is phase 1 alone: one round, ``S/enc + (N-1)/N * S/dec``.
        """
        part = (world - 1) / world * nbytes / speed.ratio
        descriptor = link.seconds(0, world - 1)
        phase1 = nbytes / speed.encode_Bps + (world - 1) / world * nbytes / speed.decode_Bps
        if family == "reduce_scatter":
            return phase1 + link.seconds(part, world - 1) + descriptor
        phase2 = nbytes / world / speed.encode_Bps + nbytes / speed.decode_Bps
        return phase1 + phase2 + link.seconds(2 * part, 2 * (world - 1)) + descriptor

    all_reduce = staticmethod(all_reduce)
    reduce = staticmethod(reduce)
    prepare = staticmethod(prepare)
    stages = staticmethod(stages)
