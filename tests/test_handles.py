"""One handle type: every async commpress call returns a `commpress.Handle`, a ``dist.Work``."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

import commpress
from commpress.errors import CollectiveError
from commpress.handle import Handle


def _async_calls(world: int, rank: int, codec: str) -> dict[str, object]:
    """The handle of every commpress.distributed call that torch lets run async."""
    import commpress.distributed as cdist

    def t(n: int = 512) -> torch.Tensor:
        return torch.randn(n, generator=torch.Generator().manual_seed(rank))

    peer = 1 - rank
    calls = {
        "all_reduce": lambda: cdist.all_reduce(t(), async_op=True, codec=codec),
        "reduce": lambda: cdist.reduce(t(), 0, async_op=True, codec=codec),
        "all_gather": lambda: cdist.all_gather(
            [torch.empty(512) for _ in range(world)], t(), async_op=True, codec=codec
        ),
        "all_gather_into_tensor": lambda: cdist.all_gather_into_tensor(
            torch.empty(512 * world), t(), async_op=True, codec=codec
        ),
        "reduce_scatter": lambda: cdist.reduce_scatter(
            torch.empty(512), [t() for _ in range(world)], async_op=True, codec=codec
        ),
        "reduce_scatter_tensor": lambda: cdist.reduce_scatter_tensor(
            torch.empty(512), t(512 * world), async_op=True, codec=codec
        ),
        "broadcast": lambda: cdist.broadcast(t(), 0, async_op=True, codec=codec),
        "all_to_all": lambda: cdist.all_to_all(
            [torch.empty(512) for _ in range(world)],
            [t() for _ in range(world)],
            async_op=True,
            codec=codec,
        ),
        "all_to_all_single": lambda: cdist.all_to_all_single(
            torch.empty(512 * world), t(512 * world), async_op=True, codec=codec
        ),
        "gather": lambda: cdist.gather(
            t(),
            [torch.empty(512) for _ in range(world)] if rank == 0 else None,
            0,
            async_op=True,
            codec=codec,
        ),
        "scatter": lambda: cdist.scatter(
            torch.empty(512),
            [t() for _ in range(world)] if rank == 0 else None,
            0,
            async_op=True,
            codec=codec,
        ),
    }
    got: dict[str, object] = {}
    for name, call in calls.items():
        h = call()
        got[name] = (type(h).__name__, isinstance(h, dist.Work), h.wait(), h.is_completed())
    # Post the receive first: the send then finds its peer waiting.
    recv = cdist.irecv(torch.empty(512), peer, codec=codec)
    send = cdist.isend(t(), peer, codec=codec)
    for name, h in (("isend", send), ("irecv", recv)):
        got[name] = (type(h).__name__, isinstance(h, dist.Work), h.wait(), h.is_completed())
    got["irecv source_rank"] = recv.source_rank()
    return got


def _every_entry_point(rank: int, world: int) -> dict[str, object]:
    from commpress import moe
    from commpress import pipeline as pp
    from commpress.policy import using

    got: dict[str, object] = {}
    with using(min_bytes=0):
        for codec in ("int8", "none"):  # compressed, and handed to plain torch
            got[codec] = _async_calls(world, rank, codec)

        x = torch.randn(6, 128, generator=torch.Generator().manual_seed(rank))
        ids = torch.tensor([[0], [1], [2], [3], [0], [3]])
        recv, handle = moe.dispatch(x, ids, 4, codec="fp8", async_op=True)
        got["moe.dispatch"] = (isinstance(handle, dist.Work), handle.wait())
        got["moe.dispatch result"] = handle.result()[0] is recv
        combined = moe.combine(recv, handle, codec="bf16", async_op=True)
        got["moe.combine"] = (isinstance(combined, dist.Work), combined.wait())
        got["moe.combine result"] = tuple(combined.result()[0].shape)
        sync_recv, sync_handle = moe.dispatch(x, ids, 4, codec="none")
        got["moe.dispatch sync"] = (isinstance(sync_handle, dist.Work), sync_handle.is_completed())

        peer = 1 - rank
        out = torch.empty(8, 128)
        r = pp.irecv_activation(peer, out=out, codec="fp8")
        s = pp.isend_activation(torch.randn(8, 128), peer, codec="fp8")
        got["pipeline.isend_activation"] = (isinstance(s, dist.Work), s.wait())
        got["pipeline.irecv_activation"] = (isinstance(r, dist.Work), r.wait())
        got["pipeline.irecv_activation result"] = r.result()[0] is out
        got["pipeline.irecv_activation source_rank"] = r.source_rank()

    with commpress.patch(codec="int8", min_bytes=0):
        work = dist.all_reduce(torch.randn(512), async_op=True)
        got["patch all_reduce"] = (type(work).__name__, isinstance(work, dist.Work), work.wait())
    return got


def test_every_async_entry_point_returns_a_torch_work(gloo2):
    for rank, got in enumerate(gloo2.run(_every_entry_point)):
        peer = 1 - rank
        for codec in ("int8", "none"):
            calls = got[codec]
            assert len(calls) == 14  # 11 async_op collectives, isend, irecv, source_rank
            for name, value in calls.items():
                if name == "irecv source_rank":
                    assert value == peer, (codec, value)
                else:
                    assert value == ("Handle", True, True, True), (rank, codec, name, value)
        for name in ("moe.dispatch", "moe.combine", "moe.dispatch sync"):
            assert got[name] == (True, True), (name, got[name])
        assert got["moe.dispatch result"] is True
        assert got["moe.combine result"] == (6, 128)
        for name in ("pipeline.isend_activation", "pipeline.irecv_activation"):
            assert got[name] == (True, True), (name, got[name])
        assert got["pipeline.irecv_activation result"] is True
        assert got["pipeline.irecv_activation source_rank"] == peer
        assert got["patch all_reduce"] == ("Handle", True, True)


def test_handle_is_a_work_that_torch_can_box_and_wait():
    h = Handle(completer=lambda: [torch.ones(2)], poll=lambda: True)
    assert isinstance(h, dist.Work) and isinstance(h, commpress.Handle)
    # Through torch's C++ side (boxed into a ScriptObject and back), the Python
    # overrides still answer; torch passes timedelta(0) for "no timeout".
    unboxed = dist.Work.unbox(h.boxed())
    assert unboxed is h and unboxed.wait(datetime.timedelta(0))
    assert torch.equal(h.result()[0], torch.ones(2)) and h.is_success()
    assert h.get_future().wait()[0].sum() == 2
    with pytest.raises(CollectiveError, match="source_rank"):
        h.source_rank()
    recv = Handle(source_rank=3)
    assert recv.source_rank() == 3
    later = Handle()
    later._finish([torch.zeros(1)], source_rank=5)
    assert later.source_rank() == 5
    assert Handle.done([], layout="routing").layout == "routing"
    pending = Handle()
    with pytest.raises(CollectiveError, match="within 0.01 s"):
        pending.wait(0.01)
