"""Return values mirror torch.distributed: None when blocking, a handle when async."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _returns(rank: int, world: int) -> dict[str, object]:
    import commpress.distributed as cdist

    t = torch.randn(100_000)
    outs = [torch.empty(100_000) for _ in range(world)]
    got = {
        "all_reduce": cdist.all_reduce(t, codec="int8"),
        "broadcast": cdist.broadcast(t, 0, codec="int8"),
        "all_gather": cdist.all_gather(outs, t, codec="int8"),
        "reduce": cdist.reduce(t, 0, codec="int8"),
        "plain_path": cdist.all_reduce(t, op=dist.ReduceOp.MAX, codec="int8"),
    }
    handle = cdist.all_reduce(t, codec="int8", async_op=True)
    got["async_waited"] = handle.wait()
    got["async_is_handle"] = hasattr(handle, "get_future")
    return got


def test_blocking_calls_return_none_like_torch(gloo):
    for got in gloo.run(_returns):
        for name in ("all_reduce", "broadcast", "all_gather", "reduce", "plain_path"):
            assert got[name] is None, f"{name} returned {got[name]!r}, torch returns None"
        assert got["async_is_handle"] is True
        assert got["async_waited"] is True
