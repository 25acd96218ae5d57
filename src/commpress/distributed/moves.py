"""The compressed ops that move data: broadcast, all_gather(_into_tensor), gather,
scatter, all_to_all(_single). Each encodes once, moves packets and decodes on arrival
(`commpress.algorithms.transport`).

Under ``codec="auto"`` an ``all_to_all_single`` without split sizes is decided like
the other ops (torch requires the same input size on every rank then, so every rank
decides alike); one with ``input_split_sizes`` / ``output_split_sizes`` goes plain,
since the ranks' sizes may differ and no size-based decision could be shared without
a round of its own; so does ``all_to_all`` of tensor lists. Pass split sizes on every
rank of a call or on none: a call that has them on some ranks only (legal in torch
when they happen to be even) is plain there and may compress elsewhere, and then
fails with the watchdog's `CollectiveError` naming both calls. The descriptor round
of a compressed all-to-all is an all-gather of rows, never an ``all_to_all_single``
(`commpress.algorithms.common`), so it cannot be taken for a peer's plain one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..algorithms import get_algorithm, transport
from ..algorithms.common import Comm
from ..decision import auto_budget
from ..engine import Handle
from ..errors import ConfigError
from ..policy import get_policy
from ..registry import CodecLike
from .call import (
    Call,
    Request,
    check_list,
    check_tensor,
    execute,
    nbytes,
    not_member,
    root_rank,
    to_global,
    write,
)

__all__ = [
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
]


def broadcast(
    tensor: torch.Tensor,
    src: int | None = None,
    group: Any = None,
    async_op: bool = False,
    group_src: int | None = None,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Broadcast ``tensor`` from rank ``src`` (global) / ``group_src`` (group rank), compressed.

    Every rank, the source included, ends with the decoded tensor (with a lossy
    codec torch's semantics -- the source keeps its exact values -- would leave the
    source different from everyone else).
    """
    check_tensor(tensor, "tensor")
    if not_member(group, "broadcast"):
        return None
    root = root_rank("broadcast", group, "src", src, group_src)
    g = to_global(group, root)
    return execute(
        Request(
            "broadcast",
            group,
            tensor,
            plain=lambda a: dist.broadcast(tensor, g, group, a),
            run=lambda call, comm: transport.broadcast(comm, tensor, root),
            outputs=[tensor],
            codec=codec,
        ),
        async_op,
    )


def _gather_all(
    call: Call, comm: Comm, tensor: torch.Tensor, outputs: Sequence[torch.Tensor]
) -> None:
    """The decided algorithm's all-gather (transport's unless it runs its own)."""
    algo = get_algorithm(call.decision.algorithm)  # type: ignore[arg-type]
    (algo.all_gather or transport.all_gather)(comm, tensor, outputs)


