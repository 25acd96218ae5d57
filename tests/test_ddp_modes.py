"""DDP in every mode under commpress's comm hook, against plain DDP, on 2 and 3 gloo ranks.

Modes: ``find_unused_parameters=True`` (what transformers' ``Trainer`` does; it used to
deadlock after a few steps because the hook's collectives and DDP's used-parameter
bitmap all-reduce shared a process group from two threads, in a different order on
each rank), ``static_graph=True``, gradient accumulation with ``no_sync()``, and many
small buckets in flight. Each run is compared with plain DDP in the same mode:
gradients within the codec's error bound (params held fixed, so both runs see the same
inputs), or parameters bit-exact after optimizer steps with a lossless codec.

Every job runs under short timeouts (process group and job), so a regression that puts
the ranks out of order fails in seconds instead of hanging the suite.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import commpress
from commpress.testing import DistPool

PG_TIMEOUT = 20  # seconds a rank waits in one collective before it raises
JOB_TIMEOUT = 90  # seconds a whole job may take on every rank
STEPS = 3
MICRO = 3  # micro-batches per step in "no_sync" mode (the first MICRO - 1 under no_sync)

# mode -> (DDP keyword arguments, depth of the model)
MODES = {
    "find_unused": ({"find_unused_parameters": True, "bucket_cap_mb": 0.002}, 1),
    "static_graph": ({"static_graph": True, "bucket_cap_mb": 0.002}, 1),
    "no_sync": ({"find_unused_parameters": True, "bucket_cap_mb": 0.002}, 1),
    # tiny buckets: nine all-reduces queued per step once DDP has rebuilt its buckets
    "buckets": ({"find_unused_parameters": True, "bucket_cap_mb": 0.0005}, 5),
}


@pytest.fixture(scope="module")
def pool2():
    with DistPool(2, pg_timeout=PG_TIMEOUT, job_timeout=JOB_TIMEOUT) as p:
        yield p


@pytest.fixture(scope="module")
def pool3():
    with DistPool(3, pg_timeout=PG_TIMEOUT, job_timeout=JOB_TIMEOUT) as p:
        yield p


# ------------------------------------------------------------------ jobs (run on every rank)


class _Net(torch.nn.Module):
    """An MLP with a layer no rank ever uses (``idle``) and one (``branch``) that only
    some ranks use on some steps -- the two kinds of unused parameter DDP knows."""

    def __init__(self, width: int = 32, depth: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(16, width)
        self.hidden = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth - 1))
        self.idle = torch.nn.Linear(width, width)
        self.branch = torch.nn.Linear(width, 4)
        self.out = torch.nn.Linear(width, 4)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for layer in self.hidden:
            h = torch.relu(layer(h))
        y = self.out(h)
        return y + self.branch(h) if use_branch else y


def _uses_branch(mode: str, rank: int, step: int, micro: int) -> bool:
    if mode == "static_graph":
        return True  # a static graph: the same parameters every step (idle stays unused)
    return (rank + step + micro) % 2 == 0


def _train(
    rank,
    world,
    mode,
    spec,
    *,
    how="register",
    batch=8,
    steps=STEPS,
    lr=0.0,
    min_bytes=0,
    group=None,
):
    """Train ``steps`` steps; gradients after each, final parameters, and the stats.

    ``spec``: None for plain DDP, "local" for no DDP at all (this rank's own
    gradients), else a codec for the commpress hook, installed ``how``: "register"
    (`commpress.hooks.register`), "comm_hook" (``ddp.register_comm_hook(state,
    compress_hook)`` as Lightning's ``DDPStrategy(ddp_comm_hook=...)`` does) or "patch"
    (``commpress.patch``). ``lr=0`` leaves the parameters fixed. ``group``: DDP's
    ``process_group``.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    from commpress.hooks import CompressionState, compress_hook, register

    ddp_kwargs, depth = MODES[mode]
    model = _Net(depth=depth)
    patched = commpress.patch(codec=spec, min_bytes=min_bytes) if how == "patch" else None
    with patched or contextlib.nullcontext():
        net = model if spec == "local" else DDP(model, process_group=group, **ddp_kwargs)
        if spec not in (None, "local") and how != "patch":
            state = CompressionState(codec=spec, min_bytes=min_bytes)
            if how == "register":
                register(net, state)
            else:
                net.register_comm_hook(state, compress_hook)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        commpress.reset_stats()
        grads, calls = [], []
        for step in range(steps):
            g = torch.Generator().manual_seed(1000 * rank + step)
            # one input per step: accumulated micro-batches keep every weight gradient of
            # rank 1 at batch 1, so PowerSGD at rank >= world size is exact (up to rounding)
            x = torch.randn(batch, 16, generator=g)
            opt.zero_grad(set_to_none=True)
            micros = MICRO if mode == "no_sync" else 1
            for micro in range(micros):
                syncing = micro == micros - 1 or spec == "local"
                with contextlib.nullcontext() if syncing else net.no_sync():
                    net(x, _uses_branch(mode, rank, step, micro)).pow(2).mean().backward()
            grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
            calls.append(commpress.stats()["all_reduce"].calls - sum(calls))
            opt.step()
        s = commpress.stats()["all_reduce"]
    return {
        "grads": grads,
        "params": [p.detach().clone() for p in model.parameters()],
        "stats": (s.calls, s.compressed, s.bytes_in, s.bytes_wire),
        "calls_per_step": calls,  # one all-reduce per bucket
    }


def _job(rank, world, runs):
    """Several runs in one job (one round trip to the pool): name -> _train's result."""
    return {name: _train(rank, world, *args, **kwargs) for name, (args, kwargs) in runs.items()}


def _subgroup_job(rank, world, ranks, runs):
    """``runs`` with DDP over the subgroup ``ranks`` (the other ranks return None)."""
    import torch.distributed as dist

    group = dist.new_group(ranks)  # every rank of the world takes part in new_group
    if rank not in ranks:
        return None
    return {
        name: _train(rank, world, *args, group=group, **kwargs)
        for name, (args, kwargs) in runs.items()
    }


# ------------------------------------------------------------------------------ checks


def _bound(codec, local_grads, world):
    """Elementwise bound on |hook - exact average| for one step, over every parameter.

    Each rank encodes its pre-divided share once and (two-phase) the sum is encoded once
    more. Block codecs scale by a block's largest magnitude, and a block may span any
    parameters of a bucket, so the bound uses the largest magnitude of the step.
    """
    top = max(float(g.abs().max()) for grads in local_grads for g in grads if g is not None)
    full = torch.full((1024,), top / world)
    share = world * float(codec.error_bound(full).max())
    total = top + share
    return share + float(codec.error_bound(torch.full((1024,), total)).max()) + 1e-7


def _check_within_bound(res, spec, world, ours="ours", plain="plain"):
    codec = commpress.get_codec(spec)
    for s in range(STEPS):
        local = [res[r]["local"]["grads"][s] for r in range(world)]
        for i, exact in enumerate(res[0][plain]["grads"][s]):
            for r in range(world):
                got = res[r][ours]["grads"][s][i]
                assert (got is None) == (res[r][plain]["grads"][s][i] is None), (spec, s, i)
                if got is None:
                    continue
                if codec.algorithm == "powersgd":
                    # exact for gradients of rank <= its rank, up to float32 rounding
                    tol = 1e-4 * float(exact.abs().max()) + 1e-7
                else:
                    tol = _bound(codec, local, world)
                err = (got - exact).abs()
                assert (err <= tol).all(), (spec, s, i, float(err.max()), tol)
    _check_ranks_agree(res, world, ours)


def _check_ranks_agree(res, world, name):
    for s in range(STEPS):
        for r in range(1, world):
            for a, b in zip(res[0][name]["grads"][s], res[r][name]["grads"][s], strict=True):
                assert (a is None and b is None) or torch.equal(a, b)


def _check_compressed(res, world, name="ours"):
    for r in range(world):
        calls, compressed, bytes_in, bytes_wire = res[r][name]["stats"]
        assert calls >= STEPS and compressed >= STEPS, res[r][name]["stats"]
        assert 0 < bytes_wire < bytes_in, res[r][name]["stats"]


def _lossy_runs(mode, spec, batch=8, how="register"):
    return {
        "local": ((mode, "local"), {"batch": batch}),
        "plain": ((mode, None), {"batch": batch}),
        "ours": ((mode, spec), {"batch": batch, "how": how}),
    }


def _powersgd_batch(spec):
    return 1 if spec.startswith("powersgd") else 8


# ------------------------------------------------------------------------------- tests

LOSSY = ["int8", "fp16", "powersgd:rank=2"]


@pytest.mark.parametrize("mode", ["find_unused", "static_graph", "no_sync"])
@pytest.mark.parametrize("spec", LOSSY)
def test_mode_matches_plain_ddp_within_bound(pool2, mode, spec):
    res = pool2.run(_job, _lossy_runs(mode, spec, _powersgd_batch(spec)), timeout=JOB_TIMEOUT)
    _check_within_bound(res, spec, 2)
    _check_compressed(res, 2)


@pytest.mark.parametrize("spec", ["int8", "fp16", "powersgd:rank=3"])
def test_many_buckets_in_flight_world3(pool3, spec):
    res = pool3.run(_job, _lossy_runs("buckets", spec, _powersgd_batch(spec)), timeout=JOB_TIMEOUT)
    _check_within_bound(res, spec, 3)
    _check_compressed(res, 3)
    # DDP rebuilds its buckets after the first step; from then on about one per parameter
    calls = res[0]["ours"]["calls_per_step"]
    assert min(calls[1:]) >= 8, calls


@pytest.mark.parametrize("mode", list(MODES))
def test_lossless_parameters_bit_exact_after_steps(pool2, mode):
    # lz4 goes through the compressed path (engine worker thread), like the lossy codecs;
    # with 2 ranks a + b is one rounding in either order, so the sum is bit-exact.
    runs = {
        "plain": ((mode, None), {"lr": 0.1}),
        "none": ((mode, "none"), {"lr": 0.1}),
        "lz4": ((mode, "lz4"), {"lr": 0.1}),
    }
    res = pool2.run(_job, runs, timeout=JOB_TIMEOUT)
    for r in range(2):
        for name in ("none", "lz4"):
            for a, b in zip(res[r][name]["params"], res[r]["plain"]["params"], strict=True):
                assert torch.equal(a, b), (mode, name, r)
        assert res[r]["lz4"]["stats"][1] >= STEPS  # the lz4 buckets were compressed


def test_lossless_world3_within_rounding(pool3):
    runs = {"plain": (("buckets", None), {"lr": 0.1}), "lz4": (("buckets", "lz4"), {"lr": 0.1})}
    res = pool3.run(_job, runs, timeout=JOB_TIMEOUT)
    for r in range(3):
        for a, b in zip(res[r]["lz4"]["params"], res[r]["plain"]["params"], strict=True):
            # three addends: the order of the sum may differ from gloo's by an ulp or two
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (r, float((a - b).abs().max()))


@pytest.mark.parametrize("how", ["comm_hook", "patch"])
def test_find_unused_other_ways_in(pool2, how):
    """The hook as Lightning's DDPStrategy registers it (group made at the first bucket)
    and as ``commpress.patch`` installs it (at the first forward)."""
    res = pool2.run(_job, _lossy_runs("find_unused", "int8", how=how), timeout=JOB_TIMEOUT)
    _check_within_bound(res, "int8", 2)
    _check_compressed(res, 2)


def test_ddp_over_a_subgroup_world3(pool3):
    """DDP over ranks 0 and 2 of 3: `register` takes DDP's group (the hook averages over
    2 ranks, not 3), and a second DDP group over the same ranks reuses the twin group
    (torch names a group-local group after its ranks, so a second one would clash)."""
    for _ in range(2):
        res = pool3.run(
            _subgroup_job, [0, 2], _lossy_runs("find_unused", "int8"), timeout=JOB_TIMEOUT
        )
        assert res[1] is None
        members = [res[0], res[2]]
        _check_within_bound(members, "int8", 2)
        _check_compressed(members, 2)
