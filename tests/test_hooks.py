"""DDP comm hook (commpress.hooks) against plain DDP and torch's own hooks, on 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch

import commpress
from commpress.errors import CodecMismatchError, ConfigError, UnknownCodecError
from commpress.hooks import CompressionState, FSDPReduceScatter, register
from commpress.testing import DistPool

STEPS = 3


@pytest.fixture(scope="module")
def pool():
    with DistPool(2) as p:
        yield p


# ------------------------------------------------------------------ jobs (run on every rank)


def _model(width: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, 4)
    )


def _train(rank, world, kind, spec=None, batch=8, width=32, steps=STEPS, state_kwargs=None):
    """Gradients after each of ``steps`` backward passes (no optimizer step: params fixed).

    ``kind``: "plain" (DDP, no hook), "commpress", "torch_fp16", "local" (no DDP: this
    rank's own gradients).
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model(width)
    net = model
    state = None
    if kind != "local":
        # Small buckets: several per step, so per-bucket state and keys are exercised.
        net = DDP(model, bucket_cap_mb=0.002)
        if kind == "commpress":
            state = register(net, CompressionState(codec=spec, **(state_kwargs or {})))
        elif kind == "torch_fp16":
            net.register_comm_hook(None, fp16_compress_hook)
    out = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * rank + step)
        x = torch.randn(batch, 16, generator=g)
        for p in model.parameters():
            p.grad = None
        net(x).pow(2).mean().backward()
        out.append([p.grad.clone() for p in model.parameters()])
    if state is not None:
        return out, state.state_dict()
    return out


def _job(rank, world, kinds):
    """Run several variants in one job (one round trip to the pool)."""
    return {name: _train(rank, world, *args) for name, args in kinds.items()}


def _reference(results, name="local"):
    """The exact average of every rank's local gradients, per step and parameter."""
    world = len(results)
    return [
        [
            sum(results[r][name][s][i] for r in range(world)) / world
            for i in range(len(results[0][name][s]))
        ]
        for s in range(len(results[0][name]))
    ]


# ----------------------------------------------------------------------------- tests


def test_none_codec_matches_plain_ddp_exactly(pool):
    res = pool.run(_job, {"plain": ("plain",), "none": ("commpress", "none")})
    for r in range(2):
        for s in range(STEPS):
            for a, b in zip(res[r]["none"][0][s], res[r]["plain"][s], strict=True):
                assert torch.equal(a, b)


def test_fp16_matches_torch_fp16_compress_hook(pool):
    res = pool.run(_job, {"torch": ("torch_fp16",), "ours": ("commpress", "fp16")})
    for r in range(2):
        for s in range(STEPS):
            for a, b in zip(res[r]["ours"][0][s], res[r]["torch"][s], strict=True):
                # Within one fp16 ulp of torch's result (it divides after the cast, we before).
                ulp = torch.finfo(torch.float16).eps * b.abs().clamp_min(2.0**-14)
                assert ((a - b).abs() <= ulp).all(), (a - b).abs().max()


def _uniform_bound(codec, tensors, like):
    """Bound for any element of a buffer holding ``tensors``: block codecs scale by the
    block's largest magnitude, and a DDP bucket's blocks span several parameters."""
    top = max(float(t.abs().max()) for t in tensors)
    return codec.error_bound(torch.full_like(like, top))


@pytest.mark.parametrize("spec", ["int8", "fp8", "bf16"])
def test_lossy_codecs_within_bound(pool, spec):
    res = pool.run(_job, {"local": ("local",), "ours": ("commpress", spec)})
    codec = commpress.get_codec(spec)
    ref = _reference(res)
    for s in range(STEPS):
        for i, exact in enumerate(ref[s]):
            # One encode of each rank's pre-divided share, one of the sum (two-phase worst case).
            share = sum(
                _uniform_bound(codec, [g / 2 for g in res[r]["local"][s]], exact) for r in range(2)
            )
            bound = share + _uniform_bound(codec, [t.abs() + share.max() for t in ref[s]], exact)
            for r in range(2):
                got = res[r]["ours"][0][s][i]
                assert ((got - exact).abs() <= bound + 1e-7).all(), (spec, s, i)
    # every rank ends with the same gradients
    for s in range(STEPS):
        for a, b in zip(res[0]["ours"][0][s], res[1]["ours"][0][s], strict=True):
            assert torch.equal(a, b)


def test_powersgd_matches_plain_for_low_rank_gradients(pool):
    # batch 1 per rank: every weight gradient is rank 1 per rank, rank <= 2 summed, so a
    # rank-2 PowerSGD is exact up to rounding; vectors (biases) travel raw.
    kinds = {
        "local": ("local", None, 1),
        "ours": ("commpress", "powersgd:rank=2", 1),
    }
    res = pool.run(_job, kinds)
    ref = _reference(res)
    for s in range(STEPS):
        for i, exact in enumerate(ref[s]):
            for r in range(2):
                got = res[r]["ours"][0][s][i]
                assert (got - exact).abs().max() <= 1e-4 * float(exact.abs().max()), (s, i)
    state = res[0]["ours"][1]
    assert state["memory"] is not None and state["memory"]["codec"] == "powersgd:rank=2"
    assert all(isinstance(k, str) for k in state["memory"]["q"])  # keyed by parameter name


