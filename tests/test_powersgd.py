"""PowerSGD: the local codec, and the all-reduce against plain torch.distributed on gloo."""

from __future__ import annotations

import io

import pytest
import torch

import commpress
from commpress.algorithms.powersgd import (
    PowerSGDMemory,
    all_reduce_many,
    all_reduce_many_async,
    memory,
    plan,
    reset_memory,
)
from commpress.codecs.powersgd import PowerSGD, orthogonalize_
from commpress.errors import CodecMismatchError, ConfigError, UnsupportedDtypeError, WireError
from commpress.testing import (
    SHAPES,
    DistPool,
    check_bad_input,
    check_config,
    check_nonfinite,
    check_roundtrip,
    gaussian,
)
from commpress.wire import pack, unpack

SPECS = ("powersgd", "powersgd:rank=2,orthogonalize=gram_schmidt", "powersgd:rank=8,seed=7")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def low_rank(m: int, n: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)


# ------------------------------------------------------------------- codec


@pytest.mark.parametrize("spec", SPECS)
def test_codec_contract(spec):
    codec = commpress.get_codec(spec)
    assert isinstance(codec, PowerSGD) and codec.algorithm == "powersgd"
    check_config(codec)
    check_bad_input(codec)
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            check_roundtrip(codec, gaussian(shape, dtype))
    decoded = check_nonfinite(codec)
    if codec.compresses((600,), torch.float32):
        assert decoded.isnan().all()  # documented: non-finite input -> the whole tensor NaN
    else:
        assert torch.isfinite(decoded).sum() == 597  # raw: NaN/Inf stay where they were


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(96, 80), (40, 6, 10), (30, 2, 5, 7)])
def test_codec_exact_on_low_rank(spec, shape):
    codec = commpress.get_codec(spec)
    x = low_rank(shape[0], torch.Size(shape[1:]).numel(), codec.rank, seed=1).reshape(shape)
    packet = codec.encode(x)
    assert len(packet.payload) == 2, "should be sent as factors"
    m, n = shape[0], x.numel() // shape[0]
    assert packet.nbytes == (m + n) * codec.rank * 4 == codec.payload_nbytes(x.shape, x.dtype)
    assert rel_err(codec.decode(unpack(pack(packet), codec)), x) < 1e-5
    xb = x.to(torch.bfloat16)
    assert rel_err(codec.roundtrip(xb), xb) < 1e-2  # bf16 output rounding only


def test_codec_sizes_and_raw_fallback():
    codec = commpress.get_codec("powersgd:rank=4")
    assert codec.encoded_nbytes(10_000, torch.float32) is None  # depends on the shape
    # 1-D: near-square view with zero padding; compressed when it pays.
    assert PowerSGD.matrix_shape((1000,)) == (32, 32)
    assert PowerSGD.matrix_shape((1024,)) == (32, 32)
    assert PowerSGD.matrix_shape((7,)) == (3, 3)
    assert PowerSGD.matrix_shape((5, 3, 2)) == (5, 6)
    assert PowerSGD.matrix_shape(()) is None and PowerSGD.matrix_shape((0, 4)) is None
    for shape, compressed in [
        ((1000,), True),
        ((20,), False),
        ((8, 8), False),
        ((64, 64), True),
        ((4, 4096), False),
        ((2, 3, 4), False),
    ]:
        x = gaussian(shape)
        packet = codec.encode(x)
        assert (len(packet.payload) == 2) is compressed, shape
        assert packet.nbytes == codec.payload_nbytes(shape, x.dtype)
        if not compressed:
            assert torch.equal(codec.decode(packet), x)  # raw is lossless
    # min_compression counts bytes: the same shape is raw in bf16 but not in fp32.
    c = commpress.get_codec("powersgd:rank=4,min_compression=4")
    assert c.compresses((40, 40), torch.float32) and not c.compresses((40, 40), torch.bfloat16)
    assert torch.isinf(codec.error_bound(gaussian((3, 4)))).all()


