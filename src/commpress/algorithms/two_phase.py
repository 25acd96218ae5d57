"""``two_phase`` all-reduce (the default for non-summable codecs) and reduce-scatter.

Phase 1, reduce-scatter: the flat tensor is split into ``world`` contiguous
chunks (`chunk_bounds`: the first ``numel % world`` are one element longer);
each rank encodes every chunk and one ``all_to_all`` sends chunk ``j`` to
rank ``j`` (sizes known to all from the descriptor exchange). Rank ``j``
decodes the ``world`` pieces of its chunk and reduces them in rank order in
the accumulation dtype (float32 for 16-bit floats).

Phase 2, all-gather: each rank encodes its reduced chunk (divided by
``world`` first for AVG), the packets are all-gathered and decoded. The
owner of a chunk uses the *decoded* copy of its own encoded sum, so every
rank ends bit-identical. Packet sizes of phase 2 come from the codec when it
has a fixed size, else from one more all-gather of one ``int64`` per rank.

Wire bytes per rank: about ``2 (world-1)/world * size / ratio``, like a
ring all-reduce. Error: each input's quantization error on the way in, plus
one re-quantization of the sum (``gather`` avoids the second).

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
    alltoallv,
    chunk_bounds,
    encode_pack,
    exchange,
    gather_sizes,
    packed_size,
    reduce_into,
    unpack_decode,
)

__all__ = ["Prepared", "prepare", "all_reduce", "reduce", "reduce_scatter", "chunk_bounds"]


@dataclass
class Prepared:
    """One rank's phase-1 buffers: chunk ``j`` of ``x`` encoded in ``bufs[j]``."""

    x: torch.Tensor
    bounds: list[tuple[int, int]]
    bufs: list[torch.Tensor]


def prepare(
    comm: Comm, flat: torch.Tensor, bounds: Sequence[tuple[int, int]] | None = None
) -> Prepared:
    """Encode every chunk of ``flat`` (plus its residual under error feedback); local work only.

    ``bounds`` default to `chunk_bounds` of ``flat`` into ``world`` chunks.
    """
    bounds = list(bounds) if bounds is not None else chunk_bounds(flat.numel(), comm.size)
    x = flat if comm.feedback is None else comm.feedback.compensate(flat, comm.key)
    return Prepared(x, bounds, [encode_pack(comm, x[a:b]) for a, b in bounds])


def reduce_scatter(
    comm: Comm,
    flat: torch.Tensor,
    bounds: Sequence[tuple[int, int]],
    op: Any,
    prepared: Prepared | None = None,
) -> torch.Tensor:
    """Phase 1: reduce chunk ``bounds[rank]`` of ``flat`` over the group.

    Args:
        flat: this rank's 1-D input (all chunks).
        bounds: ``world`` ``(start, stop)`` ranges, the same on every rank.
        op: the reduce op (AVG is *not* applied here: the caller divides).
        prepared: `prepare`'s output for these bounds when the encode already ran.

    Returns:
        This rank's reduced chunk, 1-D, in the accumulation dtype.
    """
    p = prepared or prepare(comm, flat, bounds)
    x, bufs = p.x, p.bufs
    start, stop = bounds[comm.rank]
    if comm.verify:
        d = exchange(
            comm,
            algorithm="two_phase",
            dtype=flat.dtype,
            numel=flat.numel(),
            sizes=[b.numel() for b in bufs],
            redop=op,
        )
        recv_sizes = d.sizes_to(comm.rank)
    else:
        recv_sizes = [packed_size(comm, (stop - start,), x.dtype)] * comm.size
    received = alltoallv(comm, bufs, recv_sizes)
    acc: torch.Tensor | None = None
    own: torch.Tensor | None = None
    for r, b in enumerate(received):
        y = unpack_decode(comm, b, stop - start, r).to(acc_dtype(flat.dtype))
        if r == comm.rank:
            own = y
        if acc is None:
            acc = y.clone()
        else:
            reduce_into(acc, y, op)
    assert acc is not None and own is not None  # world size >= 2 here
    if comm.feedback is not None:
        pieces = [
            own if j == comm.rank else unpack_decode(comm, bufs[j]).to(own.dtype)
            for j in range(comm.size)
        ]
        comm.feedback.update(comm.key, x, torch.cat(pieces))
    return acc


def _phase2_sizes(
    comm: Comm, bounds: Sequence[tuple[int, int]], dtype: torch.dtype, buf: torch.Tensor
) -> list[int]:
    if comm.codec.encoded_nbytes(1, dtype) is not None:
        return [packed_size(comm, (b - a,), dtype) for a, b in bounds]
    return gather_sizes(comm, buf.numel())


def _own_sum(
    comm: Comm, flat: torch.Tensor, op: Any, prepared: Prepared | None
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    p = prepared or prepare(comm, flat)
    bounds = p.bounds
    s = reduce_scatter(comm, flat, bounds, op, p)
    if op == dist.ReduceOp.AVG:
        s = s / comm.size
    return bounds, s


def all_reduce(
    comm: Comm, flat: torch.Tensor, op: Any, prepared: Prepared | None = None
) -> torch.Tensor:
    """Reduce the 1-D ``flat`` over the group; returns the result (accumulation dtype).

    ``prepared``: `prepare`'s output when the encode already ran (pipelining).
    """
    bounds, s = _own_sum(comm, flat, op, prepared)
    buf = encode_pack(comm, s)
    parts = allgatherv(comm, buf, _phase2_sizes(comm, bounds, s.dtype, buf))
    out = torch.empty(flat.numel(), dtype=s.dtype, device=s.device)
    for r, ((a, b), part) in enumerate(zip(bounds, parts, strict=True)):
        out[a:b] = unpack_decode(comm, part, b - a, r)
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