def _torch_powersgd(rank, world, steps):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model()
    net = DDP(model)  # one bucket: see docs/dropin.md for what several buckets do on gloo
    state = psgd.PowerSGDState(
        process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2
    )
    net.register_comm_hook(state, psgd.powerSGD_hook)
    out = []
    for step in range(steps):
        for p in model.parameters():
            p.grad = None
        g = torch.Generator().manual_seed(1000 * rank + step)
        net(torch.randn(1, 16, generator=g)).pow(2).mean().backward()
        out.append([p.grad.clone() for p in model.parameters()])
    return out


def _vs_torch_powersgd(rank, world, steps):
    return {
        "torch": _torch_powersgd(rank, world, steps),
        "ours": _train(rank, world, "commpress", "powersgd:rank=2", batch=1, steps=steps)[0],
        "local": _train(rank, world, "local", batch=1, steps=steps),
    }


def test_powersgd_matches_torch_powersgd_hook(pool):
    """torch's powerSGD_hook runs on gloo with a single bucket (several abort or hang)."""
    steps = 4
    res = pool.run(_vs_torch_powersgd, steps)
    ref = _reference(res)
    for s in range(2, steps):  # torch compresses from start_powerSGD_iter=2 on
        for i, exact in enumerate(ref[s]):
            ours, theirs = res[0]["ours"][s][i], res[0]["torch"][s][i]
            tol = 1e-4 * float(exact.abs().max())  # float32 rounding of P Q^T
            assert (theirs - exact).abs().max() <= tol, (s, i)
            assert (ours - theirs).abs().max() <= tol, (s, i)


def test_powersgd_trains_with_full_rank_gradients(pool):
    res = pool.run(_job, {"local": ("local",), "ours": ("commpress", "powersgd:rank=1")})
    ref = _reference(res)
    for s in range(STEPS):
        for i, exact in enumerate(ref[s]):
            got = res[0]["ours"][0][s][i]
            assert torch.isfinite(got).all()
            if exact.dim() == 1:  # biases go raw
                assert torch.allclose(got, exact, rtol=1e-5, atol=1e-7)
            else:  # a projection: never larger than the (compensated) input
                assert (got - exact).norm() <= 2 * exact.norm() + 1e-6


def _chained_and_synchronous(rank, world, ddp_kwargs, steps):
    """PowerSGD through `compress_hook` (chained) and through the blocking rounds.

    In the chained run, rank 1 enters each bucket's hook only once rank 0 has returned
    from it (the store says so), so rank 0's first all-reduce of the bucket cannot have
    completed when its hook returns: a hook that waited for the network there would
    hang until the store wait times out. The synchronous run is the hook as it was
    (`all_reduce_many` inside the hook, a completed future), on the same buckets.
    """
    from datetime import timedelta

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from commpress import hook_group
    from commpress.algorithms.powersgd import all_reduce_many
    from commpress.hooks import compress_hook

    store = dist.distributed_c10d._get_default_store()
    twin = hook_group.twin(None)  # made now on both ranks: rank 1 holds back in the hooks
    step = [0]
    returned_done = []

    def chained(state, bucket):
        tag = f"test_hooks/chained/{step[0]}/{bucket.index()}"
        if rank == 1:
            store.wait([tag], timedelta(seconds=30))
            store.delete_key(tag)
        fut = compress_hook(state, bucket)
        if rank == 0:
            returned_done.append((step[0], fut.done()))
            store.set(tag, "returned")
        return fut

    def synchronous(state, bucket):
        grads = bucket.gradients()
        keys = state._param_keys(bucket)
        all_reduce_many(
            grads, state.codec, average=True, group=twin, memory=state.memory, keys=keys
        )
        buffer = bucket.buffer()
        buffer.copy_(torch.cat([g.reshape(-1) for g in grads]))
        fut = torch.futures.Future()
        fut.set_result(buffer)
        return fut

    out = {}
    for name, hook in (("chained", chained), ("synchronous", synchronous)):
        torch.manual_seed(0)
        hidden = [m for _ in range(3) for m in (torch.nn.Linear(32, 32), torch.nn.ReLU())]
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), *hidden, torch.nn.Linear(32, 4))
        # tiny buckets: after DDP rebuilds them (first step), about one per parameter
        net = DDP(model, bucket_cap_mb=0.0005, **ddp_kwargs)
        net.register_comm_hook(CompressionState(codec="powersgd:rank=1"), hook)
        grads = []
        for s in range(steps):
            step[0] = s
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1000 * rank + s))
            for p in model.parameters():
                p.grad = None
            net(x).pow(2).mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        out[name] = grads
    return out, returned_done