def test_codec_bad_configs():
    for spec in (
        "powersgd:rank=0",
        "powersgd:rank=1025",
        "powersgd:rank=1.5",
        "powersgd:min_compression=0.5",
        "powersgd:orthogonalize=svd",
        "powersgd:seed=-1",
        "powersgd:warm_start=maybe",
        "powersgd:bogus=1",
    ):
        with pytest.raises(ConfigError):
            commpress.get_codec(spec)
    with pytest.raises(ConfigError, match="rank"):
        PowerSGD(rank=0)


def test_codec_rejects_corrupt_factors():
    codec = commpress.get_codec("powersgd")
    packet = codec.encode(gaussian((64, 64)))
    p, q = packet.payload
    bad = [(p[:-4], q), (p, q[:-1]), (p.double(), q), (p, q, q)]
    for payload in bad:
        with pytest.raises(WireError):
            codec.decode(commpress.Packet(tuple(payload), packet.meta))


@pytest.mark.parametrize("method", ["qr", "gram_schmidt"])
def test_orthogonalize_zero_and_rank_deficient(method):
    zero = orthogonalize_(torch.zeros(50, 4), method)
    assert torch.isfinite(zero).all()
    p = orthogonalize_(low_rank(50, 4, 1, seed=3), method)  # rank 1 in 4 columns
    assert torch.isfinite(p).all()
    gram = p.T @ p  # orthonormal columns, or zero ones (Gram-Schmidt drops the noise)
    assert torch.allclose(gram, torch.diag(torch.diag(gram)), atol=1e-5)
    assert all(abs(v - 1) < 1e-5 or abs(v) < 1e-5 for v in torch.diag(gram).tolist())
    full = orthogonalize_(gaussian((50, 4)), method)
    assert torch.allclose(full.T @ full, torch.eye(4), atol=1e-5)


def test_all_reduce_argument_errors():
    mem = PowerSGDMemory()
    x = [torch.zeros(4, 4)]
    with pytest.raises(ConfigError, match="powersgd"):
        all_reduce_many(
            x,
            "int8" if "int8" in commpress.list_codecs() else "bf16",
            average=False,
            memory=mem,
            keys=["a"],
        )
    with pytest.raises(ConfigError, match="keys"):
        all_reduce_many(x, "powersgd", average=False, memory=mem, keys=[])
    with pytest.raises(ConfigError, match="twice"):
        all_reduce_many(x * 2, "powersgd", average=False, memory=mem, keys=["a", "a"])
    with pytest.raises(UnsupportedDtypeError, match="int32"):
        all_reduce_many(
            [torch.zeros(4, dtype=torch.int32)], "powersgd", average=False, memory=mem, keys=["a"]
        )
    mem.spec = "powersgd:rank=2"
    with pytest.raises(CodecMismatchError, match="reset"):
        all_reduce_many(x, "powersgd", average=False, memory=mem, keys=["a"])


def test_plan_counts_wire_bytes():
    tensors = [torch.zeros(4096, 4096), torch.zeros(4096), torch.zeros(8, 8, dtype=torch.bfloat16)]
    layout = plan(tensors, "powersgd:rank=4")
    assert [i for i, _ in layout.matrices] == [0] and layout.raw == (1, 2)
    assert layout.factor_nbytes == 2 * 4096 * 4 * 4
    assert layout.raw_nbytes == 4096 * 4 + 64 * 2
    assert layout.wire_nbytes() == layout.raw_nbytes + layout.factor_nbytes


# ------------------------------------------------------- multi-process bodies
# Module-level so that the DistPool workers can import them.


def _shared_low_rank_body(rank, world, spec, average):
    import torch.distributed as dist

    r = commpress.get_codec(spec).rank
    a = low_rank(64, r, r, seed=10)  # shared column space
    # Small integers: the bf16 inputs are exactly rank r too (a rounded input would not
    # be, and one power iteration from a random Q may amplify that rounding noise).
    ai = torch.randint(-3, 4, (64, r), generator=torch.Generator().manual_seed(12)).float()
    g = torch.Generator().manual_seed(100 + rank)
    mats = [
        a @ torch.randn(r, 48, generator=g),
        (low_rank(32, r, r, seed=11) @ torch.randn(r, 60, generator=g)).reshape(32, 3, 4, 5),
        (ai @ torch.randint(-3, 4, (r, 48), generator=g).float()).to(torch.bfloat16),
        (ai @ torch.randint(-3, 4, (r, 48), generator=g).float()).to(torch.float16),
    ]
    ref = [m.clone().float() for m in mats]
    for t in ref:
        dist.all_reduce(t)
        if average:
            t.div_(world)
    all_reduce_many(mats, spec, average=average, memory=PowerSGDMemory(), keys=list("abcd"))
    return [rel_err(m.float(), t) for m, t in zip(mats, ref, strict=True)], [
        m.float() for m in mats
    ]


