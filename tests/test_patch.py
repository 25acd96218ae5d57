"""commpress.patch(): swapping, exact restoration, lossless transparency, DDP auto-hook."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

import commpress
from commpress.errors import ConfigError, UnknownCodecError
from commpress.patch import COLLECTIVES, is_patched, patched_names
from commpress.policy import get_policy
from commpress.testing import DistPool


@pytest.fixture(scope="module")
def pool():
    with DistPool(2) as p:
        yield p


def _originals():
    from torch.nn.parallel import DistributedDataParallel as DDP

    fns = {(m.__name__, n): m.__dict__.get(n) for m in (dist, c10d) for n in COLLECTIVES}
    return fns, DDP.__dict__["__init__"]


# ------------------------------------------------------------ in this process, no process group


def test_patch_unpatch_restores_identity_without_a_process_group():
    assert not dist.is_initialized()  # patching before init_process_group must work
    fns, ddp_init = _originals()
    policy = get_policy()
    commpress.patch(codec="int8")
    try:
        assert is_patched()
        assert dist.all_reduce is not fns[("torch.distributed", "all_reduce")]
        assert dist.all_reduce is c10d.all_reduce  # both names swapped alike
        assert dist.all_reduce.__wrapped__ is fns[("torch.distributed", "all_reduce")]
        assert "torch.distributed.all_gather_single" in patched_names()
        assert get_policy().codec == "int8"
        first = dist.broadcast
        commpress.patch(codec="fp16")  # patching twice: no double wrapping
        assert (
            dist.broadcast is first
            and dist.broadcast.__wrapped__ is fns[("torch.distributed", "broadcast")]
        )
        # object collectives are never swapped
        assert dist.all_gather_object is c10d.all_gather_object
    finally:
        commpress.unpatch()
    assert not is_patched() and get_policy() == policy
    after, ddp_after = _originals()
    assert all(after[k] is v for k, v in fns.items())
    assert ddp_after is ddp_init
    commpress.unpatch()  # harmless when not patched


def test_context_manager_nesting_restores_outer_policy():
    fns, _ = _originals()
    before = get_policy()
    with commpress.patch(codec="int8", min_bytes=123) as outer:
        assert outer.active and get_policy().min_bytes == 123
        with commpress.patch(codec="bf16"):
            assert get_policy().codec == "bf16"
        assert get_policy().codec == "int8" and is_patched()
    assert not is_patched() and get_policy() == before and not outer.active
    assert dist.all_reduce is fns[("torch.distributed", "all_reduce")]


def test_bad_codec_or_option_fails_at_patch_time_and_patches_nothing():
    fns, _ = _originals()
    with pytest.raises(UnknownCodecError, match="registered codecs"):
        commpress.patch(codec="int9")
    with pytest.raises(ConfigError, match="block"):
        commpress.patch(codec="int8:block=abc")
    with pytest.raises(ConfigError, match="unknown policy option"):
        commpress.patch(codec="int8", min_byte=4)
    assert not is_patched() and dist.all_reduce is fns[("torch.distributed", "all_reduce")]


def test_name_bound_while_patched_calls_the_original_afterwards():
    original = dist.all_reduce
    with commpress.patch(codec="int8"):
        bound = dist.all_reduce
    assert bound is not original and bound.__wrapped__ is original
    with pytest.raises(Exception) as direct:  # no process group in this process
        original(torch.zeros(1))
    with pytest.raises(type(direct.value), match="process group"):
        bound(torch.zeros(1))


# --------------------------------------------------------------------- on 2 gloo ranks


def _suite(rank, world):
    """Every intercepted call, on identical inputs; returns results and return values."""
    sub = dist.new_group([0, 1])
    out = {}

    def t(*shape, dtype=torch.float32, salt=0):
        g = torch.Generator().manual_seed(10 * rank + salt)
        if dtype.is_floating_point:
            return torch.randn(*shape, generator=g).to(dtype)
        return torch.randint(-50, 50, shape, generator=g, dtype=dtype)

    x = t(300)
    out["all_reduce"] = (dist.all_reduce(x), x)
    y = t(7, 9, dtype=torch.float64, salt=1)
    out["all_reduce_f64_sub"] = (dist.all_reduce(y, group=sub), y)
    z = t(100, dtype=torch.int64, salt=2)
    out["all_reduce_max_int"] = (dist.all_reduce(z, op=dist.ReduceOp.MAX), z)
    a = t(256, salt=3)
    work = dist.all_reduce(a, async_op=True)
    out["all_reduce_async"] = (isinstance(work, dist.Work), work.wait(), a)
    r = t(64, salt=4)
    # torch leaves the input of non-destination ranks unspecified (gloo uses it as scratch)
    out["reduce"] = (dist.reduce(r, dst=1), r if rank == 1 else None)
    lst = [torch.empty(50, dtype=torch.bfloat16) for _ in range(world)]
    out["all_gather"] = (dist.all_gather(lst, t(50, dtype=torch.bfloat16, salt=5)), lst)
    o = torch.empty(world * 40)
    out["all_gather_into_tensor"] = (dist.all_gather_into_tensor(o, t(40, salt=6)), o)
    o2 = torch.empty(world * 40)
    out["all_gather_single"] = (dist.all_gather_single(o2, t(40, salt=7)), o2)
    rs = torch.empty(30)
    out["reduce_scatter"] = (dist.reduce_scatter(rs, [t(30, salt=8 + i) for i in range(world)]), rs)
    rst = torch.empty(30)
    out["reduce_scatter_tensor"] = (dist.reduce_scatter_tensor(rst, t(30 * world, salt=10)), rst)
    rss = torch.empty(30)
    out["reduce_scatter_single"] = (dist.reduce_scatter_single(rss, t(30 * world, salt=11)), rss)
    b = t(3, 33, salt=12)
    out["broadcast"] = (dist.broadcast(b, src=1), b)
    outs = [torch.empty(20) for _ in range(world)]
    ins = [t(20, salt=13 + i) for i in range(world)]
    out["all_to_all"] = (dist.all_to_all(outs, ins), outs)
    in_splits = [1, 3] if rank == 0 else [2, 4]
    out_splits = [1, 2] if rank == 0 else [3, 4]
    a2a = torch.empty(sum(out_splits), 16)
    res = dist.all_to_all_single(a2a, t(sum(in_splits), 16, salt=15), out_splits, in_splits)
    out["all_to_all_single_uneven"] = (res, a2a)
    p2p = t(70, salt=16)
    if rank == 0:
        out["send"] = (dist.send(p2p, dst=1),)
        recv_buf = torch.empty(70)
        out["recv"] = (dist.recv(recv_buf, src=1), recv_buf)
    else:
        recv_buf = torch.empty(70)
        out["recv"] = (dist.recv(recv_buf, src=0), recv_buf)
        out["send"] = (dist.send(p2p, dst=0),)
    ib = torch.empty(70)
    rw = dist.irecv(ib, src=1 - rank)
    sw = dist.isend(t(70, salt=17), dst=1 - rank)
    out["isend_irecv"] = (
        isinstance(sw, dist.Work),
        isinstance(rw, dist.Work),
        sw.wait(),
        rw.wait(),
        ib,
    )
    gl = [torch.empty(25) for _ in range(world)] if rank == 0 else None
    out["gather"] = (dist.gather(t(25, salt=18), gl, dst=0), gl)
    sc = torch.empty(25)
    sl = [t(25, salt=19 + i) for i in range(world)] if rank == 0 else None
    out["scatter"] = (dist.scatter(sc, sl, src=0), sc)
    objs = [None] * world
    dist.all_gather_object(objs, {"rank": rank, "blob": list(range(1000))})
    out["all_gather_object"] = (objs,)
    bl = [{"from": rank}]
    dist.broadcast_object_list(bl, src=0)
    out["broadcast_object_list"] = (bl,)
    return out


def _plain_and_patched(rank, world, spec):
    plain = _suite(rank, world)
    commpress.reset_stats()
    with commpress.patch(codec=spec, min_bytes=0):
        patched = _suite(rank, world)
    return plain, patched, commpress.stats()


def _same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_lossless_patch_is_transparent_for_every_intercepted_call(pool):
    res = pool.run(_plain_and_patched, "zstd")
    for rank, (plain, patched, stats) in enumerate(res):
        assert plain.keys() == patched.keys()
        for name in plain:
            _same(plain[name], patched[name], f"rank {rank} {name}")
        # really went through commpress, compressed, except what must not be
        assert stats["broadcast"].compressed >= 1 and stats["all_reduce"].calls >= 4
        assert stats["all_gather"].calls == 1  # all_gather_object stayed with torch


def _lossy(rank, world):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(rank))
    exact = x.clone()
    dist.all_reduce(exact)
    commpress.reset_stats()
    with commpress.patch(codec="int8", min_bytes=0):
        got = x.clone()
        assert dist.all_reduce(got) is None
        work = dist.all_reduce(x.clone(), async_op=True)
        assert isinstance(work, dist.Work) and work.wait()
        assert isinstance(work.get_future().wait(), list)
    return exact, got, commpress.stats()["all_reduce"]


def test_lossy_patch_compresses(pool):
    res = pool.run(_lossy)
    exact, got, stats = res[0]
    assert stats.compressed == 2 and stats.ratio > 2
    assert torch.equal(got, res[1][1])  # every rank gets the same result
    err = ((got - exact).norm() / exact.norm()).item()
    assert 0 < err < 0.02


def _ddp(rank, world):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from commpress.hooks import compress_hook

    def grads(net, model):
        g = torch.Generator().manual_seed(rank)
        net(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))

    m0 = model()
    plain = grads(DDP(m0), m0)
    m_local = model()
    local = grads(m_local, m_local)
    with commpress.patch(codec="fp16", min_bytes=0):
        m1 = model()
        hooked = DDP(m1)
        auto = grads(hooked, m1)
        auto_hook = hooked._comm_hooks[0][0]
        m2 = model()
        mine = DDP(m2)
        mine.register_comm_hook(None, allreduce_hook)  # after construction: still allowed
        user = grads(mine, m2)
        user_hooks = [h for h, _ in mine._comm_hooks]
    m3 = model()
    after = DDP(m3)  # built after unpatch: no hook
    grads(after, m3)
    hooks_ok = auto_hook is compress_hook and user_hooks == [allreduce_hook]
    return plain, auto, user, local, hooks_ok, after._comm_hooks


def test_ddp_built_while_patched_gets_the_compression_hook(pool):
    res = pool.run(_ddp)
    plain, auto, user, _, hooks_ok, after_hooks = res[0]
    assert hooks_ok and after_hooks == []
    fp16 = commpress.get_codec("fp16")
    for i, p in enumerate(plain):
        # each rank's pre-divided share is cast once (fp16 is summed directly)
        bound = sum(fp16.error_bound(r[3][i] / 2) for r in res) + fp16.error_bound(p)
        assert ((auto[i] - p).abs() <= bound + 1e-8).all()
        # torch's allreduce_hook calls dist.all_reduce, which the patch compresses too
        assert ((user[i] - p).abs() <= bound + 1e-8).all()


def _fsdp2(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def run():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
        mesh = init_device_mesh("cpu", (world,))
        for layer in (m[0], m[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        out = m(torch.randn(16, 64, generator=torch.Generator().manual_seed(rank)))
        out.pow(2).mean().backward()
        return out.detach(), [p.grad.full_tensor() for p in m.parameters()]

    plain = run()
    commpress.reset_stats()
    with commpress.patch(codec="int8", min_bytes=0, ops={"reduce_scatter"}):
        grads_only = run()
    return plain, grads_only, commpress.stats()


def test_fsdp2_gradients_compressed_when_patched(pool):
    (out, grads), (out_rs, grads_rs), stats = pool.run(_fsdp2)[0]
    # FSDP2 calls dist.all_gather_single / dist.reduce_scatter_single: both intercepted
    assert stats["reduce_scatter_tensor"].compressed == stats["reduce_scatter_tensor"].calls > 0
    assert stats["all_gather_into_tensor"].calls > 0
    assert stats["all_gather_into_tensor"].compressed == 0  # ops= kept parameters exact
    assert torch.equal(out_rs, out)
    for g_rs, g in zip(grads_rs, grads, strict=True):
        assert 0 < ((g_rs - g).norm() / g.norm()).item() < 0.05


# ------------------------------------------- torch's own argument errors, before communicating


def _torch_errors(rank, world_size):
    """(type name, message) of each bad call, plain and under patch(zstd, min_bytes=0)."""
    import torch.distributed as dist

    x = torch.ones(64)
    bad_calls = [
        lambda: dist.all_reduce(torch.ones(64, dtype=torch.complex64), op=dist.ReduceOp.MAX),
        lambda: dist.all_reduce([x]),
        lambda: dist.all_gather([torch.ones(64, dtype=torch.float16)] * world_size, x),
        lambda: dist.all_gather(torch.ones(2, 64), x),
        lambda: dist.reduce_scatter(x, (x, x)),
        lambda: dist.all_to_all([x, x], [x, x.double()]),
        lambda: dist.broadcast(x, src=0, group_src=0),
        lambda: dist.gather(x, [x.half(), x.half()], dst=0),
        lambda: dist.all_reduce(x, dist.ReduceOp.SUM, None, False, "extra"),
    ]

    def outcome(call):
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - comparing what each side raises
            return type(exc).__name__, str(exc)
        return None

    plain = [outcome(c) for c in bad_calls]
    with commpress.patch(codec="zstd", min_bytes=0):
        patched = [outcome(c) for c in bad_calls]
        # the good call after the bad ones still works and is compressed
        t = torch.full((4096,), 1.0 + rank)
        dist.all_reduce(t)
    return plain, patched, t[0].item()


def test_patched_calls_raise_torchs_own_errors(pool):
    for plain, patched, total in pool.run(_torch_errors):
        assert all(p is not None for p in plain), plain
        assert patched == plain
        assert total == 3.0
    assert plain[0][0] == "ValueError" and plain[0][1].endswith("MAX on complex tensors")