@pytest.mark.parametrize("ddp_kwargs", [{}, {"find_unused_parameters": True}])
def test_powersgd_hook_returns_before_its_rounds_complete(pool, ddp_kwargs):
    """The PowerSGD hook is a chain of futures: bucket k is still in flight when backward
    goes on to bucket k+1, and the gradients are bit-identical to the blocking rounds'."""
    res = pool.run(_chained_and_synchronous, ddp_kwargs, STEPS)
    returned_done = res[0][1]
    assert all(s == 0 for s, _ in returned_done[:1])  # one bucket in the first step
    assert sum(s == STEPS - 1 for s, _ in returned_done) >= 4, returned_done  # then several
    assert not any(done for _, done in returned_done), returned_done
    for r in range(2):
        out = res[r][0]
        for s in range(STEPS):
            for a, b in zip(out["chained"][s], out["synchronous"][s], strict=True):
                assert torch.equal(a, b), (r, s)
            for a, b in zip(out["chained"][s], res[0][0]["chained"][s], strict=True):
                assert torch.equal(a, b), (r, s)  # every rank ends with the same gradients


def _checkpoint(rank, world):
    out, state = _train(rank, world, "commpress", "sign", state_kwargs={"error_feedback": True})
    fresh = CompressionState(codec="sign", error_feedback=True)
    fresh.load_state_dict(state)
    same = fresh.state_dict()
    try:
        CompressionState(codec="int8").load_state_dict(state)
        mismatch = None
    except CodecMismatchError as exc:
        mismatch = str(exc)
    return state, same, mismatch


def test_state_dict_round_trip_and_codec_mismatch(pool):
    state, same, mismatch = pool.run(_checkpoint)[0]
    assert state["iteration"] == STEPS and same["iteration"] == STEPS
    residuals = state["feedback"]
    assert residuals and all(isinstance(k, int) for k in residuals)  # by bucket index
    assert residuals.keys() == same["feedback"].keys()
    for k, v in residuals.items():
        assert torch.equal(v, same["feedback"][k])
    assert mismatch is not None and "sign" in mismatch and "int8" in mismatch


def _fsdp2(rank, world, spec):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    results = {}
    for name in ("local", "plain", "ours"):
        model = _model()
        if name != "local":
            mesh = init_device_mesh("cpu", (world,))
            for layer in (model[0], model[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        if name == "ours":
            for m in (model[0], model[2], model):
                m.set_custom_reduce_scatter(FSDPReduceScatter(codec=spec))
        commpress.reset_stats()
        g = torch.Generator().manual_seed(rank)
        model(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
        grads = [p.grad for p in model.parameters()]
        results[name] = [g.full_tensor() if name != "local" else g.clone() for g in grads]
        st = commpress.stats()
        row = st["reduce_scatter_tensor"] if "reduce_scatter_tensor" in st else None
        results[name + "_compressed"] = (0, 0) if row is None else (row.calls, row.compressed)
    return results


def test_fsdp2_custom_reduce_scatter(pool):
    res = pool.run(_fsdp2, "int8")
    codec = commpress.get_codec("int8")
    for r in range(2):
        calls, compressed = res[r]["ours_compressed"]
        # both sharded layers' gradient reduce-scatters, however small (under the
        # policy's min_bytes neither was compressed)
        assert calls == 2 and compressed == calls, res[r]["ours_compressed"]
        assert res[r]["plain_compressed"][1] == 0
    for i, exact in enumerate(res[0]["plain"]):
        # each rank's contribution is encoded once; the sum is divided by the group size
        bound = sum(codec.error_bound(res[r]["local"][i]) for r in range(2)) / 2 + 1e-6
        for r in range(2):
            assert ((res[r]["ours"][i] - exact).abs() <= bound).all(), i


# ------------------------------------------------------------------- no pool needed


def test_register_refuses_a_non_ddp_model():
    with pytest.raises(ConfigError, match="DistributedDataParallel"):
        register(torch.nn.Linear(2, 2), CompressionState(codec="int8"))


def test_state_validates_its_arguments():
    with pytest.raises(UnknownCodecError):
        CompressionState(codec="no_such_codec")
    with pytest.raises(ConfigError, match="min_bytes"):
        CompressionState(min_bytes=-1)
    with pytest.raises(ConfigError, match="error_feedback"):
        CompressionState(error_feedback="yes")
    with pytest.raises(ConfigError, match="powersgd"):
        FSDPReduceScatter(codec="powersgd")
    with pytest.raises(ConfigError, match="min_bytes"):
        FSDPReduceScatter(min_bytes=-1)
    state = CompressionState(codec="sign")
    assert state.error_feedback  # a biased codec: on by default
    assert not CompressionState(codec="bf16").error_feedback
    with pytest.raises(ConfigError, match="keys"):
        state.load_state_dict({"codec": "sign"})