def all_gather(
    tensor_list: list[torch.Tensor],
    tensor: torch.Tensor,
    group: Any = None,
    async_op: bool = False,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Gather every rank's ``tensor`` into ``tensor_list`` on every rank, compressed.

    ``tensor_list[r]`` receives rank ``r``'s tensor (its element count must match;
    ranks may contribute different sizes). Every rank's own slot holds its decoded
    tensor, so all ranks hold identical lists.
    """
    outputs = check_list(tensor_list, "tensor_list")
    check_tensor(tensor, "tensor")
    if not_member(group, "all_gather"):
        return None

    def check(call: Call) -> str | None:
        if (
            len(outputs) == call.size
            and outputs[call.rank].numel() == tensor.numel()
            and all(t.dtype == tensor.dtype for t in outputs)
        ):
            return None
        return (
            f"all_gather: tensor_list must hold {call.size} tensors of dtype {tensor.dtype}, "
            f"entry {call.rank} (this rank) with tensor's {tensor.numel()} elements; got "
            f"{len(outputs)} tensors with {[t.numel() for t in outputs]} elements"
        )

    return execute(
        Request(
            "all_gather",
            group,
            tensor,
            plain=lambda a: dist.all_gather(outputs, tensor, group, a),
            run=lambda call, comm: _gather_all(call, comm, tensor, outputs),
            outputs=outputs,
            tensors=[tensor, *outputs],
            codec=codec,
            size=max((nbytes(t) for t in outputs), default=nbytes(tensor)),
            check=check,
        ),
        async_op,
    )


def all_gather_into_tensor(
    output_tensor: torch.Tensor,
    input_tensor: torch.Tensor,
    group: Any = None,
    async_op: bool = False,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Gather every rank's ``input_tensor`` into ``output_tensor`` (rank order, flat), compressed.

    ``output_tensor`` must hold ``world_size * input_tensor.numel()`` elements
    (e.g. shape ``(world_size * n, ...)`` or ``(world_size, n, ...)``).
    """
    check_tensor(output_tensor, "output_tensor")
    check_tensor(input_tensor, "input_tensor")
    if not_member(group, "all_gather_into_tensor"):
        return None
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    n = input_tensor.numel()

    def check(call: Call) -> str | None:
        if output_tensor.numel() == call.size * n and output_tensor.dtype == input_tensor.dtype:
            return None
        return (
            f"all_gather_into_tensor: output_tensor has {output_tensor.numel()} elements of "
            f"{output_tensor.dtype} but must hold world_size ({call.size}) x "
            f"input_tensor.numel() ({n}) = {call.size * n} elements of {input_tensor.dtype}"
        )

    def run(call: Call, comm: Comm) -> None:
        out = torch.empty(
            output_tensor.numel(), dtype=output_tensor.dtype, device=output_tensor.device
        )
        _gather_all(call, comm, input_tensor, list(out.split(n)))
        write(output_tensor, out)

    return execute(
        Request(
            "all_gather_into_tensor",
            group,
            input_tensor,
            plain=lambda a: fn(output_tensor, input_tensor, group, a),
            run=run,
            outputs=[output_tensor],
            tensors=[output_tensor, input_tensor],
            codec=codec,
            check=check,
        ),
        async_op,
    )


def _root_list_check(
    root: int, op: str, role: str, name: str, tensors: list[torch.Tensor], tensor: torch.Tensor
) -> Any:
    """The check of a root's ``gather_list``/``scatter_list``: ``world`` tensors like ``tensor``."""

    def check(call: Call) -> str | None:
        if call.rank != root or (
            len(tensors) == call.size
            and all(t.numel() == tensor.numel() and t.dtype == tensor.dtype for t in tensors)
        ):
            return None
        return (
            f"{op}: on {role}, {name} must hold {call.size} tensors of {tensor.numel()} "
            f"elements of {tensor.dtype}; got {len(tensors)} with "
            f"{[t.numel() for t in tensors]} elements"
        )

    return check


def _root_of_list(
    op: str,
    group: Any,
    role: str,
    name: str,
    tensors: list[torch.Tensor],
    global_rank: int | None,
    group_rank: int | None,
) -> int:
    """The root of gather/scatter (global rank 0 by default, like torch); ``tensors`` (the
    list argument) must be given on the root only (for gather: may be left out there)."""
    default = 0 if global_rank is None and group_rank is None else None
    root = root_rank(op, group, role, global_rank, group_rank, default)
    here = dist.get_rank(group)
    if here == root and not tensors and op == "scatter":
        raise ConfigError(f"{op}: {name} must be given on the {role} rank")
    if here != root and tensors:
        raise ConfigError(f"{op}: {name} must not be given on ranks other than {role}")
    return root


@dataclass(frozen=True)
class _RootedOp:
    """gather or scatter: the op, its root's role, its list argument and its transport."""

    op: str
    role: str
    name: str
    move: Callable[..., None]


_GATHER = _RootedOp("gather", "dst", "gather_list", transport.gather)
_SCATTER = _RootedOp("scatter", "src", "scatter_list", transport.scatter)


