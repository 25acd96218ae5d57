"""Which ranks of a group share a host, and the intra-/inter-host subgroups: `of`.

A hierarchical collective needs two kinds of subgroups of its group ``G``
(``N = H * L`` ranks on ``H`` hosts with ``L`` ranks each):

- *intra*: the ``L`` ranks of this rank's host (fast link: NVLink, or the
  host's loopback in the emulation);
- *inter*: the ``H`` ranks, one per host, that have the same *local index*
  as this rank (the slow link: InfiniBand, Ethernet).

Where a rank lives is learned once per group, collectively: each rank makes
a host key, the group all-gathers one ``int64`` row per rank (a 63-bit hash
of the key and the rank's ``LOCAL_RANK``), and every rank derives the same
table from the same rows. The host key is, in this order:

1. ``GROUP_RANK`` (the node rank ``torchrun`` sets): ``"node:<GROUP_RANK>"``;
2. ``LOCAL_WORLD_SIZE`` (and ``LOCAL_RANK``, both set by ``torchrun``, by
   ``mp.spawn`` wrappers, or by hand to fake hosts in tests): the host of
   global rank ``r`` is the block of ``LOCAL_WORLD_SIZE`` ranks holding it,
   ``"block:<r - LOCAL_RANK>"`` (without ``LOCAL_RANK``: the block
   ``r // LOCAL_WORLD_SIZE``);
3. otherwise the host name (``socket.gethostname()``).

Hosts are numbered in the order of their first group rank; a rank's local
index is its position among its host's ranks in ascending global rank (not
``LOCAL_RANK``, which may be numbered differently in a subgroup). Both
subgroups list their ranks in ascending global rank, because that is the
rank order torch gives a ``new_group``: a rank's local index *is* its rank
in ``intra``, and its rank in ``inter`` is `Topology.inter_rank`, which
equals its host index only when hosts hold ascending blocks or interleave
(hosts ``{0, 3}`` and ``{1, 2}``: global rank 2 is host 1 but rank 0 of its
inter group). Any layout with the same number of ranks per host works:
contiguous blocks (``torchrun``), round-robin, or scattered.

Subgroups are built with ``torch.distributed.new_group`` and cached per
group rank tuple, so a second hierarchical call on the same group costs
nothing. For the default (world) group every rank creates every subgroup in
the same order, as torch requires of ``new_group``; for a subgroup ``G``
only ``G``'s members take part (``use_local_synchronization=True``), each
creating its own intra group, then its own inter group. The topology itself
is cached per (group, this rank's host key, ``LOCAL_WORLD_SIZE``), so changing
``LOCAL_WORLD_SIZE`` on every rank (tests faking other shapes) makes the next
call re-learn it.

Example::

    from commpress import topology
    topo = topology.of(None)          # collective over the world, once
    topo.hosts, topo.local_size, topo.host_index, topo.local_index
    topo.intra, topo.inter            # process groups (None for a 1-rank level)
    topo.by_local[j]                  # group ranks of local index j, in inter-group order
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError

__all__ = ["Topology", "host_key", "of", "shape", "clear_cache"]


@dataclass(frozen=True)
class Topology:
    """Where the ranks of one group live, and this rank's subgroups.

    Attributes:
        ranks: the group's global ranks, in group-rank order.
        host_of: host index (0 .. hosts-1) of each group rank.
        hosts: number of hosts ``H``.
        local_size: ranks per host ``L`` (every host has the same number; see `of`).
        host_index: this rank's host.
        local_index: this rank's position among its host's ranks.
        intra: the process group of this rank's host (None when ``L == 1``).
        inter: the process group of the ranks with this local index (None when ``H == 1``).
        intra_ranks: global ranks of ``intra``, in its rank order (ascending).
        inter_ranks: global ranks of ``inter``, in its rank order (ascending).
        inter_rank: this rank's rank in ``inter`` (not always ``host_index``).
        by_local: for each local index ``j``, the *group* ranks with that local index
            in the rank order of their inter group: ``by_local[j][p]`` is rank ``p`` of
            inter group ``j`` and rank ``j`` of its intra group. The data layout of the
            hierarchical reduce-scatter and all-gather.
    """

    ranks: tuple[int, ...]
    host_of: tuple[int, ...]
    hosts: int
    local_size: int
    host_index: int
    local_index: int
    intra: Any
    inter: Any
    intra_ranks: tuple[int, ...]
    inter_ranks: tuple[int, ...]
    inter_rank: int
    by_local: tuple[tuple[int, ...], ...]


def host_key(global_rank: int, environ: dict[str, str] | None = None) -> str:
    """This rank's host key (see the module docstring for the order of the sources)."""
    env = os.environ if environ is None else environ
    if env.get("GROUP_RANK", "").strip():
        return f"node:{env['GROUP_RANK'].strip()}"
    lws = env.get("LOCAL_WORLD_SIZE", "").strip()
    if lws:
        try:
            size = int(lws)
            local = env.get("LOCAL_RANK", "").strip()
            base = global_rank - int(local) if local else global_rank // size * size
        except ValueError:
            raise ConfigError(
                f"LOCAL_WORLD_SIZE={lws!r} / LOCAL_RANK={env.get('LOCAL_RANK')!r} are not "
                "integers; unset them or set them as torchrun does"
            ) from None
        if size < 1 or base < 0:
            raise ConfigError(
                f"LOCAL_WORLD_SIZE={lws!r} with LOCAL_RANK={env.get('LOCAL_RANK')!r} on global "
                f"rank {global_rank} is not a valid layout; expected LOCAL_WORLD_SIZE >= 1 and "
                "0 <= LOCAL_RANK <= rank"
            )
        return f"block:{base}"
    return f"host:{socket.gethostname()}"


