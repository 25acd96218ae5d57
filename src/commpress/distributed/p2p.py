"""Compressed point-to-point: send, recv, isend, irecv (`commpress.algorithms.transport`).

A send encodes on the calling thread, so sends stay in issue order, and
posts the transfer; a receive posts its first message at once and fetches
the payload when the descriptor arrives. Neither runs on the engine queue:
point-to-point calls pair with one peer, not the group.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.distributed as dist

from ..algorithms import transport
from ..engine import Handle
from ..errors import CollectiveError, CommpressError, ConfigError
from ..registry import CodecLike
from ..stats import record
from .call import Call, check_tensor, not_member, root_rank, to_global

__all__ = ["send", "recv", "isend", "irecv"]


def _peer(op: str, group: Any, name: str, global_rank: int | None, group_rank: int | None) -> int:
    peer = root_rank(op, group, name, global_rank, group_rank)
    if peer == dist.get_rank(group):
        raise ConfigError(
            f"{op}: {name} is this rank itself ({peer}); a rank cannot {op} to itself"
        )
    return peer


def _backend_error(op: str, exc: BaseException) -> BaseException:
    if isinstance(exc, RuntimeError) and not isinstance(exc, CommpressError):
        return CollectiveError(f"{op} failed in the backend ({exc}); the peer may have died")
    return exc


def _waiting(
    op: str,
    works: list[Any],
    value: list[torch.Tensor],
    keep: list[Any],
    source_rank: int | None = None,
) -> Handle:
    """A handle that completes when the backend ``works`` do (``keep``: buffers to free then).

    ``source_rank``: a receive's sender (global), when known at posting.
    """

    def complete() -> list[torch.Tensor]:
        try:
            for w in works:
                w.wait()
        except RuntimeError as exc:
            raise _backend_error(op, exc) from exc
        keep.clear()  # the send buffers may go now
        return value

    return Handle(
        completer=complete,
        poll=lambda: all(w.is_completed() for w in works),
        source_rank=source_rank,
    )


def _post_send(
    op: str,
    tensor: torch.Tensor,
    dst: int | None,
    group: Any,
    tag: int,
    group_dst: int | None,
    codec: CodecLike | None,
) -> Handle | None:
    """Encode on this thread and post the send(s); the handle waits for the backend works."""
    check_tensor(tensor, "tensor")
    if not_member(group, op):
        return None
    call = Call.begin(op, group, tensor, None, codec)
    peer = _peer(op, group, "dst", dst, group_dst)
    if not call.decision.compressed:
        works = [dist.isend(tensor, to_global(group, peer), group, tag)]
        keep: list[Any] = []
    else:
        comm = call.comm(tensor.device, tensor.dtype)
        try:
            keep = transport.isend(comm, tensor, peer, tag, call.key)
        except RuntimeError as exc:
            raise _backend_error(op, exc) from exc
        works = [w for w in keep if not isinstance(w, torch.Tensor)]
    record(call.rec)
    return _waiting(op, works, [tensor], keep)


def isend(
    tensor: torch.Tensor,
    dst: int | None = None,
    group: Any = None,
    tag: int = 0,
    group_dst: int | None = None,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Send ``tensor`` to rank ``dst`` (global) / ``group_dst`` without blocking.

    The encode runs on the calling thread, so that sends stay in issue order; the
    transfer runs in the background. Returns a `Handle` (None on a rank outside
    ``group``). Tags at and above ``transport.P2P_TAG_BASE`` (2**30) are reserved
    for commpress payloads.
    """
    return _post_send("isend", tensor, dst, group, tag, group_dst, codec)


def send(
    tensor: torch.Tensor,
    dst: int | None = None,
    group: Any = None,
    tag: int = 0,
    group_dst: int | None = None,
    *,
    codec: CodecLike | None = None,
) -> None:
    """Send ``tensor`` to rank ``dst`` (global) / ``group_dst``, compressed; blocks until done.

    A codec mismatch is raised by the receiver only (a send is one-way).
    """
    handle = _post_send("send", tensor, dst, group, tag, group_dst, codec)
    if handle is not None:
        handle.wait()


def _recv_call(
    op: str,
    tensor: torch.Tensor,
    src: int | None,
    group: Any,
    group_src: int | None,
    codec: CodecLike | None,
) -> tuple[Call, int | None]:
    call = Call.begin(op, group, tensor, None, codec)
    peer = None
    if src is not None or group_src is not None:
        peer = _peer(op, group, "src", src, group_src)
    return call, peer


def irecv(
    tensor: torch.Tensor,
    src: int | None = None,
    group: Any = None,
    tag: int = 0,
    group_src: int | None = None,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Receive into ``tensor`` from rank ``src`` (None: any source) without blocking.

    The first receive is posted at once, in issue order; a helper thread fetches the
    payload as soon as its descriptor arrives, so the sender completes even before
    this handle is waited on. Returns a `Handle` (None on a rank outside ``group``)
    whose ``source_rank()`` is the sender's global rank once it completed.
    """
    check_tensor(tensor, "tensor")
    if not_member(group, "irecv"):
        return None
    call, peer = _recv_call("irecv", tensor, src, group, group_src, codec)
    if not call.decision.compressed:
        known = None if peer is None else to_global(group, peer)  # any source: unknown here
        work = dist.irecv(tensor, known, group, tag)
        record(call.rec)
        return _waiting("irecv", [work], [tensor], [], source_rank=known)
    pending = transport.post_recv(call.comm(tensor.device, tensor.dtype), tensor, peer, tag)
    handle = Handle()

    def fetch() -> None:
        try:
            source = transport.complete_recv(pending)
        except BaseException as exc:  # noqa: BLE001 - delivered through the handle
            handle._finish(exc=_backend_error("irecv", exc))
            return
        record(call.rec)
        handle._finish([tensor], source_rank=to_global(group, source))

    threading.Thread(target=fetch, name="commpress-irecv", daemon=True).start()
    return handle


def recv(
    tensor: torch.Tensor,
    src: int | None = None,
    group: Any = None,
    tag: int = 0,
    group_src: int | None = None,
    *,
    codec: CodecLike | None = None,
) -> int:
    """Receive into ``tensor`` from rank ``src`` (None: any source), compressed.

    Returns:
        The sender's global rank (-1 on a rank outside ``group``), like torch.

    Raises:
        CodecMismatchError: the sender used another codec (its payload is drained first,
            so the channel stays usable).
    """
    check_tensor(tensor, "tensor")
    if not_member(group, "recv"):
        return -1
    call, peer = _recv_call("recv", tensor, src, group, group_src, codec)
    if not call.decision.compressed:
        source = dist.recv(tensor, None if peer is None else to_global(group, peer), group, tag)
        record(call.rec)
        return source
    comm = call.comm(tensor.device, tensor.dtype)
    try:
        source = transport.complete_recv(transport.post_recv(comm, tensor, peer, tag))
    except RuntimeError as exc:
        raise _backend_error("recv", exc) from exc
    record(call.rec)
    return to_global(group, source)
