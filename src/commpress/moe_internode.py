"""MoE dispatch and combine that cross each host once per token (DeepEP's internode pattern).

Same contract as `commpress.moe` (same arguments, same rows received in the
same order, same `moe.DispatchLayout` fields), different traffic. The flat
`moe.dispatch` sends a token once per chosen expert, so a token whose eight
experts live on another host crosses the slow link eight times. Here a token
crosses to each destination *host* at most once, and that host forwards it
to the ranks owning its experts:

1. *Across hosts* (the inter subgroup of `commpress.topology`, compressed
   with ``codec``): rank ``s`` sends token ``t`` once to each host holding
   one of its experts, to the rank there with ``s``'s local index (its
   *forwarder*; on ``s``'s own host that is ``s`` itself, so every token is
   encoded once, as in the flat path), together with the token's ``k``
   expert ids (``int32``, lossless).
2. *Inside the host* (the intra subgroup, uncompressed): the forwarder sends
   the decoded row to each rank of its host that owns one of the token's
   experts, once per slot, as flat does; each rank puts the rows from its
   host's forwarders into the flat order (source rank, then local expert,
   then slot).

``combine`` runs it backwards: each rank returns its expert outputs to the
forwarders (inside the host, uncompressed); a forwarder sums, per token, the
outputs of that token's experts on its host, weighted by the gate weights it
receives from the source (``k`` values per crossing row, lossless); one
compressed row per (token, host) crosses back, and the source sums the rows
of its hosts.

Summation order
    ``out[t] = sum over hosts g (in inter-group rank order) of
    P_g[t]``, ``P_g[t] = sum over the slots j of t whose expert is on g
    (ascending j) of w[t, j] * y[t, j]``, accumulated in ``float32`` (in
    ``y.dtype`` for float64), ``P_g`` cast to ``y.dtype`` and passed through
    ``codec`` before the outer sum. Flat combine sums all ``k`` slots in one
    reduction, so the results agree up to float rounding (exactly where the
    sums are exact, e.g. small integers and dyadic weights) plus the codec's
    error on ``P_g`` instead of on each slot.

Rows and bytes that cross hosts
    For rank ``s`` on host ``h``, with ``F_s`` = number of its valid slots
    whose expert is on another host and ``I_s`` = sum over its tokens of the
    number of *other hosts* holding one of the token's experts (``I_s <=
    F_s``; equal when no two slots of a token share a remote host), one
    dispatch + combine puts on the inter-host links, for this rank's tokens::

        flat:      sum_{d not on h} [b_D(n_sd) + b_C(n_sd)]                  (sum n_sd = F_s)
        internode: sum_{g != h} [b_D(m_sg) + 4 k m_sg + a k m_sg + b_C(m_sg)]  (sum m_sg = I_s)

    where ``n_sd`` are the rows flat sends to rank ``d``, ``m_sg`` the rows
    sent to host ``g``, ``b_D`` / ``b_C`` the packed bytes of that many rows
    under the dispatch / combine codec (`wire.packed_nbytes`: fp8 is ``H +
    4 H / 128`` bytes per row, bf16 ``2 H``, plus one ~64-byte header per
    piece; ``codec="none"`` is the raw rows), ``4 k`` the int32 expert ids of
    each crossing row and ``a k`` its gate weights (``a`` = 4 for float32
    accumulation, 8 for float64; 0 when ``combine`` gets no weights). Add a
    few int64 counts and descriptors per call. `crossings` counts ``F_s`` and
    ``I_s``; `Crossings.nbytes` evaluates the two formulas.

Fallback
    With one host, or one rank per host, there is nothing to forward: both
    functions call `commpress.moe.dispatch` / `commpress.moe.combine`, and the
    handle's layout is a plain `moe.DispatchLayout`. (With one rank per host
    the internode path would still merge a token's slots that go to one rank;
    the flat path sends those once per slot.) ``combine`` given a flat
    handle runs `moe.combine`; `moe.combine` given this module's handle runs
    the flat return path, because `InternodeLayout` carries the flat fields.

Async
    ``dispatch(..., async_op=True)``: the counts and ids are exchanged at
    once (they size the buffers); the tokens cross hosts in the background;
    the intra-host forward runs when the handle is waited on (or polled and
    found complete), so every rank of a host must wait on it.
    ``combine(..., async_op=True)``: everything before the crossing back runs
    at once; the crossing back runs in the background; the handle's
    ``result()`` is ``[out]``.

Example::

    from commpress import moe_internode
    recv, handle = moe_internode.dispatch(x, topk_ids, num_experts=64)   # fp8 across hosts
    y = run_local_experts(recv, handle.layout.recv_expert_ids)
    out = moe_internode.combine(y, handle, weights=topk_weights)         # bf16 across hosts
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import moe, topology
from .errors import ConfigError
from .handle import Handle
from .moe import DispatchLayout
from .pipeline import control_device
from .registry import CodecLike

__all__ = ["dispatch", "combine", "crossings", "Crossings", "InternodeLayout"]


@dataclass(frozen=True, eq=False)
class InternodeLayout(DispatchLayout):
    """The `moe.DispatchLayout` of an internode dispatch, plus its two-level plan.

    The inherited fields hold exactly what `moe.dispatch` would have produced
    (``send_slots`` / ``send_splits`` describe the flat send this call replaced),
    so `moe.combine` accepts the handle too.

    Attributes:
        topo: the group's `commpress.topology.Topology`.
        inter_tokens: ``[N_x]`` int64, the token of each row sent to a forwarder, in
            send order (by inter rank, then token).
        inter_send_splits: rows sent to each inter rank (one per host).
        inter_recv_splits: rows received from each inter rank, as a forwarder.
        forward_rows: ``[N_f]`` int64, the received row each forwarded row copies, in
            intra send order (by destination, then source rank, expert, slot).
        forward_slots: ``[N_f]`` int64, the slot ``j`` of each forwarded row.
        forward_sum_order: ``[N_f]`` int64, the forwarded rows in (row, slot) order:
            the order ``combine`` adds them in.
        intra_send_splits: forwarded rows sent to each rank of this host.
        intra_recv_splits: rows received from each forwarder of this host.
        order: ``[N_recv]`` int64, the intra-received row of each delivered row.
        cross_rows: rows this rank sent to other hosts (its ``I_s``; see `crossings`).
    """

    topo: topology.Topology
    inter_tokens: torch.Tensor
    inter_send_splits: list[int]
    inter_recv_splits: list[int]
    forward_rows: torch.Tensor
    forward_slots: torch.Tensor
    forward_sum_order: torch.Tensor
    intra_send_splits: list[int]
    intra_recv_splits: list[int]
    order: torch.Tensor
    cross_rows: int


@dataclass(frozen=True)
class Crossings:
    """Rows one rank's dispatch sends to other hosts, flat and internode.

    Attributes:
        hosts: ``H`` hosts of the group.
        local_size: ``L`` ranks per host.
        topk: ``k`` slots per token.
        flat_pieces: rows flat `moe.dispatch` sends to each rank on another host.
        internode_pieces: rows `dispatch` sends to each other host (the flat pieces
            when it falls back).
    """

    hosts: int
    local_size: int
    topk: int
    flat_pieces: tuple[int, ...]
    internode_pieces: tuple[int, ...]

    @property
    def flat(self) -> int:
        """``F_s``: one row per valid slot whose expert is on another host."""
        return sum(self.flat_pieces)

    @property
    def internode(self) -> int:
        """``I_s``: one row per (token, other host holding one of its experts)."""
        return sum(self.internode_pieces)

    def nbytes(
        self,
        hidden: int,
        dtype: torch.dtype = torch.float32,
        *,
        dispatch_codec: CodecLike = "fp8",
        combine_codec: CodecLike = "bf16",
        weights: bool = True,
    ) -> dict[str, int]:
        """Bytes of this rank's tokens on inter-host links per dispatch + combine.

        The formulas of the module docstring, for rows of ``hidden`` elements of
        ``dtype`` both ways (counts and descriptors left out).

        Returns:
            ``{"flat": bytes, "internode": bytes}``.

        Raises:
            ConfigError: a codec whose packed size depends on the data (no ``sections``).
        """
        acc = 8 if dtype == torch.float64 else 4
        meta = self.topk * (4 + (acc if weights else 0))
        fallback = self.hosts == 1 or self.local_size == 1

        def both(pieces: tuple[int, ...], per_row: int) -> int:
            return sum(
                _packed(dispatch_codec, n, hidden, dtype)
                + _packed(combine_codec, n, hidden, dtype)
                + per_row * n
                for n in pieces
            )

        flat = both(self.flat_pieces, 0)
        return {"flat": flat, "internode": flat if fallback else both(self.internode_pieces, meta)}


def _packed(codec: CodecLike, rows: int, hidden: int, dtype: torch.dtype) -> int:
    """Packed bytes of a ``[rows, hidden]`` piece under ``codec``, without encoding it."""
    from . import wire
    from .registry import get_codec

    c = get_codec(codec)
    if not rows:
        return 0
    if c.codec_id == "none":
        return rows * hidden * torch.empty(0, dtype=dtype).element_size()
    sections = c.sections(rows * hidden, dtype)
    one = c.sections(hidden, dtype)
    if sections is None or one is None:
        raise ConfigError(
            f"Crossings.nbytes: codec {c.spec!r} packs a data-dependent number of bytes; "
            "give a fixed-size codec (fp8, bf16, int8, none)"
        )

    def body(secs: list[tuple[torch.dtype, int]]) -> int:
        return sum(-(-n * torch.empty(0, dtype=d).element_size() // 8) * 8 for d, n in secs)

    header = wire.packed_nbytes(c.encode(torch.zeros(1, hidden, dtype=dtype))) - body(one)
    return header + body(sections)


@dataclass(frozen=True)
class _Routes:
    """Where each expert lives, as lookup tables over expert ids and group ranks."""

    owner: torch.Tensor  # [E] group rank owning each expert
    expert_host: torch.Tensor  # [E] host of that rank
    local_of: torch.Tensor  # [W] local index of each group rank
    inter_of_host: torch.Tensor  # [H] this rank's inter-group rank on each host
    inter_ranks: torch.Tensor  # [H] group rank of each rank of this rank's inter group
    host_ranks: tuple[int, ...]  # group ranks of this host, by local index


def _routes(topo: topology.Topology, bounds: tuple[int, ...], device: torch.device) -> _Routes:
    world = len(topo.ranks)
    b = torch.tensor(bounds, dtype=torch.int64)
    owner = torch.bucketize(torch.arange(bounds[-1]), b[1:], right=True)
    host_of = torch.tensor(topo.host_of, dtype=torch.int64)
    local_of = torch.empty(world, dtype=torch.int64)
    for j, column in enumerate(topo.by_local):
        local_of[list(column)] = j
    mine = topo.by_local[topo.local_index]
    inter_of_host = torch.empty(topo.hosts, dtype=torch.int64)
    inter_of_host[host_of[list(mine)]] = torch.arange(topo.hosts)
    host_ranks = tuple(
        next(r for r in column if topo.host_of[r] == topo.host_index) for column in topo.by_local
    )
    return _Routes(
        owner=owner.to(device),
        expert_host=host_of[owner].to(device),
        local_of=local_of.to(device),
        inter_of_host=inter_of_host.to(device),
        inter_ranks=torch.tensor(mine, dtype=torch.int64, device=device),
        host_ranks=host_ranks,
    )


def _topology(group: Any, caller: str) -> topology.Topology:
    try:
        return topology.of(group, device=control_device(group))
    except ConfigError as exc:
        raise ConfigError(
            f"{caller}: the internode path needs the same number of ranks on every host ({exc}); "
            "use commpress.moe for this group"
        ) from exc


def _to_hosts(ids: torch.Tensor, routes: _Routes, hosts: int) -> torch.Tensor:
    """``[T, H]`` bool: token ``t`` has an expert on the host of inter rank ``p``."""
    valid = ids >= 0
    dest = torch.where(
        valid, routes.inter_of_host[routes.expert_host[ids.clamp(min=0)]], hosts
    )  # ``hosts``: a dropped slot, in a column cut off below
    hit = torch.zeros(ids.shape[0], hosts + 1, dtype=torch.bool, device=ids.device)
    return hit.scatter_(1, dest, True)[:, :hosts]


def crossings(expert_ids: torch.Tensor, num_experts: int, *, group: Any = None) -> Crossings:
    """Count the rows this rank's dispatch of ``expert_ids`` sends to other hosts.

    Collective the first time per group (it learns the topology, as `dispatch` does);
    afterwards local.

    Args:
        expert_ids: ``[T, k]`` (or ``[T]``) expert ids as for `dispatch` (``-1``: dropped).
        num_experts: total experts ``E``.
        group: process group (None: the default group).

    Returns:
        A `Crossings`: ``.flat`` (``F_s``) and ``.internode`` (``I_s``), per destination
        in ``.flat_pieces`` / ``.internode_pieces``.

    Raises:
        ConfigError: bad ids, or no process group.
    """
    if not isinstance(expert_ids, torch.Tensor) or expert_ids.dim() not in (1, 2):
        raise ConfigError(
            "crossings: expert_ids must be an integer tensor of shape [T] or [T, k], got "
            f"{type(expert_ids).__name__} of shape {tuple(getattr(expert_ids, 'shape', ()))}"
        )
    ids = moe._check_inputs(torch.empty(expert_ids.shape[0], 0), expert_ids, num_experts)
    world, _ = moe._world(group)
    topo = _topology(group, "crossings")
    routes = _routes(topo, moe.expert_bounds(num_experts, world), ids.device)
    valid = ids[ids >= 0]
    per_rank = torch.bincount(routes.owner[valid], minlength=world)
    flat = tuple(int(per_rank[r]) for r in range(world) if topo.host_of[r] != topo.host_index)
    if topo.hosts == 1 or topo.local_size == 1:
        return Crossings(topo.hosts, topo.local_size, ids.shape[1], flat, flat)
    per_host = _to_hosts(ids, routes, topo.hosts).sum(0)
    internode = tuple(int(per_host[p]) for p in range(topo.hosts) if p != topo.inter_rank)
    return Crossings(topo.hosts, topo.local_size, ids.shape[1], flat, internode)


def dispatch(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    num_experts: int,
    *,
    group: Any = None,
    codec: CodecLike = "fp8",
    async_op: bool = False,
) -> tuple[torch.Tensor, Handle]:
    """Send each token once to each host of its experts; that host fans it out.

    Args:
        x: ``[T, H]`` tokens of this rank (floating for lossy codecs).
        expert_ids: ``[T, k]`` (or ``[T]``) integer expert ids in ``[0, num_experts)``,
            ``-1`` for a dropped slot.
        num_experts: total experts ``E`` across the group (owned as in `moe.expert_bounds`).
        group: process group (None: the default group).
        codec: codec of the inter-host step; default ``"fp8"``. Inside a host the
            decoded rows travel uncompressed.
        async_op: return once the tokens are on their way across hosts; the received
            tensor is valid after ``handle.wait()`` (which runs the intra-host step).

    Returns:
        ``(received, handle)`` as `moe.dispatch`: ``received`` is ``[N_recv, H]`` of
        ``x.dtype``, grouped by source rank then local expert then slot; ``handle`` is
        a `commpress.Handle` whose ``layout`` is an `InternodeLayout` (a plain
        `moe.DispatchLayout` on the fallback, see the module docstring).

    Raises:
        ConfigError: bad shapes, ids out of range, no process group, a bad codec, or
            hosts holding different numbers of the group's ranks.
    """
    from . import distributed as cdist

    ids = moe._check_inputs(x, expert_ids, num_experts)
    spec = moe._spec(codec)
    world, rank = moe._world(group)
    topo = _topology(group, "dispatch")
    if topo.hosts == 1 or topo.local_size == 1:
        return moe.dispatch(x, expert_ids, num_experts, group=group, codec=codec, async_op=async_op)
    bounds = moe.expert_bounds(num_experts, world)
    num_tokens, topk = ids.shape
    hosts, local = topo.hosts, topo.local_size
    device = x.device
    ids = ids.to(device)
    routes = _routes(topo, bounds, device)
    cdev = control_device(group)

    # The flat fields, so that the layout reads like moe.dispatch's (and moe.combine works).
    flat_ids = ids.reshape(-1)
    keep = (flat_ids >= 0).nonzero().squeeze(1)
    send_slots = keep[torch.argsort(flat_ids[keep], stable=True)]
    per_expert = torch.bincount(flat_ids[send_slots].cpu(), minlength=num_experts)
    send_splits = [int(per_expert[bounds[r] : bounds[r + 1]].sum()) for r in range(world)]

    # Step 1 plan: each token once to each host, by inter rank then token.
    to_host = _to_hosts(ids, routes, hosts)
    inter_dest, inter_tokens = to_host.t().nonzero(as_tuple=True)
    inter_send = torch.bincount(inter_dest, minlength=hosts).cpu()
    inter_send_splits = [int(n) for n in inter_send]
    inter_recv = torch.empty(hosts, dtype=torch.int64, device=cdev)
    cdist.all_to_all_single(inter_recv, inter_send.to(cdev), group=topo.inter, codec="none")
    inter_recv_splits = [int(n) for n in inter_recv.cpu()]
    recv_ids = torch.empty((sum(inter_recv_splits), topk), dtype=torch.int32, device=device)
    cdist.all_to_all_single(
        recv_ids,
        ids.index_select(0, inter_tokens).to(torch.int32),
        output_split_sizes=inter_recv_splits,
        input_split_sizes=inter_send_splits,
        group=topo.inter,
        codec="none",
    )

    # Step 2 plan (as a forwarder): one row per slot on this host, sorted by destination,
    # then source rank, expert, slot; rows from one source arrive in token order.
    sources = routes.inter_ranks.repeat_interleave(
        torch.tensor(inter_recv_splits, device=device), output_size=recv_ids.shape[0]
    )
    experts = recv_ids.long()
    here = (experts >= 0) & (routes.expert_host[experts.clamp(min=0)] == topo.host_index)
    rows, slots = here.nonzero(as_tuple=True)  # (row, slot) order
    fwd_experts = experts[rows, slots]
    fwd_sources = sources[rows]
    dest_local = routes.local_of[routes.owner[fwd_experts]]
    key = (dest_local * world + fwd_sources) * num_experts + fwd_experts
    fwd = torch.argsort(key, stable=True)
    forward_rows, forward_slots = rows[fwd], slots[fwd]
    intra_send_splits = [int(n) for n in torch.bincount(dest_local, minlength=local).cpu()]
    # Per destination, the (source, expert) counts of its rows: it rebuilds the flat order.
    per_pair = torch.bincount(
        (fwd_sources * num_experts + fwd_experts).cpu(), minlength=world * num_experts
    ).view(world, num_experts)
    host_bounds = [(bounds[d], bounds[d + 1]) for d in routes.host_ranks]
    mine = bounds[rank + 1] - bounds[rank]
    pair_counts = torch.empty(local * world * mine, dtype=torch.int64, device=cdev)
    cdist.all_to_all_single(
        pair_counts,
        torch.cat([per_pair[:, lo:hi].reshape(-1) for lo, hi in host_bounds]).to(cdev),
        output_split_sizes=[world * mine] * local,
        input_split_sizes=[world * (hi - lo) for lo, hi in host_bounds],
        group=topo.intra,
        codec="none",
    )
    by_forwarder = pair_counts.cpu().view(local, world, mine)
    recv_counts = by_forwarder.sum(0)
    intra_recv_splits = [int(n) for n in by_forwarder.sum((1, 2))]
    blocks = torch.arange(world * mine).repeat(local)
    order = torch.argsort(
        torch.repeat_interleave(blocks, by_forwarder.reshape(-1)), stable=True
    ).to(device)
    local_ids = torch.arange(bounds[rank], bounds[rank + 1], dtype=torch.int64)

    layout = InternodeLayout(
        group=group,
        num_experts=num_experts,
        bounds=bounds,
        num_tokens=num_tokens,
        topk=topk,
        send_slots=send_slots,
        send_splits=send_splits,
        recv_splits=[int(n) for n in recv_counts.sum(1)],
        recv_expert_ids=torch.repeat_interleave(
            local_ids.repeat(world), recv_counts.reshape(-1)
        ).to(device),
        tokens_per_expert=recv_counts.sum(0),
        codec=spec,
        topo=topo,
        inter_tokens=inter_tokens,
        inter_send_splits=inter_send_splits,
        inter_recv_splits=inter_recv_splits,
        forward_rows=forward_rows,
        forward_slots=forward_slots,
        forward_sum_order=torch.argsort(forward_rows * topk + forward_slots),
        intra_send_splits=intra_send_splits,
        intra_recv_splits=intra_recv_splits,
        order=order,
        cross_rows=inter_tokens.numel() - inter_send_splits[topo.inter_rank],
    )

    arrived = x.new_empty((recv_ids.shape[0], x.shape[1]))
    work = cdist.all_to_all_single(
        arrived,
        x.index_select(0, inter_tokens),
        output_split_sizes=inter_recv_splits,
        input_split_sizes=inter_send_splits,
        group=topo.inter,
        async_op=async_op,
        codec=codec,
    )
    received = x.new_empty((layout.num_received, x.shape[1]))

    def forward() -> list[torch.Tensor]:
        if work is not None:
            work.wait()
        inner = x.new_empty(received.shape)
        cdist.all_to_all_single(
            inner,
            arrived.index_select(0, forward_rows),
            output_split_sizes=intra_recv_splits,
            input_split_sizes=intra_send_splits,
            group=topo.intra,
            codec="none",
        )
        torch.index_select(inner, 0, order, out=received)
        return [received]

    if work is None:
        return received, Handle.done(forward(), layout=layout)
    return received, Handle(completer=forward, poll=work.is_completed, layout=layout)


def combine(
    y: torch.Tensor,
    handle: Handle,
    *,
    weights: torch.Tensor | None = None,
    codec: CodecLike = "bf16",
    async_op: bool = False,
) -> torch.Tensor | Handle:
    """Return expert outputs inside each host, sum them per (token, host), cross back once.

    Args:
        y: ``[N_recv, H']`` expert outputs, one row per row ``dispatch`` delivered, same order.
        handle: the handle the matching `dispatch` returned (a `moe.dispatch` handle runs
            `moe.combine`).
        weights: ``[T, k]`` (or ``[T]``) gate weights; each slot's output is multiplied by
            its weight before the sums. None: plain sum.
        codec: codec of the inter-host step; default ``"bf16"``.
        async_op: return a `commpress.Handle` once the sums are crossing back; its
            ``result()`` is ``[out]``.

    Returns:
        ``out``, a ``[T, H']`` tensor of ``y.dtype`` (or the `commpress.Handle`); rows of
        tokens whose slots were all dropped are zero. The summation order is in the
        module docstring.

    Raises:
        ConfigError: ``y`` or ``weights`` has the wrong shape, ``handle`` is not what
            `dispatch` returned, or a bad codec.
    """
    from . import distributed as cdist

    layout = getattr(handle, "layout", None)
    if isinstance(layout, DispatchLayout) and not isinstance(layout, InternodeLayout):
        return moe.combine(y, handle, weights=weights, codec=codec, async_op=async_op)
    moe._spec(codec)
    if not isinstance(layout, InternodeLayout):
        raise ConfigError(
            f"combine: handle must be the handle moe_internode.dispatch returned, got {handle!r}"
        )
    handle.wait()
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != layout.num_received:
        raise ConfigError(
            f"combine: y must be [N_recv, H] with N_recv={layout.num_received} (rows delivered "
            f"by dispatch), got shape {tuple(getattr(y, 'shape', ()))}"
        )
    T, k = layout.num_tokens, layout.topk
    w = None
    if weights is not None:
        w = weights.unsqueeze(1) if weights.dim() == 1 else weights
        if tuple(w.shape) != (T, k):
            raise ConfigError(
                f"combine: weights must have shape [{T}, {k}], got {tuple(weights.shape)}"
            )
    topo, width = layout.topo, y.shape[1]
    acc = torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else y.dtype
    arrived = sum(layout.inter_recv_splits)

    slot_weights = None
    if w is not None:
        w_arrived = torch.empty((arrived, k), dtype=acc, device=y.device)
        cdist.all_to_all_single(
            w_arrived,
            w.to(device=y.device, dtype=acc).index_select(0, layout.inter_tokens),
            output_split_sizes=layout.inter_recv_splits,
            input_split_sizes=layout.inter_send_splits,
            group=topo.inter,
            codec="none",
        )
        slot_weights = w_arrived[layout.forward_rows, layout.forward_slots].unsqueeze(1)

    back = y.new_empty((layout.forward_rows.numel(), width))
    cdist.all_to_all_single(
        back,
        y.new_empty(y.shape).index_copy_(0, layout.order, y),  # back into arrival order
        output_split_sizes=layout.intra_send_splits,
        input_split_sizes=layout.intra_recv_splits,
        group=topo.intra,
        codec="none",
    )
    s = layout.forward_sum_order
    contrib = back.index_select(0, s).to(acc)  # a new tensor: scaled in place below
    if slot_weights is not None:
        contrib.mul_(slot_weights.index_select(0, s))
    partial = y.new_zeros((arrived, width), dtype=acc)
    partial.index_add_(0, layout.forward_rows.index_select(0, s), contrib)

    returned = y.new_empty((layout.inter_tokens.numel(), width))
    work = cdist.all_to_all_single(
        returned,
        partial.to(y.dtype),
        output_split_sizes=layout.inter_send_splits,
        input_split_sizes=layout.inter_recv_splits,
        group=topo.inter,
        async_op=async_op,
        codec=codec,
    )

    def finish() -> torch.Tensor:
        out = y.new_zeros((T, width), dtype=acc)
        out.index_add_(0, layout.inter_tokens, returned.to(acc))  # by inter rank, then token
        return out.to(y.dtype)

    if work is None:
        return Handle.done([finish()]) if async_op else finish()
    return Handle(completer=lambda: (work.wait(), [finish()])[1], poll=work.is_completed)