def _raw_exact_body(rank, world, average):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(rank)

    def ints(*shape, dtype=torch.float32):
        return torch.randint(-100, 100, shape, generator=g).to(dtype)

    tensors = [
        ints(10),
        ints(3, 3),
        ints(7, dtype=torch.bfloat16),
        ints(),
        ints(0),
        ints(200),
        ints(2, 5, 3, dtype=torch.float16),
        ints(64, 64),
    ]
    ref = [t.clone() for t in tensors]
    for t in ref:
        dist.all_reduce(t)
        if average:
            t.div_(world)
    keys = [f"t{i}" for i in range(len(tensors))]
    all_reduce_many(tensors, "powersgd:rank=4", average=average, memory=PowerSGDMemory(), keys=keys)
    raw = [torch.equal(t, r) for t, r in zip(tensors[:-1], ref[:-1], strict=True)]
    return (
        raw,
        [t.dtype == r.dtype and t.shape == r.shape for t, r in zip(tensors, ref, strict=True)],
        tensors,
    )


def _tracking_body(rank, world, spec, fixed, steps):
    """Cumulative output vs cumulative input, and the residual invariant, over steps."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(1000 + rank)
    mem = PowerSGDMemory()
    fixed_grad = torch.randn(32, 16, generator=g)
    cum_in = torch.zeros(32, 16)
    cum_out = torch.zeros(32, 16)
    errors, invariant = [], []
    for _ in range(steps):
        x = fixed_grad.clone() if fixed else torch.randn(32, 16, generator=g)
        before = mem.residual("w")
        compensated = x + (before if before is not None else 0)
        xin = x.clone()
        dist.all_reduce(xin)
        cum_in += xin
        all_reduce_many([x], spec, average=False, memory=mem, keys=["w"])
        cum_out += x
        errors.append(rel_err(cum_out, cum_in))
        # sum over ranks of residuals == sum of compensated inputs - summed output
        lhs = mem.residual("w").clone()
        rhs = compensated.clone()
        dist.all_reduce(lhs)
        dist.all_reduce(rhs)
        invariant.append(rel_err(lhs, rhs - x) if lhs.norm() > 0 else 0.0)
    return errors, invariant, x


def _warm_body(rank, world, spec, steps):
    import torch.distributed as dist

    u = torch.linalg.qr(gaussian((48, 2), seed=20)).Q
    v = torch.linalg.qr(gaussian((40, 2), seed=21)).Q
    g = torch.Generator().manual_seed(rank)
    mem = PowerSGDMemory()
    errors, outs = [], []
    for _ in range(steps):
        noise = 1e-4 * torch.randn(48, 40, generator=g)
        x = u @ torch.diag(torch.tensor([10.0, 1.0])) @ v.T + noise
        ref = x.clone()
        dist.all_reduce(ref)
        all_reduce_many([x], spec, average=False, memory=mem, keys=["w"])
        errors.append(rel_err(x, ref))
        outs.append(x)
    return errors, len(mem.state_dict()["q"]), outs


def _state_body(rank, world):
    g = torch.Generator().manual_seed(7 + rank)
    data = [[torch.randn(40, 30, generator=g), torch.randn(30, generator=g)] for _ in range(5)]
    keys = [("layer", 0), ("layer", 1)]
    mem = PowerSGDMemory()
    for step in data[:3]:
        all_reduce_many(
            [t.clone() for t in step], "powersgd:rank=2", average=True, memory=mem, keys=keys
        )
    buf = io.BytesIO()
    torch.save(mem.state_dict(), buf)
    restored = PowerSGDMemory()
    restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    outs = []
    for m in (mem, restored):
        ts = [t.clone() for t in data[3]]
        all_reduce_many(ts, "powersgd:rank=2", average=True, memory=m, keys=keys)
        outs.append(ts)
    same = all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    try:  # a key reused for a tensor of another shape
        all_reduce_many([torch.zeros(30, 40)], "powersgd:rank=2", average=True, memory=mem,
                        keys=[keys[0]])  # fmt: skip
        reused = "no error"
    except ConfigError as exc:
        reused = str(exc)
    return same, len(restored), restored.spec, reused


def _nonfinite_body(rank, world, spec):
    g = torch.Generator().manual_seed(rank)
    mem = PowerSGDMemory()
    keys = ["bad", "good", "zero", "vec"]
    first = [
        torch.randn(64, 32, generator=g),
        torch.randn(64, 32, generator=g),
        torch.zeros(64, 32),
        torch.randn(20, generator=g),
    ]
    if rank == 0:
        first[0][3, 4] = float("nan")
        first[3][2] = float("inf")
    all_reduce_many(first, spec, average=True, memory=mem, keys=keys)
    second = [torch.randn(64, 32, generator=g) for _ in range(3)] + [torch.randn(20, generator=g)]
    all_reduce_many(second, spec, average=True, memory=mem, keys=keys)
    return (
        bool(first[0].isnan().all()),
        bool(torch.isfinite(first[1]).all()),
        bool((first[2] == 0).all()),
        bool(first[3][2].isinf()) and bool(torch.isfinite(first[3][:2]).all()),
        all(bool(torch.isfinite(t).all()) for t in second),
        [t for t in first + second],
    )


def _chained_body(rank, world, spec, steps):
    """Two chained calls in flight per step (the second posts after the first) against
    the blocking calls on the same inputs; the first call of all waits for a failed
    future, which holds it back but does not fail it."""
    g = torch.Generator().manual_seed(50 + rank)

    def inputs():
        first = [torch.randn(40, 30, generator=g), torch.randn(30, generator=g)]
        second = [torch.randn(24, 8, generator=g).double(), torch.randn(16, 12, generator=g)]
        return first, second

    data = [inputs() for _ in range(steps)]
    keys = (["w", "b"], ["v", "u"])
    blocking, chained = PowerSGDMemory(), PowerSGDMemory()
    out_blocking, out_chained = [], []
    for first, second in data:
        ts = [[t.clone() for t in first], [t.clone() for t in second]]
        for part, k in zip(ts, keys, strict=True):
            all_reduce_many(part, spec, average=True, memory=blocking, keys=k)
        out_blocking.append(ts)
    failed = torch.futures.Future()
    failed.set_exception(RuntimeError("an earlier call failed"))
    for step, (first, second) in enumerate(data):
        ts = [[t.clone() for t in first], [t.clone() for t in second]]
        after = failed if step == 0 else None
        one = all_reduce_many_async(
            ts[0], spec, average=True, memory=chained, keys=keys[0], after=after
        )
        two = all_reduce_many_async(
            ts[1], spec, average=True, memory=chained, keys=keys[1], after=one.posted
        )
        two.done.wait()
        one.done.wait()
        out_chained.append(ts)
    return out_blocking, out_chained


# ---------------------------------------------------------- multi-process tests


@pytest.fixture(scope="module")
def pool2():
    with DistPool(2) as p:
        yield p


@pytest.fixture(scope="module")
def pool3():
    with DistPool(3) as p:
        yield p


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _identical(per_rank):
    """Every rank's tensors are bit-identical to rank 0's (NaN payloads included)."""
    first = per_rank[0]
    for other in per_rank[1:]:
        assert len(other) == len(first)
        for a, b in zip(first, other, strict=True):
            assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("spec", ["powersgd:rank=2", "powersgd:rank=3,orthogonalize=gram_schmidt"])
@pytest.mark.parametrize("average", [False, True])
def test_rank_r_sum_is_near_exact(world, spec, average, pool2, pool3):
    pool = pool2 if world == 2 else pool3
    results = pool.run(_shared_low_rank_body, spec, average)
    for errs, _ in results:
        assert errs[0] < 1e-5 and errs[1] < 1e-5, errs
        assert errs[2] < 1e-2 and errs[3] < 1e-3, errs  # bfloat16 / float16 output rounding
    _identical([outs for _, outs in results])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("average", [False, True])
def test_uncompressed_tensors_are_exact(world, average, pool2, pool3):
    pool = pool2 if world == 2 else pool3
    results = pool.run(_raw_exact_body, average)
    for raw, meta, _ in results:
        assert all(raw), raw
        assert all(meta), meta
    _identical([t for _, _, t in results])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("fixed", [True, False])
def test_error_feedback_tracks_cumulative_sum(world, fixed, pool2, pool3):
    pool = pool2 if world == 2 else pool3
    results = pool.run(_tracking_body, "powersgd:rank=2", fixed, 40)
    for errors, invariant, _ in results:
        # One step drops most of a random matrix; the cumulative sums converge.
        assert errors[0] > 0.5
        if fixed:  # the residual stays bounded while the sums grow like T
            assert errors[-1] < errors[0] / 4 and errors[-1] < errors[19] < errors[0], errors
        else:  # the sums grow like sqrt(T) only
            assert errors[-1] < errors[0] / 2, errors
        assert max(invariant) < 1e-4, invariant
    _identical([[x] for _, _, x in results])


def test_warm_start_aligns_q(pool2):
    # A strong rank-2 signal plus faint full-rank noise: from a random Q one power
    # iteration can be poorly aligned (noise amplified by the bad conditioning of
    # V^T Q); from last call's Q it is aligned, so later calls are near the noise floor.
    warm = pool2.run(_warm_body, "powersgd:rank=2", 6)
    cold = pool2.run(_warm_body, "powersgd:rank=2,warm_start=0", 6)
    assert max(warm[0][0][1:]) < 1e-3, warm[0][0]
    assert max(warm[0][0][1:]) * 5 < max(cold[0][0][1:]), (warm[0][0], cold[0][0])
    assert warm[0][1] == 1 and cold[0][1] == 0  # Q kept per key only with warm start
    _identical([w[2] for w in warm])


@pytest.mark.parametrize("world", [2, 3])
def test_memory_state_dict_round_trip(world, pool2, pool3):
    pool = pool2 if world == 2 else pool3
    for same, keys, spec, reused in pool.run(_state_body):
        assert same and keys == 2 and spec == "powersgd:rank=2"
        assert "distinct key" in reused, reused


@pytest.mark.parametrize("spec", ["powersgd", "powersgd:orthogonalize=gram_schmidt"])
def test_nonfinite_and_zero(spec, pool3):
    results = pool3.run(_nonfinite_body, spec)
    for nan_all, good_finite, zero_zero, vec_inf, second_finite, _ in results:
        assert nan_all and good_finite and zero_zero and vec_inf and second_finite
    _identical([r[-1] for r in results])


def test_memory_rejects_malformed_state():
    mem = PowerSGDMemory()
    with pytest.raises(ConfigError):
        mem.load_state_dict({"codec": "powersgd"})
    state = mem.state_dict()
    state["version"] = 99
    with pytest.raises(ConfigError, match="version"):
        mem.load_state_dict(state)


@pytest.mark.parametrize("world", [2, 3])
def test_chained_calls_match_blocking_calls(world, pool2, pool3):
    pool = pool2 if world == 2 else pool3
    results = pool.run(_chained_body, "powersgd:rank=2", 3)
    for blocking, chained in results:
        for b_step, c_step in zip(blocking, chained, strict=True):
            for b_part, c_part in zip(b_step, c_step, strict=True):
                for a, b in zip(b_part, c_part, strict=True):
                    assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))
    _identical([[t for step in chained for part in step for t in part] for _, chained in results])


def test_memory_store_one_per_codec_config():
    import commpress.distributed as cdist

    reset_memory()
    mem = memory("powersgd:rank=2")
    assert mem is memory(commpress.get_codec("powersgd:rank=2"))
    assert mem is not memory("powersgd:rank=3")
    assert cdist.powersgd_memory("powersgd:rank=2") is mem  # the face's name for it
    reset_memory()
    assert memory("powersgd:rank=2") is not mem