def _rooted(
    what: _RootedOp,
    group: Any,
    tensor: torch.Tensor,
    tensors: list[torch.Tensor],
    global_rank: int | None,
    group_rank: int | None,
    codec: CodecLike | None,
    async_op: bool,
    outputs: list[torch.Tensor],
) -> Handle | None:
    """gather and scatter: ``tensors`` (the root's list) against ``tensor`` on each rank."""
    op, role, name = what.op, what.role, what.name
    root = _root_of_list(op, group, role, name, tensors, global_rank, group_rank)
    g = to_global(group, root)
    return execute(
        Request(
            op,
            group,
            tensor,
            plain=lambda a: getattr(dist, op)(tensor, tensors or None, g, group, a),
            run=lambda call, comm: what.move(
                comm, tensor, tensors if call.rank == root else None, root
            ),
            outputs=outputs,
            tensors=[tensor, *tensors],
            codec=codec,
            check=_root_list_check(root, op, role, name, tensors, tensor),
        ),
        async_op,
    )


def gather(
    tensor: torch.Tensor,
    gather_list: list[torch.Tensor] | None = None,
    dst: int | None = None,
    group: Any = None,
    async_op: bool = False,
    group_dst: int | None = None,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Gather every rank's ``tensor`` into ``gather_list`` on rank ``dst``, compressed.

    Like torch: ``dst`` defaults to global rank 0; ``gather_list`` is given on the
    destination only.
    """
    check_tensor(tensor, "tensor")
    outputs = check_list(gather_list, "gather_list") if gather_list else []
    if not_member(group, "gather"):
        return None
    return _rooted(_GATHER, group, tensor, outputs, dst, group_dst, codec, async_op, outputs)


def scatter(
    tensor: torch.Tensor,
    scatter_list: list[torch.Tensor] | None = None,
    src: int | None = None,
    group: Any = None,
    async_op: bool = False,
    group_src: int | None = None,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Scatter ``scatter_list`` of rank ``src`` into every rank's ``tensor``, compressed.

    Like torch: ``src`` defaults to global rank 0; ``scatter_list`` is given on the
    source only. The source's own ``tensor`` gets its decoded piece too.
    """
    check_tensor(tensor, "tensor")
    inputs = check_list(scatter_list, "scatter_list") if scatter_list else []
    if not_member(group, "scatter"):
        return None
    return _rooted(_SCATTER, group, tensor, inputs, src, group_src, codec, async_op, [tensor])


def _exchange_or_plain(
    call: Call,
    comm: Comm,
    inputs: list[torch.Tensor],
    outputs: list[torch.Tensor],
    plain: Any,
) -> bool:
    """The all-to-all of ``inputs`` into ``outputs``; the plain call instead when the
    largest rank's input is below ``min_bytes`` (known after the descriptor exchange).
    Returns whether it compressed."""
    if transport.all_to_all(comm, inputs, outputs, call.decision.min_bytes):
        return True
    call.rec.compressed = False
    plain(False)
    return False


def all_to_all(
    output_tensor_list: list[torch.Tensor],
    input_tensor_list: list[torch.Tensor],
    group: Any = None,
    async_op: bool = False,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Send ``input_tensor_list[j]`` to rank ``j``; rank i's lands in ``output_tensor_list[i]``.

    Tensors may differ in size between pairs. Whether to compress against
    ``min_bytes`` is decided from the largest rank's input, after the descriptor
    exchange.
    """
    outputs = check_list(output_tensor_list, "output_tensor_list")
    inputs = check_list(input_tensor_list, "input_tensor_list")
    if not_member(group, "all_to_all"):
        return None
    probe = inputs[0] if inputs else (outputs[0] if outputs else torch.empty(0))

    def plain(a: bool) -> Any:
        return dist.all_to_all(outputs, inputs, group, a)

    def check(call: Call) -> str | None:
        if (
            len(inputs) == call.size
            and len(outputs) == call.size
            and all(t.dtype == probe.dtype for t in [*inputs, *outputs])
        ):
            return None
        return (
            f"all_to_all: output_tensor_list and input_tensor_list must each hold {call.size} "
            f"tensors of one dtype; got {len(outputs)} and {len(inputs)} tensors of "
            f"{sorted({str(t.dtype) for t in [*inputs, *outputs]})}"
        )

    return execute(
        Request(
            "all_to_all",
            group,
            probe,
            plain=plain,
            run=lambda call, comm: _exchange_or_plain(call, comm, inputs, outputs, plain),
            outputs=outputs,
            tensors=[*inputs, *outputs],
            codec=codec,
            # This rank's own chunk never leaves it (as in bytes_wire).
            bytes_in=sum(nbytes(t) for j, t in enumerate(inputs) if j != dist.get_rank(group)),
            check=check,
        ),
        async_op,
    )


def _is_auto(codec: CodecLike | None) -> bool:
    """Whether ``codec`` (None: the policy's) is ``"auto"`` (with or without a budget)."""
    spec = get_policy().codec if codec is None else codec
    return isinstance(spec, str) and auto_budget(spec) is not None


def _splits(sizes: Sequence[int] | None, total: int, world: int, what: str) -> list[int] | str:
    if sizes is None or len(sizes) == 0:
        if total % world:
            return (
                f"{what}: dim 0 has {total} rows, which is not divisible by the world size "
                f"{world}; pass {what}_split_sizes"
            )
        return [total // world] * world
    sizes = [int(s) for s in sizes]
    if len(sizes) != world or any(s < 0 for s in sizes) or sum(sizes) != total:
        return (
            f"{what}_split_sizes={sizes} must be {world} non-negative sizes summing to "
            f"{what}.size(0) = {total}"
        )
    return sizes


def all_to_all_single(
    output: torch.Tensor,
    input: torch.Tensor,  # noqa: A002
    output_split_sizes: list[int] | None = None,
    input_split_sizes: list[int] | None = None,
    group: Any = None,
    async_op: bool = False,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Split ``input`` along dim 0, send piece ``j`` to rank ``j``, receive into ``output``.

    Uneven splits are given by ``input_split_sizes`` / ``output_split_sizes`` (rows
    along dim 0, summing to ``input.size(0)`` / ``output.size(0)``); without them the
    split is even, like torch.
    """
    check_tensor(output, "output")
    check_tensor(input, "input")
    if not_member(group, "all_to_all_single"):
        return None
    world = dist.get_world_size(group)
    if (input_split_sizes or output_split_sizes) and _is_auto(codec):
        # auto decides from the call's size, which must be the same on every rank: with
        # split sizes the ranks' inputs may differ, so the call goes plain (module doc).
        codec = "none"

    def plain(a: bool) -> Any:
        return dist.all_to_all_single(
            output, input, output_split_sizes, input_split_sizes, group, a
        )

    def check(call: Call) -> str | None:
        if input.dim() == 0 or output.dim() == 0:
            return "all_to_all_single: input and output need at least one dimension"
        if input.dtype != output.dtype:
            return f"all_to_all_single: input is {input.dtype} but output is {output.dtype}"
        splits = (
            _splits(input_split_sizes, input.size(0), call.size, "input"),
            _splits(output_split_sizes, output.size(0), call.size, "output"),
        )
        problems = [p for p in splits if isinstance(p, str)]
        return "; ".join(problems) if problems else None

    def run(call: Call, comm: Comm) -> None:
        ins = _splits(input_split_sizes, input.size(0), call.size, "input")
        outs = _splits(output_split_sizes, output.size(0), call.size, "output")
        assert not isinstance(ins, str) and not isinstance(outs, str)  # `check` passed
        contiguous = (
            output
            if output.is_contiguous()
            else torch.empty_like(output, memory_format=torch.contiguous_format)
        )
        pieces = list(contiguous.split(outs))
        if _exchange_or_plain(call, comm, list(input.split(ins)), pieces, plain):
            write(output, contiguous)

    splits = _splits(input_split_sizes, input.size(0) if input.dim() else 0, world, "input")
    own = 0 if isinstance(splits, str) or not input.numel() else splits[dist.get_rank(group)]
    return execute(
        Request(
            "all_to_all_single",
            group,
            input,
            plain=plain,
            run=run,
            outputs=[output],
            tensors=[output, input],
            codec=codec,
            # This rank's own rows never leave it (as in bytes_wire).
            bytes_in=nbytes(input) - (own * nbytes(input) // input.size(0) if own else 0),
            check=check,
        ),
        async_op,
    )
