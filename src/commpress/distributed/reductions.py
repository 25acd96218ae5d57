"""The compressed reductions: all_reduce, reduce, reduce_scatter(_tensor)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
import torch.distributed as dist

from ..algorithms import chunked, get_algorithm, two_phase
from ..algorithms.common import Comm, average
from ..engine import Handle
from ..registry import CodecLike
from .call import (
    Call,
    Request,
    check_list,
    check_tensor,
    execute,
    flat,
    nbytes,
    not_member,
    root_rank,
    to_global,
    write,
)

__all__ = ["all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor"]

_SUM = dist.ReduceOp.SUM


def _reduce_into(tensor: torch.Tensor, op: Any, root: int | None) -> Any:
    """The compressed job of all_reduce (``root`` None) and reduce: the decided
    algorithm through the chunked driver, the result written into ``tensor``."""

    def run(call: Call, comm: Comm) -> None:
        algo = get_algorithm(call.decision.algorithm)  # type: ignore[arg-type]
        result = chunked.reduce(algo, comm, tensor, op, root, call.engine)
        if result is not None:
            write(tensor, result)

    return run


def all_reduce(
    tensor: torch.Tensor,
    op: Any = _SUM,
    group: Any = None,
    async_op: bool = False,
    *,
    codec: CodecLike | None = None,
    key: Hashable | None = None,
) -> Handle | None:
    """Reduce ``tensor`` over ``group`` in place on every rank, compressed.

    Args:
        tensor: input and output, any shape; non-contiguous is fine. A sparse tensor
            (gloo reduces COO tensors) goes to plain ``torch.distributed`` whatever the
            codec: no codec here encodes a sparse layout.
        op: ``ReduceOp.SUM`` / ``AVG`` compress; other ops go through exactly (plain
            torch, or a lossless codec).
        group: process group (default: the world).
        async_op: return a `Handle` at once instead of blocking.
        codec: spec, config dict or `Codec`; None uses the policy's codec.
        key: error-feedback key (see the module docstring).

    Returns:
        A `Handle` if ``async_op``, else None (also None on a rank outside ``group``).

    Raises:
        CodecMismatchError: the ranks passed different codecs (on every rank).
        CollectiveError: a peer failed, died or timed out.
        UnsupportedDtypeError: ``AVG`` of a non-floating tensor.
    """
    check_tensor(tensor, "tensor")
    if not_member(group, "all_reduce"):
        return None
    return execute(
        Request(
            "all_reduce",
            group,
            tensor,
            plain=lambda a: dist.all_reduce(tensor, op, group, a),
            run=_reduce_into(tensor, op, None),
            outputs=[tensor],
            reduce_op=op,
            codec="none" if tensor.layout != torch.strided else codec,
            key=key,
        ),
        async_op,
    )


def reduce(
    tensor: torch.Tensor,
    dst: int | None = None,
    op: Any = _SUM,
    group: Any = None,
    async_op: bool = False,
    group_dst: int | None = None,
    *,
    codec: CodecLike | None = None,
    key: Hashable | None = None,
) -> Handle | None:
    """Reduce ``tensor`` over ``group`` into rank ``dst``, compressed.

    Like ``torch.distributed.reduce``: ``dst`` is a global rank, ``group_dst`` a
    rank within ``group`` (give one). Only ``dst`` gets the result; the other
    ranks' tensors are left unchanged. See `all_reduce` for the other arguments.
    """
    check_tensor(tensor, "tensor")
    if not_member(group, "reduce"):
        return None
    root = root_rank("reduce", group, "dst", dst, group_dst)
    g = to_global(group, root)
    return execute(
        Request(
            "reduce",
            group,
            tensor,
            plain=lambda a: dist.reduce(tensor, g, op, group, a),
            run=_reduce_into(tensor, op, root),
            outputs=[tensor],
            reduce_op=op,
            codec=codec,
            key=key,
        ),
        async_op,
    )


def _others(t: torch.Tensor, world: int) -> int:
    """Bytes of ``t`` bound for other ranks (all but this rank's own block)."""
    return nbytes(t) * (world - 1) // world


def _scatter_reduced(inputs: list[torch.Tensor], output: torch.Tensor, op: Any) -> Any:
    """The compressed job of the reduce-scatters: the decided algorithm's reduce-scatter
    (phase 1 of two_phase unless it runs its own, like hierarchical) on the concatenated
    input (one view when it is one tensor), rank ``r`` keeping block ``r``."""

    def run(call: Call, comm: Comm) -> None:
        n = output.numel()
        x = flat(inputs[0]) if len(inputs) == 1 else torch.cat([flat(t) for t in inputs])
        bounds = [(r * n, (r + 1) * n) for r in range(call.size)]
        algo = get_algorithm(call.decision.algorithm)  # type: ignore[arg-type]
        scatter = algo.reduce_scatter or two_phase.reduce_scatter
        write(output, average(scatter(comm, x, bounds, op), op, call.size))

    return run


def reduce_scatter_tensor(
    output: torch.Tensor,
    input: torch.Tensor,  # noqa: A002
    op: Any = _SUM,
    group: Any = None,
    async_op: bool = False,
    *,
    codec: CodecLike | None = None,
    key: Hashable | None = None,
) -> Handle | None:
    """Reduce ``input`` over ``group`` and scatter it: rank ``r`` gets block ``r`` in ``output``.

    ``input`` holds ``world_size * output.numel()`` elements (flat order, like
    torch). Compressed with the first phase of ``two_phase``: each rank receives
    the encoded pieces of its block and sums them in float32.
    """
    check_tensor(output, "output")
    check_tensor(input, "input")
    if not_member(group, "reduce_scatter_tensor"):
        return None
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

    def check(call: Call) -> str | None:
        n = output.numel()
        if input.numel() == call.size * n and input.dtype == output.dtype:
            return None
        return (
            f"reduce_scatter_tensor: input has {input.numel()} elements of {input.dtype} but "
            f"must hold world_size ({call.size}) x output.numel() ({n}) = {call.size * n} "
            f"elements of output's dtype {output.dtype}"
        )

    return execute(
        Request(
            "reduce_scatter_tensor",
            group,
            input,
            plain=lambda a: fn(output, input, op, group, a),
            run=_scatter_reduced([input], output, op),
            bytes_in=_others(input, dist.get_world_size(group)),
            outputs=[output],
            tensors=[output, input],
            reduce_op=op,
            codec=codec,
            key=key,
            check=check,
        ),
        async_op,
    )


def reduce_scatter(
    output: torch.Tensor,
    input_list: list[torch.Tensor],
    op: Any = _SUM,
    group: Any = None,
    async_op: bool = False,
    *,
    codec: CodecLike | None = None,
    key: Hashable | None = None,
) -> Handle | None:
    """Reduce ``input_list[r]`` over ``group`` into ``output`` of rank ``r``, compressed.

    Every ``input_list[r]`` must have ``output.numel()`` elements.
    """
    check_tensor(output, "output")
    inputs = check_list(input_list, "input_list")
    if not_member(group, "reduce_scatter"):
        return None
    total = sum(nbytes(t) for t in inputs)
    world = dist.get_world_size(group)

    def check(call: Call) -> str | None:
        n = output.numel()
        if len(inputs) == call.size and all(
            t.numel() == n and t.dtype == output.dtype for t in inputs
        ):
            return None
        return (
            f"reduce_scatter: input_list must hold {call.size} tensors of {n} elements of "
            f"{output.dtype} (like output); got {len(inputs)} with "
            f"{[t.numel() for t in inputs]} elements of {[str(t.dtype) for t in inputs]}"
        )

    return execute(
        Request(
            "reduce_scatter",
            group,
            output,
            plain=lambda a: dist.reduce_scatter(output, inputs, op, group, a),
            run=_scatter_reduced(inputs, output, op),
            outputs=[output],
            tensors=[output, *inputs],
            reduce_op=op,
            codec=codec,
            key=key,
            size=total,
            bytes_in=total * (world - 1) // world,  # this rank's own block stays
            check=check,
        ),
        async_op,
    )
