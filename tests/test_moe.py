"""MoE dispatch/combine on 3 gloo ranks (and a 2-rank subgroup) against a pure-torch reference."""

from __future__ import annotations

import pytest
import torch

import commpress
from commpress import moe
from commpress.errors import ConfigError
from commpress.testing import DistPool

HIDDEN = 128  # one fp8 scale block per token row


@pytest.fixture(scope="module")
def pool():
    with DistPool(3) as p:
        yield p


def _inputs(rank: int, tokens: int, topk: int, num_experts: int):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, HIDDEN, generator=g) * (1 + rank)
    ids = torch.randint(-1, num_experts, (tokens, topk), generator=g)  # -1: dropped slot
    weights = torch.rand(tokens, topk, generator=g)
    return x, ids, weights


def _expert(rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Expert e multiplies by (e + 1): easy to reproduce in the reference."""
    return rows * (expert_ids.to(rows.dtype) + 1).unsqueeze(1)


def _reference(x, ids, weights):
    """What combine(expert(dispatch(x))) must give: sum over slots of w * ((e + 1) * x).

    Same operations in the same order as the real path, so codec "none" is bit-exact.
    """
    factor = torch.where(ids >= 0, ids + 1, 0).to(x.dtype)
    slots = x.unsqueeze(1) * factor.unsqueeze(-1)
    return (slots * weights.unsqueeze(-1)).sum(1)


def _round_trip(rank, world, tokens, topk, num_experts, codecs, subgroup, async_op):
    import torch.distributed as dist

    from commpress.policy import using

    group = dist.new_group([0, 1]) if subgroup else None
    if subgroup and rank == 2:
        return None  # not a member
    grank = dist.get_rank(group)
    x, ids, weights = _inputs(grank, tokens, topk, num_experts)
    with using(min_bytes=0):  # compress even these small test tensors
        recv, handle = moe.dispatch(
            x, ids, num_experts, group=group, codec=codecs[0], async_op=async_op
        )
        handle.wait()
        layout = handle.layout
        lo, hi = layout.bounds[grank], layout.bounds[grank + 1]
        assert ((layout.recv_expert_ids >= lo) & (layout.recv_expert_ids < hi)).all()
        assert int(layout.tokens_per_expert.sum()) == recv.shape[0]
        y = _expert(recv, layout.recv_expert_ids)
        out = moe.combine(y, handle, weights=weights, codec=codecs[1], async_op=async_op)
        if async_op:
            out.wait()
            out = out.result()[0]
    stats = commpress.stats()["all_to_all_single"]
    return {"x": x, "ids": ids, "w": weights, "out": out, "recv": recv, "stats": stats}


@pytest.mark.parametrize("subgroup", [False, True], ids=["3 ranks", "2 ranks"])
@pytest.mark.parametrize("async_op", [False, True], ids=["sync", "async"])
def test_exact_with_codec_none(pool, subgroup, async_op):
    res = pool.run(_round_trip, 37, 3, 7, ("none", "none"), subgroup, async_op)
    for r in res:
        if r is None:
            continue
        assert r["out"].dtype == r["x"].dtype and r["out"].shape == r["x"].shape
        assert torch.equal(r["out"], _reference(r["x"], r["ids"], r["w"]))


@pytest.mark.parametrize("subgroup", [False, True], ids=["3 ranks", "2 ranks"])
def test_fp8_dispatch_bf16_combine_within_bound(pool, subgroup):
    res = pool.run(_round_trip, 64, 2, 6, ("fp8", "bf16"), subgroup, False)
    fp8, bf16 = commpress.get_codec("fp8"), commpress.get_codec("bf16")
    for r in res:
        if r is None:
            continue
        x, ids, w = r["x"], r["ids"], r["w"]
        scale = torch.where(ids >= 0, ids + 1, 0).float()
        x_err = fp8.error_bound(x)  # per row: one scale block per row
        # slot j: (e+1) * fp8 error of x, then bf16 error of the expert output
        y_mag = scale.unsqueeze(-1) * (x.abs() + x_err).unsqueeze(1)
        slot_err = scale.unsqueeze(-1) * x_err.unsqueeze(1) + bf16.error_bound(y_mag)
        bound = (w.unsqueeze(-1) * slot_err).sum(1) + 1e-6
        err = (r["out"] - _reference(x, ids, w)).abs()
        assert (err <= bound).all(), float((err - bound).max())
        assert r["stats"].compressed > 0  # the codecs were really used


def _uneven(rank, world):
    # Every token of every rank goes to expert 0 (rank 0): rank 0 receives everything,
    # the others nothing; empty splits and empty outputs must work.
    x = torch.randn(5 + rank, HIDDEN)
    ids = torch.zeros(5 + rank, 1, dtype=torch.int64)
    recv, handle = moe.dispatch(x, ids, 3, codec="none")
    out = moe.combine(recv * 2, handle, codec="none")
    return recv.shape[0], handle.layout.recv_splits, torch.equal(out, 2 * x)


def test_all_tokens_to_one_rank(pool):
    res = pool.run(_uneven)
    assert res[0][0] == 5 + 6 + 7 and res[0][1] == [5, 6, 7]
    assert res[1][0] == 0 and res[2][0] == 0
    assert all(r[2] for r in res)


def _bad(rank, world):
    x = torch.randn(4, HIDDEN)
    errors = []
    for args, kwargs in [
        ((x, torch.tensor([[0], [1], [9], [0]]), 3), {}),  # id out of range
        ((x, torch.zeros(3, 1, dtype=torch.int64), 3), {}),  # wrong T
        ((x, torch.zeros(4, 1), 3), {}),  # float ids
        ((x[0], torch.zeros(4, 1, dtype=torch.int64), 3), {}),  # x not 2-D
        ((x, torch.zeros(4, 1, dtype=torch.int64), 3), {"codec": "int9"}),  # bad codec
    ]:
        try:
            moe.dispatch(*args, **kwargs)
            errors.append(None)
        except ConfigError as exc:
            errors.append(str(exc))
    recv, handle = moe.dispatch(x, torch.zeros(4, 2, dtype=torch.int64), 3, codec="none")
    try:
        moe.combine(recv[:1] if recv.shape[0] else torch.zeros(1, HIDDEN), handle)
        errors.append(None)
    except ConfigError as exc:
        errors.append(str(exc))
    try:
        moe.combine(recv, handle, weights=torch.ones(4, 3), codec="none")
        errors.append(None)
    except ConfigError as exc:
        errors.append(str(exc))
    return errors


def test_bad_input_raises_before_communicating(pool):
    for errors in pool.run(_bad):
        assert all(e is not None for e in errors), errors
        assert "[0, 3)" in errors[0] and "weights" in errors[-1]
