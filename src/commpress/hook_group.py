"""The process group that carries the DDP hook's traffic, and the order buckets post in.

`commpress.hooks` compresses each bucket in `twin` (a twin of DDP's group) and
asks `order` what the bucket must wait for before it posts.

Collectives on one process group must be issued in the same order on every
rank. The flat-buffer path hands each bucket to the engine's worker thread
(so backward is never blocked), and a compressed all-reduce is several
backend collectives in a row (a descriptor/size exchange, then the payload
all-gather or all-to-all + all-gather). Meanwhile DDP issues its own
collectives on *its* group from the autograd thread: with
``find_unused_parameters=True``, the all-reduce of the used-parameter bitmap
right after the last bucket's hook returns, every step (``static_graph=True``
does one in its first step, before the hooks). When both shared DDP's group, whether
the worker's next collective or DDP's bitmap all-reduce reached the group
first depended on thread timing, differently on each rank: in a 2-rank gloo
run, at the same sequence number one rank issued the hook's size all-gather
and the other DDP's bitmap all-reduce, and both hung until the process-group
timeout (main thread inside backward -- ``Reducer::finalize_backward`` in the
user's native stack dump -- and the worker in ``gather._sizes``).

So the hook never uses DDP's group. `twin` gives it a twin of that group
(same ranks, backend and timeout; ``new_group``, made once per process and
set of ranks, collectively: eagerly in `register`, else at the first bucket of the
first step, which every rank reaches at the same point of its program). DDP's own
collectives stay alone on DDP's group. No ordering between the two groups is
needed: DDP waits for every bucket's future in ``finalize_backward``, which the
hook's traffic completes without any help from the autograd thread.

On the hook's group, the rule is that buckets post their collectives in bucket
order (DDP calls the hook bucket 0, 1, 2, ... on every rank), each bucket all of
its own before the next posts any, whatever the threads' timing:

- the flat-buffer path hands each bucket to the group's one ordered queue in the
  engine (its calls run one after the other on the group's worker thread;
  uncompressed calls made from the autograd thread keep their place behind them);
- a bucket ``codec="auto"`` keeps plain (`post_plain`) posts its one all-reduce
  straight from the autograd thread while that queue is idle (every earlier
  bucket has posted all of its collectives), and into the queue, behind the
  compressed buckets still there, while it is not: posting it directly then could
  put it ahead of an earlier bucket's collectives on one rank and behind them on
  another. The first ``auto`` bucket of a dtype calibrates in that queue too, when
  `commpress.hooks.register` did not calibrate already;
- the PowerSGD path posts its first all-reduces from the hook and ``Q``'s from
  the completion callback of ``P``'s. So a PowerSGD bucket posts nothing before
  the previous PowerSGD bucket of the group has posted its ``Q``
  (``all_reduce_many_async(after=...)``) and the previous flat bucket has
  completed (the engine's queue is drained); a flat bucket that follows a
  PowerSGD bucket still posting waits for it too (`Order` keeps both futures
  per group).

Why not issue every collective from the calling thread, as torch's own hooks
do: a compressed all-reduce needs the sizes (or the first phase) before it can
post the next op, so the calling thread would have to block inside backward, or
chain the next op in a completion callback, which runs on the backend's thread
whenever the previous op completes and would race with the next bucket's posts
from the autograd thread, differently on each rank. The engine's queue orders the
flat path; the PowerSGD chain orders itself by waiting for the previous bucket's
``posted`` future, and never waits inside a callback (torch's ``powerSGD_hook``
does, ``fut.wait()`` in its ``then`` callbacks, and aborts or hangs gloo with
several buckets in flight; that the two are related is likely, not verified).
The dedicated group's cost: one more communicator per DDP group (on NCCL, its
own memory and, as with any two communicators, ops that may run concurrently
with DDP's; the NCCL path is not run here). ``pg_options`` of DDP's group
(e.g. NCCL ``max_ctas``) are not copied.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .engine import get_engine
from .errors import ConfigError
from .stats import CallRecord, record

__all__ = ["twin", "Order", "order", "pending", "post_after", "post_in_order", "post_plain"]

_lock = threading.Lock()
# Twins made under the current default group, by DDP group name and by (backend, ranks).
_twins: dict[Hashable, dist.ProcessGroup] = {}
_twins_world: list[Any] = [None]  # the default group they were made under


@dataclass
class Order:
    """What the next bucket on one hook group must wait for before it posts (docstring).

    Attributes:
        posted: completes once the last bucket posted from a callback (PowerSGD, or a
            flat bucket that waited) has posted all its collectives; None: none yet.
        flat_done: completes once the last flat bucket has completed; None: none yet.
    """

    posted: torch.futures.Future[Any] | None = None
    flat_done: torch.futures.Future[Any] | None = None


# By twin group name, under _lock; cleared with the twins.
_orders_by_group: dict[str, Order] = {}


def order(group: dist.ProcessGroup) -> Order:
    """The `Order` of the twin ``group``; the hook updates it as it posts each bucket."""
    with _lock:
        return _orders_by_group.setdefault(group.group_name, Order())


def pending(*futures: torch.futures.Future[Any] | None) -> list[torch.futures.Future[Any]]:
    """Those of ``futures`` (None: nothing to wait for) that have not completed yet."""
    return [f for f in futures if f is not None and not f.done()]


def twin(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """The twin of ``group`` (None: the default group) that carries the hook's collectives.

    Made on first use, collectively (every rank of the default group, or for a subgroup
    every rank of it, gets here at the same point of its program: `register`, or the
    first bucket of the first step), and reused after, also by other states over a
    group with the same ranks. See the module docstring for why the hook needs a group
    of its own.

    Raises:
        ConfigError: torch could not make the twin group (the message says why).
    """
    world = dist.group.WORLD
    parent = group if group is not None else world
    with _lock:
        if _twins_world[0] is not world:  # a new default group: old twins are gone
            _twins.clear()
            _orders_by_group.clear()
            _twins_world[0] = world
        found = _twins.get(parent.group_name)
        if found is None:
            key = (dist.get_backend(parent), tuple(dist.get_process_group_ranks(parent)))
            found = _twins.get(key)
            if found is None:
                found = _twins[key] = _new_twin(parent, key[0], world)
            _twins[parent.group_name] = found
        return found


def _new_twin(parent: dist.ProcessGroup, backend: str, world: Any) -> dist.ProcessGroup:
    kwargs: dict[str, Any] = {
        "backend": backend,
        "timeout": _timeout_of(parent),
        "group_desc": "commpress_ddp_hook",
    }
    try:
        if parent.group_name == world.group_name:
            return dist.new_group(**kwargs)
        # Only the subgroup's ranks build DDP over it: a group-local rendezvous (the twin
        # is named after its ranks, hence one twin per set of ranks).
        ranks = dist.get_process_group_ranks(parent)
        return dist.new_group(ranks=ranks, use_local_synchronization=True, **kwargs)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"commpress.hooks: could not create the process group that carries the DDP hook's "
            f"traffic (a twin of group {parent.group_name!r}: {exc}); the hook needs a group of "
            "its own so that its collectives never interleave with DDP's"
        ) from exc


def _timeout_of(group: dist.ProcessGroup) -> Any:
    """``group``'s collective timeout (None: torch's default), so the twin fails as soon."""
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except (RuntimeError, AttributeError):
            continue
    return None


def post_after(
    prior: torch.futures.Future[Any], post: Callable[[], torch.futures.Future[torch.Tensor]]
) -> tuple[torch.futures.Future[torch.Tensor], torch.futures.Future[None]]:
    """Run ``post`` once ``prior`` completes; its result's future, and one set once posted."""
    result: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    posted: torch.futures.Future[None] = torch.futures.Future()

    def forward(fut: torch.futures.Future[torch.Tensor]) -> None:
        try:
            result.set_result(fut.value())
        except BaseException as exc:  # noqa: BLE001 - a callback hands failures on
            result.set_exception(exc)

    def start(_: torch.futures.Future[Any]) -> None:
        try:
            fut = post()
        except BaseException as exc:  # noqa: BLE001 - a callback hands failures on
            posted.set_result(None)
            result.set_exception(exc)
            return
        posted.set_result(None)
        fut.add_done_callback(forward)

    prior.add_done_callback(start)
    return result, posted


