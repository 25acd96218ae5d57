"""MoE token dispatch and combine over compressed all-to-all (the DeepSeek-V3 recipe).

``dispatch`` sends every token to the ranks that own its chosen experts;
``combine`` brings the expert outputs back and sums them per token, weighted
by the gate weights. By default dispatch travels in FP8 e4m3 with one scale
per 128 elements and combine in BF16, as in DeepSeek-V3; any codec spec can
be given instead (``codec="none"`` gives exact results).

Layout
    ``num_experts`` experts are partitioned contiguously over the ``W`` ranks
    of ``group``: rank ``r`` owns experts ``[r*E//W, (r+1)*E//W)`` (equal
    blocks when ``W`` divides ``E``). A token with top-k expert ids
    ``expert_ids[t] = (e0, ..., ek-1)`` is sent once per chosen expert, also
    when two of them live on the same rank. An id of ``-1`` marks a dropped
    slot (capacity overflow): nothing is sent for it and it adds nothing in
    ``combine``.

What a rank receives
    Rows grouped by source rank (rank 0's first), and inside each source's
    block by local expert. ``handle.layout.recv_expert_ids[i]`` is the global
    expert of received row ``i``; ``handle.layout.tokens_per_expert[j]``
    counts the rows for local expert ``j``. The expert output given to ``combine`` must have one
    row per received row, in the same order.

Communication: one small all-to-all of per-expert counts (int64, lossless),
then one all-to-all of the tokens with uneven split sizes
(`commpress.distributed.all_to_all_single`). ``combine`` runs the reverse
all-to-all.

Both return a `commpress.Handle` (a ``torch.distributed.Work``): ``dispatch``
the one whose ``layout`` (a `DispatchLayout`) ``combine`` needs, complete at
once unless ``async_op=True``; ``combine(..., async_op=True)`` one whose
``result()`` is ``[out]``.

Example::

    import commpress.moe as moe
    recv, handle = moe.dispatch(x, topk_ids, num_experts=8)         # fp8 on the wire
    y = run_local_experts(recv, handle.layout.recv_expert_ids)
    out = moe.combine(y, handle, weights=topk_weights)               # bf16 on the wire
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError
from .handle import Handle
from .pipeline import control_device
from .registry import CodecLike

__all__ = ["dispatch", "combine", "DispatchLayout", "expert_bounds"]


def expert_bounds(num_experts: int, world_size: int) -> tuple[int, ...]:
    """``world_size + 1`` boundaries: rank ``r`` owns experts ``[b[r], b[r+1])``."""
    return tuple(r * num_experts // world_size for r in range(world_size + 1))


@dataclass(frozen=True, eq=False)
class DispatchLayout:
    """Everything ``combine`` needs to send expert outputs back, plus the expert layout.

    The ``layout`` of the `commpress.Handle` that ``dispatch`` returns.

    Attributes:
        group: the process group of the exchange (None: the default group).
        num_experts: total number of experts ``E``.
        bounds: expert boundaries per rank (see `expert_bounds`).
        num_tokens: ``T``, tokens this rank dispatched.
        topk: ``k``, expert slots per token.
        send_slots: ``[N_send]`` int64, the slot ``t*k + j`` of each row sent, in send
            order (sorted by destination rank, then by expert).
        send_splits: rows sent to each rank.
        recv_splits: rows received from each rank.
        recv_expert_ids: ``[N_recv]`` int64, global expert id of each received row.
        tokens_per_expert: ``[E_local]`` int64, received rows per local expert.
        codec: spec of the codec the tokens travelled with.
    """

    group: Any
    num_experts: int
    bounds: tuple[int, ...]
    num_tokens: int
    topk: int
    send_slots: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    recv_expert_ids: torch.Tensor
    tokens_per_expert: torch.Tensor
    codec: str

    @property
    def num_received(self) -> int:
        """Rows this rank received, ``N_recv``."""
        return sum(self.recv_splits)


def _world(group: Any) -> tuple[int, int]:
    if not dist.is_initialized():
        raise ConfigError(
            "commpress.moe needs an initialized process group; call "
            "torch.distributed.init_process_group first"
        )
    return dist.get_world_size(group), dist.get_rank(group)


def _check_inputs(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ConfigError(
            f"dispatch: x must be a [T, H] tensor, got shape {tuple(getattr(x, 'shape', ()))}"
        )
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ConfigError(f"dispatch: num_experts must be a positive int, got {num_experts!r}")
    if (
        not isinstance(expert_ids, torch.Tensor)
        or expert_ids.dtype.is_floating_point
        or (expert_ids.dtype in (torch.bool, torch.complex64, torch.complex128))
    ):
        raise ConfigError("dispatch: expert_ids must be an integer tensor of shape [T] or [T, k]")
    ids = expert_ids.unsqueeze(1) if expert_ids.dim() == 1 else expert_ids
    if ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ConfigError(
            f"dispatch: expert_ids must have shape [T] or [T, k] with T={x.shape[0]}, "
            f"got {tuple(expert_ids.shape)}"
        )
    ids = ids.to(torch.int64)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= num_experts):
        raise ConfigError(
            f"dispatch: expert ids must lie in [0, {num_experts}) (or be -1 for a dropped slot), "
            f"got values in [{int(ids.min())}, {int(ids.max())}]"
        )
    return ids


def dispatch(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    *,
    group: Any = None,
    codec: CodecLike = "fp8",
    async_op: bool = False,
) -> tuple[torch.Tensor, Handle]:
    """Send each token to the ranks owning its experts.

    Args:
        x: ``[T, H]`` tokens of this rank (floating for lossy codecs).
        expert_ids: ``[T, k]`` (or ``[T]``) integer expert ids in ``[0, num_experts)``,
            ``-1`` for a dropped slot.
        num_experts: total experts ``E`` across the group.
        group: process group (None: the default group).
        codec: codec for the tokens; default ``"fp8"`` (e4m3, a scale per 128 elements).
        async_op: return at once; the received tensor is valid after ``handle.wait()``.
            The count exchange before it is always synchronous (it sizes the buffer).

    Returns:
        ``(received, handle)``: ``received`` is ``[N_recv, H]`` of ``x.dtype``, grouped by
        source rank then local expert; ``handle`` is a `commpress.Handle` (already
        complete unless ``async_op``) whose ``result()`` is ``[received]`` and whose
        ``layout`` is the `DispatchLayout` for ``combine``.

    Raises:
        ConfigError: bad shapes, ids out of range, no process group, or a bad codec.
    """
    from . import distributed as cdist

    ids = _check_inputs(x, expert_ids, num_experts)
    spec = _spec(codec)  # a bad spec fails here, before any communication
    world, rank = _world(group)
    bounds = expert_bounds(num_experts, world)
    num_tokens, topk = ids.shape
    device = x.device

    flat = ids.reshape(-1)
    # Sorting the slots by expert sorts them by destination rank too (experts are contiguous).
    keep = (flat >= 0).nonzero().squeeze(1)
    order = torch.argsort(flat[keep], stable=True)
    send_slots = keep[order]
    send_experts = flat[send_slots]

    per_expert = torch.bincount(send_experts.cpu(), minlength=num_experts).to(torch.int64)
    send_splits = [int(per_expert[bounds[r] : bounds[r + 1]].sum()) for r in range(world)]
    local = bounds[rank + 1] - bounds[rank]
    recv_counts = torch.empty(world * local, dtype=torch.int64)
    count_device = control_device(group)
    counts_out = recv_counts.to(count_device)
    cdist.all_to_all_single(
        counts_out,
        per_expert.to(count_device),
        output_split_sizes=[local] * world,
        input_split_sizes=[bounds[r + 1] - bounds[r] for r in range(world)],
        group=group,
        codec="none",
    )
    recv_counts = counts_out.cpu().view(world, local)
    recv_splits = [int(c) for c in recv_counts.sum(1)]
    local_ids = torch.arange(bounds[rank], bounds[rank + 1], dtype=torch.int64)
    recv_expert_ids = torch.repeat_interleave(local_ids.repeat(world), recv_counts.reshape(-1))

    send_rows = x.index_select(0, torch.div(send_slots, topk, rounding_mode="floor").to(device))
    received = x.new_empty((sum(recv_splits), x.shape[1]))
    work = cdist.all_to_all_single(
        received,
        send_rows,
        output_split_sizes=recv_splits,
        input_split_sizes=send_splits,
        group=group,
        async_op=async_op,
        codec=codec,
    )
    layout = DispatchLayout(
        group=group,
        num_experts=num_experts,
        bounds=bounds,
        num_tokens=num_tokens,
        topk=topk,
        send_slots=send_slots.to(device),
        send_splits=send_splits,
        recv_splits=recv_splits,
        recv_expert_ids=recv_expert_ids.to(device),
        tokens_per_expert=recv_counts.sum(0),
        codec=spec,
    )
    if work is None:
        return received, Handle.done([received], layout=layout)
    return received, Handle(
        completer=lambda: (work.wait(), [received])[1], poll=work.is_completed, layout=layout
    )


def combine(
    y: torch.Tensor,
    handle: Handle,
    *,
    weights: torch.Tensor | None = None,
    codec: CodecLike = "bf16",
    async_op: bool = False,
) -> torch.Tensor | Handle:
    """Send expert outputs back to the tokens' ranks and sum them per token.

    Args:
        y: ``[N_recv, H']`` expert outputs, one row per row ``dispatch`` delivered, same order.
        handle: the handle the matching ``dispatch`` returned (its ``layout``).
        weights: ``[T, k]`` (or ``[T]``) gate weights; each slot's output is multiplied by
            its weight before the sum over ``k``. None: plain sum.
        codec: codec for the way back; default ``"bf16"``.
        async_op: return a `commpress.Handle` at once; its ``result()`` is ``[out]``.

    Returns:
        ``out``, a ``[T, H']`` tensor of ``y.dtype`` (or the `commpress.Handle`). Rows of
        tokens whose slots were all dropped are zero.

    Raises:
        ConfigError: ``y`` or ``weights`` has the wrong shape, or ``handle`` is not what
            ``dispatch`` returned.
    """
    from . import distributed as cdist

    _spec(codec)
    layout = getattr(handle, "layout", None)
    if not isinstance(layout, DispatchLayout):
        raise ConfigError(
            f"combine: handle must be the handle moe.dispatch returned, got {handle!r}"
        )
    handle.wait()
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != layout.num_received:
        raise ConfigError(
            f"combine: y must be [N_recv, H] with N_recv={layout.num_received} (rows delivered "
            f"by dispatch), got shape {tuple(getattr(y, 'shape', ()))}"
        )
    T, k = layout.num_tokens, layout.topk
    if weights is not None:
        w = weights.unsqueeze(1) if weights.dim() == 1 else weights
        if tuple(w.shape) != (T, k):
            raise ConfigError(
                f"combine: weights must have shape [{T}, {k}], got {tuple(weights.shape)}"
            )

    back = y.new_empty((sum(layout.send_splits), y.shape[1]))
    work = cdist.all_to_all_single(
        back,
        y.contiguous(),
        output_split_sizes=layout.send_splits,
        input_split_sizes=layout.recv_splits,
        group=layout.group,
        async_op=async_op,
        codec=codec,
    )

    def finish() -> torch.Tensor:
        # Scatter each returned row to its (token, slot) place, then reduce over slots in
        # slot order, so the sum does not depend on how slots were routed.
        acc_dtype = torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else y.dtype
        slots = y.new_zeros((T * k, y.shape[1]), dtype=acc_dtype)
        slots.index_copy_(0, layout.send_slots, back.to(acc_dtype))
        slots = slots.view(T, k, y.shape[1])
        if weights is not None:
            slots = slots * w.to(acc_dtype).unsqueeze(-1)
        return slots.sum(1).to(y.dtype)

    if async_op:
        return Handle(completer=lambda: (work.wait(), [finish()])[1], poll=work.is_completed)
    return finish()


def _spec(codec: CodecLike) -> str:
    from .registry import get_codec

    return get_codec(codec).spec