_lock = threading.Lock()
_topologies: dict[tuple[str, str, str], Topology] = {}
_layouts: dict[tuple[str, str, str], _Layout] = {}
_subgroups: dict[tuple[int, ...], Any] = {}


def clear_cache() -> None:
    """Forget learned topologies (the subgroups stay: torch cannot un-create them cheaply)."""
    with _lock:
        _topologies.clear()
        _layouts.clear()


def _hash63(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _group_name(group: Any) -> str:
    pg = group if group is not None else dist.group.WORLD
    try:
        return str(pg.group_name)
    except (AttributeError, RuntimeError):
        return f"pg{id(pg)}"


def _is_world(group: Any) -> bool:
    return group is None or group is dist.GroupMember.WORLD


@dataclass(frozen=True)
class _Layout:
    """The gathered host of every group rank: what `of` and `shape` derive from."""

    ranks: tuple[int, ...]
    host_of: tuple[int, ...]
    members: tuple[tuple[int, ...], ...]  # group ranks of each host, ascending global rank


def _layout(group: Any, device: torch.device | str) -> tuple[tuple[str, str, str], _Layout]:
    """The group's `_Layout` and its cache key; collective (one all-gather) on first need."""
    rank = dist.get_rank()
    key = host_key(rank)
    # The layout variable is part of the key: with LOCAL_WORLD_SIZE changed from 2 to 4 the
    # host key of rank 0 stays "block:0" while rank 2's changes, and they must agree to re-learn.
    cache_key = (_group_name(group), key, os.environ.get("LOCAL_WORLD_SIZE", ""))
    with _lock:
        layout = _layouts.get(cache_key)
    if layout is not None:
        return cache_key, layout
    size = dist.get_world_size(group)
    ranks = tuple(range(size)) if _is_world(group) else tuple(dist.get_process_group_ranks(group))
    row = torch.tensor([_hash63(key)], dtype=torch.int64, device=device)
    out = torch.empty(size, dtype=torch.int64, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, row, group=group)
    first: dict[int, int] = {}
    host_of = tuple(first.setdefault(h, len(first)) for h in out.tolist())
    # Ascending global rank inside a host: the rank order of the intra group torch makes.
    members = tuple(
        tuple(sorted((r for r in range(size) if host_of[r] == h), key=ranks.__getitem__))
        for h in range(len(first))
    )
    layout = _Layout(ranks, host_of, members)
    with _lock:
        _layouts[cache_key] = layout
    return cache_key, layout


def shape(group: Any = None, device: torch.device | str = "cpu") -> tuple[int, int] | None:
    """``(hosts, ranks per host)`` of ``group``, or None when hosts hold different numbers
    of its ranks; collective on the first call per group (the all-gather of `of`, which it
    shares), and it creates no subgroup. `commpress.auto` asks it before calibrating."""
    _, layout = _layout(group, device)
    counts = {len(m) for m in layout.members}
    return (len(layout.members), counts.pop()) if len(counts) == 1 else None


def of(group: Any = None, device: torch.device | str = "cpu") -> Topology:
    """The `Topology` of ``group`` for this rank; collective on the first call per group.

    Args:
        group: a process group (None: the world). Every rank of it must call.
        device: where the one small all-gather runs (``"cuda"`` for NCCL groups).

    Raises:
        ConfigError: the hosts hold different numbers of the group's ranks (no
            two-level split exists; every rank raises alike).
    """
    cache_key, layout = _layout(group, device)
    with _lock:
        topo = _topologies.get(cache_key)
    if topo is not None:
        return topo
    ranks, host_of, members = layout.ranks, layout.host_of, layout.members
    hosts = len(members)
    counts = sorted({len(m) for m in members})
    if len(counts) != 1:
        listing = "; ".join(
            f"host {h}: global ranks {[ranks[r] for r in m]}" for h, m in enumerate(members)
        )
        raise ConfigError(
            f"hierarchical collectives need the same number of ranks on every host; this group "
            f"has {listing}. Use algorithm='two_phase', or launch the same number of ranks per "
            "host (torchrun --nproc-per-node)"
        )
    local_size = counts[0]
    me = ranks.index(dist.get_rank())
    host_index = host_of[me]
    local_index = members[host_index].index(me)
    intra_sets = [tuple(ranks[r] for r in m) for m in members]
    # Inter group j in its rank order (ascending global rank), as group ranks.
    by_local = tuple(
        tuple(sorted((m[j] for m in members), key=ranks.__getitem__)) for j in range(local_size)
    )
    inter_sets = [tuple(ranks[r] for r in col) for col in by_local]
    mine_intra, mine_inter = intra_sets[host_index], inter_sets[local_index]
    if _is_world(group):
        wanted = [*intra_sets, *inter_sets]  # every rank creates every group, same order
    else:
        wanted = [mine_intra, mine_inter]
    made = {s: _subgroup(s, local=not _is_world(group)) for s in wanted if len(s) > 1}
    topo = Topology(
        ranks=ranks,
        host_of=host_of,
        hosts=hosts,
        local_size=local_size,
        host_index=host_index,
        local_index=local_index,
        intra=made.get(mine_intra),
        inter=made.get(mine_inter),
        intra_ranks=mine_intra,
        inter_ranks=mine_inter,
        inter_rank=by_local[local_index].index(me),
        by_local=by_local,
    )
    with _lock:
        _topologies[cache_key] = topo
    return topo


def _subgroup(ranks: tuple[int, ...], local: bool) -> Any:
    with _lock:
        pg = _subgroups.get(ranks)
    if pg is not None:
        return pg
    pg = dist.new_group(list(ranks), use_local_synchronization=local)
    with _lock:
        _subgroups[ranks] = pg
    return pg