def post_in_order(
    group: dist.ProcessGroup, post: Callable[[], torch.futures.Future[torch.Tensor]]
) -> torch.futures.Future[torch.Tensor]:
    """Run ``post`` (a flat or plain bucket's posting) now, or once the PowerSGD bucket
    of ``group`` still posting from a callback has posted; its result's future."""
    found = order(group)
    waits = pending(found.posted)
    if waits:  # a PowerSGD bucket is still posting: take the queue after it
        fut, found.posted = post_after(waits[0], post)
    else:
        fut = post()
    found.flat_done = fut
    return fut


def post_plain(
    buffer: torch.Tensor, group: dist.ProcessGroup
) -> torch.futures.Future[torch.Tensor]:
    """What plain DDP does with a bucket (average, one all-reduce), in its place among
    the group's buckets.

    Straight to the backend when the engine's queue of ``group`` is idle (nothing of an
    earlier bucket left to post); else into that queue, behind the compressed buckets
    still in it, so the order of collectives on ``group`` is bucket order on every rank.
    """
    # DDP without a hook multiplies by 1/N as it copies the gradients in (torch's
    # allreduce_hook divides); the same rounding makes the result plain DDP's bit for bit.
    buffer.mul_(1.0 / group.size())
    nbytes = buffer.numel() * buffer.element_size()

    def done(fut: torch.futures.Future[Any]) -> torch.Tensor:
        fut.value()  # re-raises a failure of the all-reduce
        return buffer

    def post() -> torch.futures.Future[torch.Tensor]:
        engine = get_engine()
        if engine.idle(group.group_name):
            t0 = time.perf_counter()
            work = dist.all_reduce(buffer, group=group, async_op=True)
            record(CallRecord("all_reduce", bytes_in=nbytes, transfer_s=time.perf_counter() - t0))
            return work.get_future().then(done)

        def job() -> torch.Tensor:
            t0 = time.perf_counter()
            dist.all_reduce(buffer, group=group)
            record(CallRecord("all_reduce", bytes_in=nbytes, transfer_s=time.perf_counter() - t0))
            return buffer

        handle = engine.run(group.group_name, job, async_op=True, device=buffer.device)
        return handle.get_future().then(done)

    return post_in_order(group, post)
