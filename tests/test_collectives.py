"""commpress.distributed against plain torch.distributed on gloo, with 2 and 3 ranks.

Every test body runs on all ranks of a shared `DistPool` (``gloo`` fixtures in
conftest.py), computes the plain ``torch.distributed`` result on the same
inputs, checks the compressed one against it *on the rank*, and returns a
`Report`: a list of problems (empty when all is well) and digests of outputs
that must be bit-identical on every rank. Expected errors are caught and
reported by the bodies, so a failing case never forces a pool restart.

Error bounds: `commpress.testing.collective` (its docstring derives them).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time

import torch
import torch.distributed as dist

import commpress
import commpress.distributed as cdist
from commpress import CodecMismatchError, ConfigError, get_codec
from commpress.engine import Engine, set_engine
from commpress.errors import UnsupportedDtypeError
from commpress.policy import Policy, decide, using
from commpress.testing import RankDied, gaussian
from commpress.testing.collective import Report, assert_reports, piece_bound, reduce_bound

R = dist.ReduceOp
SPECS = ["none", "bf16", "fp16", "int8", "int4", "fp8", "sign", "topk", "zstd", "int8+zstd"]
# torch 2.13 renamed these (the old names warn); the reference uses whichever exists.
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
N = 1001  # odd: chunks of 3 ranks differ in length and straddle codec blocks


LOSSY = [s for s in SPECS if not get_codec(s).lossless]


class _Skip(Exception):
    """Leaves a case that does not apply."""


def _inputs(world: int, numel: int = N, seed: int = 100) -> list[torch.Tensor]:
    return [gaussian(numel, seed=seed + r) for r in range(world)]


# ============================================================ reductions
def _all_reduce_body(rank, world, specs):
    rep = Report()
    xs = _inputs(world)
    base = Policy(min_bytes=0, error_feedback=False)
    for spec in specs:
        codec = get_codec(spec)
        for algorithm in ("auto", "two_phase", "gather"):
            for op in (R.SUM, R.AVG):
                name = f"all_reduce {spec} {algorithm} {op}"
                with rep.case(name), using(base.replace(algorithm=algorithm)):
                    x = xs[rank].clone()
                    ref = x.clone()
                    dist.all_reduce(ref, op)
                    cdist.all_reduce(x, op, codec=spec)
                    algo = decide("all_reduce", x, op, spec, world_size=world).algorithm
                    rep.within(name, x, ref, reduce_bound(codec, algo, xs, op, world))
                    rep.digest(name, x)
    return rep.result()


def test_all_reduce_matches_plain_within_bound(gloo):
    assert_reports(gloo.run(_all_reduce_body, SPECS))


#: Relative rounding of casting the float32 result back to the input dtype.
CAST_REL = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 0.0}


def _dtypes_body(rank, world, specs):
    rep = Report()
    with using(Policy(min_bytes=0, error_feedback=False)):
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            xs = [x.to(dtype) for x in _inputs(world, seed=400)]
            exact = sum(x.double() for x in xs)
            for spec in specs:
                for algorithm in ("auto", "two_phase", "gather"):
                    name = f"all_reduce {dtype} {spec} {algorithm}"
                    with rep.case(name), using(algorithm=algorithm):
                        x = xs[rank].clone()
                        cdist.all_reduce(x, codec=spec)
                        algo = decide("all_reduce", x, R.SUM, spec, world_size=world).algorithm
                        bound = reduce_bound(get_codec(spec), algo, xs, R.SUM, world)
                        bound = bound + CAST_REL[dtype] * (exact.abs() + bound)
                        rep.check(name, x.dtype == dtype, f"dtype became {x.dtype}")
                        rep.within(name, x.double(), exact, bound)
                        rep.digest(name, x)
    return rep.result()


def test_all_reduce_16bit_and_float64_inputs(gloo):
    assert_reports(gloo.run(_dtypes_body, ["bf16", "fp16", "int8", "fp8", "zstd"]))


def _reduce_body(rank, world, specs):
    rep = Report()
    xs = _inputs(world, seed=200)
    k = 37
    chunks = [gaussian(world * k, seed=300 + r) for r in range(world)]
    base = Policy(min_bytes=0, error_feedback=False)
    dst = world - 1
    for spec in specs:
        codec = get_codec(spec)
        for op in (R.SUM, R.AVG):
            with using(base):
                name = f"reduce {spec} {op}"
                with rep.case(name):
                    x = xs[rank].clone()
                    ref = x.clone()
                    dist.reduce(ref, dst, op)
                    cdist.reduce(x, dst, op, codec=spec)
                    d = decide("reduce", x, op, spec, world_size=world)
                    if rank == dst:
                        rep.within(name, x, ref, reduce_bound(codec, d.algorithm, xs, op, world))
                    elif d.compressed:  # plain torch leaves non-dst tensors unspecified
                        rep.exact(name + " (non-dst unchanged)", x, xs[rank])
                name = f"reduce_scatter_tensor {spec} {op}"
                with rep.case(name):
                    out, ref = torch.empty(k), torch.empty(k)
                    REDUCE_SCATTER(ref, chunks[rank].clone(), op)
                    cdist.reduce_scatter_tensor(out, chunks[rank].clone(), op, codec=spec)
                    mine = [c[rank * k : (rank + 1) * k] for c in chunks]
                    rep.within(name, out, ref, reduce_bound(codec, "gather", mine, op, world))
                name = f"reduce_scatter {spec} {op}"
                with rep.case(name):
                    out, ref = torch.empty(k), torch.empty(k)
                    pieces = list(chunks[rank].clone().split(k))
                    dist.reduce_scatter(ref, [p.clone() for p in pieces], op)
                    cdist.reduce_scatter(out, pieces, op, codec=spec)
                    mine = [c[rank * k : (rank + 1) * k] for c in chunks]
                    rep.within(name, out, ref, reduce_bound(codec, "gather", mine, op, world))
    return rep.result()


def test_reduce_and_reduce_scatter_match_plain(gloo):
    assert_reports(gloo.run(_reduce_body, SPECS))


def _exact_body(rank, world, lossy, lossless):
    rep = Report()
    with using(Policy(min_bytes=0)):
        commpress.reset_stats()
        ints = torch.arange(300, dtype=torch.int32) * (rank + 1) - 7
        floats = gaussian(300, seed=rank)
        for spec in lossy:
            name = f"int32 all_reduce with {spec}"
            with rep.case(name):
                a, ref = ints.clone(), ints.clone()
                dist.all_reduce(ref)
                cdist.all_reduce(a, codec=spec)
                rep.exact(name, a, ref)
            name = f"int32 broadcast/all_gather with {spec}"
            with rep.case(name):
                a, ref = ints.clone(), ints.clone()
                dist.broadcast(ref, 0)
                cdist.broadcast(a, 0, codec=spec)
                rep.exact(name, a, ref)
                outs = [torch.empty_like(ints) for _ in range(world)]
                refs = [torch.empty_like(ints) for _ in range(world)]
                dist.all_gather(refs, ints)
                cdist.all_gather(outs, ints, codec=spec)
                rep.exact(name, torch.stack(outs), torch.stack(refs))
            for op in (R.MIN, R.MAX, R.PRODUCT):
                name = f"float {op} with {spec}"
                with rep.case(name):
                    a, ref = floats.clone(), floats.clone()
                    dist.all_reduce(ref, op)
                    cdist.all_reduce(a, op, codec=spec)
                    rep.exact(name, a, ref)
        s = commpress.stats()
        for op in ("all_reduce", "broadcast", "all_gather"):
            rep.check(
                f"stats[{op}]",
                s[op].compressed == 0,
                f"{s[op].compressed} calls were compressed; none may be",
            )
        for spec in lossless:
            commpress.reset_stats()
            name = f"{spec}: MAX of floats and SUM of int64 compressed, exact"
            with rep.case(name):
                a, ref = floats.clone(), floats.clone()
                dist.all_reduce(ref, R.MAX)
                cdist.all_reduce(a, R.MAX, codec=spec)
                rep.exact(name + " (MAX)", a, ref)
                big = ints.to(torch.int64) * 1_000_003
                a, ref = big.clone(), big.clone()
                dist.all_reduce(ref)
                cdist.all_reduce(a, codec=spec)
                rep.exact(name + " (SUM int64)", a, ref)
                rep.check(
                    name,
                    commpress.stats()["all_reduce"].compressed == 2,
                    "a lossless codec must compress exact reductions",
                )
        name = "AVG of an integer tensor"
        try:
            cdist.all_reduce(ints.clone(), R.AVG, codec=lossy[0] if lossy else "zstd")
            rep.check(name, False, "no error")
        except UnsupportedDtypeError as exc:
            rep.check(name, "AVG" in str(exc) and "int32" in str(exc), str(exc))
    return rep.result()


def test_integer_and_exact_ops_are_never_lossy(gloo):
    assert_reports(gloo.run(_exact_body, LOSSY, ["zstd", "lz4"]))


# ============================================================ transport
def _transport_body(rank, world, specs):
    rep = Report()
    root = world - 1
    for spec in specs:
        with using(Policy(min_bytes=0)):
            name = f"broadcast {spec}"
            with rep.case(name):
                t = gaussian((7, 13), seed=1) if rank == root else torch.zeros(7, 13)
                ref = t.clone()
                dist.broadcast(ref, root)
                cdist.broadcast(t, root, codec=spec)
                rep.within(name, t, ref, piece_bound(spec, ref))
                rep.digest(name, t)
            name = f"all_gather {spec}"
            with rep.case(name):
                t = gaussian((5, 11), seed=10 + rank)
                outs = [torch.empty(5, 11) for _ in range(world)]
                refs = [torch.empty(5, 11) for _ in range(world)]
                dist.all_gather(refs, t)
                cdist.all_gather(outs, t, codec=spec)
                for r in range(world):
                    rep.within(f"{name} [{r}]", outs[r], refs[r], piece_bound(spec, refs[r]))
                rep.digest(name, torch.stack(outs))
            name = f"all_gather_into_tensor {spec}"
            with rep.case(name):
                t = gaussian((5, 11), seed=20 + rank)
                out, ref = torch.empty(world * 5, 11), torch.empty(world * 5, 11)
                ALL_GATHER(ref, t)
                cdist.all_gather_into_tensor(out, t, codec=spec)
                bound = torch.cat([piece_bound(spec, p) for p in ref.split(5)])
                rep.within(name, out, ref, bound)
                rep.digest(name, out)
            name = f"gather {spec}"
            with rep.case(name):
                t = gaussian(29, seed=30 + rank)
                outs = [torch.empty(29) for _ in range(world)] if rank == root else None
                refs = [torch.empty(29) for _ in range(world)] if rank == root else None
                dist.gather(t, refs, root)
                cdist.gather(t, outs, root, codec=spec)
                if rank == root:
                    for r in range(world):
                        rep.within(f"{name} [{r}]", outs[r], refs[r], piece_bound(spec, refs[r]))
            name = f"scatter {spec}"
            with rep.case(name):
                pieces = (
                    [gaussian((3, 9), seed=40 + j) for j in range(world)] if rank == 0 else None
                )
                out, ref = torch.empty(3, 9), torch.empty(3, 9)
                dist.scatter(ref, pieces, 0)
                cdist.scatter(out, pieces, 0, codec=spec)
                rep.within(name, out, ref, piece_bound(spec, ref))
            name = f"all_to_all {spec}"
            with rep.case(name):
                ins = [gaussian((2, 3), seed=50 + 10 * rank + j) for j in range(world)]
                outs = [torch.empty(2, 3) for _ in range(world)]
                refs = [torch.empty(2, 3) for _ in range(world)]
                dist.all_to_all(refs, ins)
                cdist.all_to_all(outs, ins, codec=spec)
                for i in range(world):
                    rep.within(f"{name} [{i}]", outs[i], refs[i], piece_bound(spec, refs[i]))
            name = f"all_to_all uneven {spec}"
            # gloo's own list all_to_all refuses uneven sizes, and codec "none" is plain torch
            with rep.case(name), contextlib.suppress(_Skip):
                if spec == "none":
                    raise _Skip
                ins = [gaussian((rank + j + 1, 3), seed=60 + 10 * rank + j) for j in range(world)]
                outs = [torch.empty(i + rank + 1, 3) for i in range(world)]
                cdist.all_to_all(outs, ins, codec=spec)
                for i in range(world):
                    ref = gaussian((i + rank + 1, 3), seed=60 + 10 * i + rank)
                    rep.within(f"{name} [{i}]", outs[i], ref, piece_bound(spec, ref))
            name = f"all_to_all_single uneven {spec}"
            with rep.case(name):
                in_splits = [(rank + j) % 3 for j in range(world)]
                out_splits = [(i + rank) % 3 for i in range(world)]
                x = gaussian((sum(in_splits), 4), seed=70 + rank)
                out = torch.empty(sum(out_splits), 4)
                ref = torch.empty(sum(out_splits), 4)
                dist.all_to_all_single(ref, x, out_splits, in_splits)
                cdist.all_to_all_single(out, x, out_splits, in_splits, codec=spec)
                bound = torch.cat([piece_bound(spec, p) for p in ref.split(out_splits)])
                rep.within(name, out, ref, bound)
            name = f"isend/irecv ring {spec}"
            with rep.case(name):
                nxt, prv = (rank + 1) % world, (rank - 1) % world
                t = gaussian(50, seed=80 + rank)
                got, ref = torch.empty(50), torch.empty(50)
                hr, hs = dist.irecv(ref, prv), dist.isend(t, nxt)
                hs.wait()
                hr.wait()
                hr = cdist.irecv(got, prv, codec=spec)  # posted before the send: no deadlock
                hs = cdist.isend(t, nxt, codec=spec)
                hs.wait()
                hr.wait()
                rep.within(name, got, ref, piece_bound(spec, ref))
            name = f"send/recv from any source {spec}"
            with rep.case(name):
                if rank == 0:
                    cdist.send(gaussian((4, 6), seed=90), 1, codec=spec)
                elif rank == 1:
                    got = torch.empty(4, 6)
                    src = cdist.recv(got, codec=spec)
                    rep.check(name, src == 0, f"recv returned {src}, expected 0")
                    ref = gaussian((4, 6), seed=90)
                    rep.within(name, got, ref, piece_bound(spec, ref))
    return rep.result()


def test_transport_ops_match_plain_within_bound(gloo):
    assert_reports(gloo.run(_transport_body, SPECS))


# ============================================================ groups and async
def _subgroup_body(rank, world):
    rep = Report()
    g02 = dist.new_group([0, 2])
    g12 = dist.new_group([1, 2])
    with using(Policy(min_bytes=0, error_feedback=False)):
        with rep.case("all_reduce on [1, 2]"):
            x = gaussian(500, seed=rank)
            h = cdist.all_reduce(x, group=g12, codec="int8")
            if rank == 0:
                rep.check(
                    "non-member",
                    h is None and torch.equal(x, gaussian(500, seed=0)),
                    "a non-member must return None and leave its tensor alone",
                )
            else:
                xs = [gaussian(500, seed=r) for r in (1, 2)]
                algo = decide("all_reduce", x, R.SUM, "int8", world_size=2).algorithm
                bound = reduce_bound(get_codec("int8"), algo, xs, R.SUM, 2)
                rep.within("all_reduce on [1, 2]", x, xs[0] + xs[1], bound)
                rep.digest("all_reduce on [1, 2]", x)
        with rep.case("broadcast src=2 (global) on [1, 2]"):
            t = gaussian(64, seed=7) if rank == 2 else torch.zeros(64)
            cdist.broadcast(t, src=2, group=g12, codec="int8")
            if rank in (1, 2):
                ref = gaussian(64, seed=7)
                rep.within("broadcast src=2", t, ref, piece_bound("int8", ref))
        with rep.case("broadcast group_src=0 (global 1) on [1, 2]"):
            t = gaussian(64, seed=8) if rank == 1 else torch.zeros(64)
            cdist.broadcast(t, group=g12, group_src=0, codec="int8")
            if rank in (1, 2):
                ref = gaussian(64, seed=8)
                rep.within("broadcast group_src=0", t, ref, piece_bound("int8", ref))
        with rep.case("reduce dst=2 on [0, 2]"):
            x = gaussian(300, seed=10 + rank)
            cdist.reduce(x, dst=2, group=g02, codec="int8")
            if rank == 2:
                xs = [gaussian(300, seed=10 + r) for r in (0, 2)]
                algo = decide("reduce", x, R.SUM, "int8", world_size=2).algorithm
                bound = reduce_bound(get_codec("int8"), algo, xs, R.SUM, 2)
                rep.within("reduce dst=2", x, xs[0] + xs[1], bound)
        with rep.case("gather dst=2 on [1, 2]"):
            t = gaussian(40, seed=20 + rank)
            outs = [torch.empty(40) for _ in range(2)] if rank == 2 else None
            cdist.gather(t, outs, dst=2, group=g12, codec="int8")
            if rank == 2:
                for i, r in enumerate((1, 2)):
                    ref = gaussian(40, seed=20 + r)
                    rep.within(f"gather [{i}]", outs[i], ref, piece_bound("int8", ref))
        with rep.case("send/recv on [0, 2]"):
            if rank == 0:
                cdist.send(gaussian(30, seed=5), group=g02, group_dst=1, codec="int8")
            elif rank == 2:
                got = torch.empty(30)
                src = cdist.recv(got, group=g02, codec="int8")
                rep.check("recv src", src == 0, f"recv returned {src}; expected global rank 0")
                ref = gaussian(30, seed=5)
                rep.within("send/recv on [0, 2]", got, ref, piece_bound("int8", ref))
        with rep.case("dst outside the group"):
            try:
                cdist.reduce(torch.ones(300), dst=0, group=g12, codec="int8")
                rep.check("dst outside the group", rank == 0, "no error")
            except ConfigError as exc:
                rep.check(
                    "dst outside the group", "dst=0" in str(exc) and "[1, 2]" in str(exc), str(exc)
                )
    return rep.result()


def test_subgroups_use_group_and_global_ranks(gloo3):
    assert_reports(gloo3.run(_subgroup_body))


def _async_body(rank, world):
    rep = Report()
    with using(Policy(codec="int8", min_bytes=256, error_feedback=False)):
        a = gaussian(2000, seed=rank)
        b = gaussian((30, 10), seed=10 + rank)
        c = gaussian(10, seed=20 + rank)  # 40 bytes: plain torch, queued behind the others
        d = gaussian(500, seed=30) if rank == 0 else torch.zeros(500)
        e = gaussian(1000, seed=40 + rank)
        sync = [t.clone() for t in (a, b, c, d, e)]
        gathered_sync = [torch.empty(30, 10) for _ in range(world)]
        cdist.all_reduce(sync[0])
        cdist.all_gather(gathered_sync, sync[1])
        cdist.all_reduce(sync[2])
        cdist.broadcast(sync[3], 0)
        cdist.all_reduce(sync[4], R.AVG, codec="bf16")
        gathered = [torch.empty(30, 10) for _ in range(world)]
        h1 = cdist.all_reduce(a, async_op=True)
        h2 = cdist.all_gather(gathered, b, async_op=True)
        h3 = cdist.all_reduce(c, async_op=True)
        h4 = cdist.broadcast(d, 0, async_op=True)
        h5 = cdist.all_reduce(e, R.AVG, async_op=True, codec="bf16")
        with rep.case("out-of-order waits"):
            rep.check(
                "handle type", all(isinstance(h, commpress.Handle) for h in (h1, h2, h3, h4, h5))
            )
            rep.check("wait() returns True", h4.wait() is True)
            h3.wait()
            value = h1.get_future().wait()
            rep.check("future value", isinstance(value, list) and value[0] is a, repr(value))
            h5.wait()
            h2.wait()
            rep.check("is_completed", all(h.is_completed() for h in (h1, h2, h3, h4, h5)))
            for name, got, want in (
                ("all_reduce", a, sync[0]),
                ("passthrough", c, sync[2]),
                ("broadcast", d, sync[3]),
                ("bf16 AVG", e, sync[4]),
            ):
                rep.exact(f"async {name} equals sync", got, want)
            rep.exact(
                "async all_gather equals sync", torch.stack(gathered), torch.stack(gathered_sync)
            )
        with rep.case("sync call behind a pending async one"):
            f = gaussian(3000, seed=50 + rank)
            f_sync = f.clone()
            cdist.all_reduce(f_sync)
            h = cdist.all_reduce(f, async_op=True)
            g = gaussian(700, seed=60) if rank == 0 else torch.zeros(700)
            cdist.broadcast(g, 0)  # must queue behind h on every rank
            h.wait()
            rep.exact("async result after a sync call", f, f_sync)
            rep.within(
                "sync broadcast",
                g,
                gaussian(700, seed=60),
                piece_bound("int8", gaussian(700, seed=60)),
            )
        with rep.case("async error through the handle"):
            spec = "int8" if rank == 0 else "int4"
            h = cdist.all_reduce(gaussian(1000, seed=rank), async_op=True, codec=spec)
            try:
                h.wait()
                rep.check("async mismatch", False, "no error")
            except CodecMismatchError:
                rep.check("exception()", isinstance(h.exception(), CodecMismatchError))
    return rep.result()


def test_async_handles_waited_out_of_order(gloo):
    assert_reports(gloo.run(_async_body))


# ============================================================ odd inputs
def _misc_body(rank, world):
    rep = Report()
    with using(Policy(min_bytes=0, error_feedback=False)):
        with rep.case("non-contiguous all_reduce"):
            base = gaussian((20, 30), seed=rank)
            view = base.t()
            ref = view.contiguous()
            dist.all_reduce(ref)
            cdist.all_reduce(view, codec="int8")
            xs = [gaussian((20, 30), seed=r).t().contiguous() for r in range(world)]
            algo = decide("all_reduce", view, R.SUM, "int8", world_size=world).algorithm
            bound = reduce_bound(get_codec("int8"), algo, xs, R.SUM, world).view(30, 20)
            rep.within("non-contiguous all_reduce", view, ref, bound)
            rep.check("writes through the view", torch.equal(base.t(), view))
        with rep.case("non-contiguous broadcast and all_gather"):
            base = gaussian((10, 8), seed=3) if rank == 0 else torch.zeros(10, 8)
            sl = base[:, ::2]
            cdist.broadcast(sl, 0, codec="int8")
            ref = gaussian((10, 8), seed=3)[:, ::2]
            rep.within("strided broadcast", sl, ref, piece_bound("int8", ref.contiguous()))
            rep.check("odd columns untouched", rank == 0 or bool((base[:, 1::2] == 0).all()))
            src = gaussian((6, 4), seed=rank).t()
            outs = [torch.empty(4, 6) for _ in range(world)]
            cdist.all_gather(outs, src, codec="int8")
            for r in range(world):
                want = gaussian((6, 4), seed=r).t().contiguous()
                rep.within(
                    f"all_gather non-contiguous [{r}]", outs[r], want, piece_bound("int8", want)
                )
        with rep.case("empty tensors"):
            e = torch.empty(0)
            rep.check("empty all_reduce", cdist.all_reduce(e, codec="int8") is None)
            outs = [torch.empty(0) for _ in range(world)]
            cdist.all_gather(outs, torch.empty(0), codec="int8")
            cdist.broadcast(torch.empty(0, 3), 0, codec="int8")
            out = torch.empty(0, 4)
            cdist.all_to_all_single(out, torch.empty(0, 4), codec="int8")
            cdist.all_to_all_single(out, torch.empty(0, 4), [0] * world, [0] * world, codec="int8")
            h = cdist.all_reduce(torch.empty(0), codec="int8", async_op=True)
            h.wait()
    with rep.case("below min_bytes passes through, uncompressed"):
        commpress.reset_stats()
        with using(Policy(codec="int8", min_bytes=4096, error_feedback=False)):
            small = gaussian(100, seed=rank)
            ref = small.clone()
            dist.all_reduce(ref)
            cdist.all_reduce(small)
            rep.exact("small all_reduce", small, ref)
            s = commpress.stats()["all_reduce"]
            rep.check(
                "stats after a small call",
                s.calls == 1 and s.compressed == 0 and s.bytes_wire == s.bytes_in == 400,
                repr(s),
            )
            cdist.all_reduce(gaussian(2000, seed=rank))
            s = commpress.stats()["all_reduce"]
            rep.check(
                "stats after a large call",
                s.calls == 2 and s.compressed == 1 and s.bytes_wire < s.bytes_in,
                repr(s),
            )
            text = str(commpress.stats())
            rep.check("stats table", "all_reduce" in text and "ratio" in text, text)
    return rep.result()


def test_noncontiguous_empty_and_passthrough(gloo):
    assert_reports(gloo.run(_misc_body))


# ============================================================ errors
def _errors_body(rank, world):
    out: dict[str, tuple[str, str]] = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = ("ok", "")
        except Exception as exc:  # noqa: BLE001 - returned to the test
            out[name] = (type(exc).__name__, str(exc))

    x = gaussian(1000, seed=rank)
    with using(Policy(min_bytes=0)):
        mine = "int8" if rank == 0 else "int4"
        attempt("all_reduce", lambda: cdist.all_reduce(x.clone(), codec=mine))
        attempt("broadcast", lambda: cdist.broadcast(x.clone(), 0, codec=mine))
        outs = [torch.empty(3, 4) for _ in range(world)]
        ins = [torch.ones(3, 4) for _ in range(world)]
        attempt("all_to_all", lambda: cdist.all_to_all(outs, ins, codec=mine))
        if rank in (0, 1):
            if rank == 0:
                attempt("send", lambda: cdist.send(x, 1, codec="int8"))
            else:
                attempt("send", lambda: cdist.recv(torch.empty(1000), 0, codec="int4"))
        if rank == 0:
            attempt("op", lambda: cdist.all_reduce(x.clone(), codec="int8"))
        else:
            attempt("op", lambda: cdist.broadcast(x.clone(), 0, codec="int8"))
        attempt("numel", lambda: cdist.all_reduce(gaussian(1000 + 7 * rank), codec="int8"))
        wrong = torch.empty(world * 10 + (1 if rank == 1 else 0))
        attempt(
            "output size", lambda: cdist.all_gather_into_tensor(wrong, torch.ones(10), codec="int8")
        )
        attempt(
            "split sizes",
            lambda: cdist.all_to_all_single(
                torch.empty(world * 2, 3),
                torch.ones(world * 2, 3),
                [2] * world,
                [2] * (world - 1) + [5],
                codec="int8",
            ),
        )
        attempt("dst range", lambda: cdist.reduce(x.clone(), dst=world + 2, codec="int8"))
        attempt("not a tensor", lambda: cdist.all_reduce([1.0, 2.0], codec="int8"))
        attempt("powersgd broadcast", lambda: cdist.broadcast(x.clone(), 0, codec="powersgd"))
        y = x.clone()
        attempt("still usable", lambda: cdist.all_reduce(y, codec="int8"))
    return out


def test_mismatch_and_bad_arguments_raise_on_every_rank(gloo):
    results = gloo.run(_errors_body)
    for op in ("all_reduce", "broadcast", "all_to_all"):
        for r, res in enumerate(results):
            kind, msg = res[op]
            assert kind == "CodecMismatchError", (op, r, kind, msg)
            assert "'int8'" in msg and "'int4'" in msg, (op, r, msg)
    # p2p is one-way: the receiver raises, naming both specs; the sender completes.
    assert results[0]["send"] == ("ok", "")
    assert results[1]["send"][0] == "CodecMismatchError"
    assert "'int8'" in results[1]["send"][1] and "'int4'" in results[1]["send"][1]
    for r, res in enumerate(results):
        kind, msg = res["op"]
        assert kind == "CollectiveError" and "disagree on the op" in msg, (r, kind, msg)
        assert "rank 0: all_reduce" in msg and "rank 1: broadcast" in msg, msg
        kind, msg = res["numel"]
        assert kind == "CollectiveError" and "number of elements" in msg and "1007" in msg, msg
        kind, msg = res["output size"]
        assert kind == "CollectiveError", (r, kind, msg)
        if r == 1:
            assert "output_tensor has" in msg and str(gloo.world_size * 10) in msg, msg
        else:
            assert "rank(s) [1]" in msg and "rejected" in msg, msg
        kind, msg = res["split sizes"]
        assert kind == "CollectiveError" and "input_split_sizes" in msg, (r, kind, msg)
        kind, msg = res["dst range"]
        assert kind == "ConfigError" and f"dst={gloo.world_size + 2}" in msg, (r, kind, msg)
        assert res["not a tensor"][0] == "TypeError"
        kind, msg = res["powersgd broadcast"]
        assert kind == "ConfigError" and "powersgd" in msg, (r, kind, msg)
        assert res["still usable"] == ("ok", ""), res["still usable"]


# ============================================================ error feedback
def _feedback_body(rank, world):
    rep = Report()
    cdist.reset_error_feedback()
    x = gaussian(600, seed=rank)
    sign = get_codec("sign")
    with using(Policy(min_bytes=0, algorithm="gather")):
        ef = cdist.error_feedback("sign")
        with rep.case("explicit key"):
            cdist.all_reduce(x.clone(), codec="sign", key="w1")
            r1 = ef.state_dict()["residuals"]["w1"]
            rep.exact("first residual", r1, x - sign.roundtrip(x))
            cdist.all_reduce(x.clone(), codec="sign", key="w1")
            comp = x + r1
            rep.exact(
                "second residual", ef.state_dict()["residuals"]["w1"], comp - sign.roundtrip(comp)
            )
        with rep.case("automatic keys: one per call site"):
            before = len(ef)
            for _ in range(3):
                cdist.all_reduce(x.clone(), codec="sign")
            rep.check("same line, one key", len(ef) == before + 1, f"{len(ef) - before} keys")
            cdist.all_reduce(x.clone(), codec="sign")
            rep.check("another line, another key", len(ef) == before + 2)
        with rep.case("defaults and overrides"):
            cdist.all_reduce(x.clone(), codec="int8", key="q")
            rep.check("int8: no error feedback by default", len(cdist.error_feedback("int8")) == 0)
            with using(error_feedback=True):
                cdist.all_reduce(x.clone(), codec="int8", key="q")
            rep.check("int8 with error_feedback=True", len(cdist.error_feedback("int8")) == 1)
            with using(error_feedback=False):
                cdist.all_reduce(x.clone(), codec="sign", key="off")
            rep.check("sign with error_feedback=False", "off" not in ef.state_dict()["residuals"])
        with rep.case("error feedback removes the bias over steps"):
            exact = sum(gaussian(600, seed=r) for r in range(world))
            means = {}
            for fb in (True, False):
                with using(error_feedback=fb):
                    total = torch.zeros(600)
                    for _ in range(20):
                        y = x.clone()
                        cdist.all_reduce(y, codec="sign", key=f"steps-{fb}")
                        total += y
                means[fb] = float((total / 20 - exact).norm() / exact.norm())
            rep.check("error feedback helps", means[True] < 0.5 * means[False], repr(means))
    return rep.result()


def test_error_feedback_keys_and_effect(gloo):
    assert_reports(gloo.run(_feedback_body))


# ============================================================ verify=False, chunks
def _noverify_body(rank, world):
    rep = Report()
    results = {}
    for verify, checksum in ((True, False), (False, False), (True, True)):
        commpress.reset_stats()
        policy = Policy(min_bytes=0, verify=verify, checksum=checksum, error_feedback=False)
        with using(policy):
            got = {}
            for algorithm in ("two_phase", "gather"):
                with using(algorithm=algorithm):
                    t = gaussian(777, seed=rank)
                    cdist.all_reduce(t, codec="int8")
                    got[f"all_reduce {algorithm}"] = t
            t = gaussian(777, seed=rank)
            cdist.all_reduce(t, codec="bf16")
            got["all_reduce direct"] = t
            t = gaussian(100, seed=9) if rank == 0 else torch.zeros(100)
            cdist.broadcast(t, 0, codec="int8")
            got["broadcast"] = t
            out = torch.empty(world * 50)
            cdist.all_gather_into_tensor(out, gaussian(50, seed=rank), codec="int8")
            got["all_gather_into_tensor"] = out
            out = torch.empty(world * 2, 5)
            cdist.all_to_all_single(out, gaussian((world * 2, 5), seed=rank), codec="int8")
            got["all_to_all_single"] = out
            out = torch.empty(40)
            cdist.reduce_scatter_tensor(out, gaussian(world * 40, seed=rank), codec="int8")
            got["reduce_scatter_tensor"] = out
            t = torch.zeros(64)
            if rank == 0:
                cdist.send(gaussian(64, seed=3), 1, codec="int8")
            elif rank == 1:
                cdist.recv(t, 0, codec="int8")
            got["send/recv"] = t
            results[verify, checksum] = (got, commpress.stats().total().bytes_wire)
    base, nbytes = results[True, False]
    for name, t in base.items():
        rep.exact(f"verify=False {name}", results[False, False][0][name], t)
        rep.exact(f"checksum=True {name}", results[True, True][0][name], t)
    rep.check(
        "verify=False sends fewer bytes",
        results[False, False][1] < nbytes,
        repr((results[False, False][1], nbytes)),
    )
    rep.check("checksum=True sends a CRC more", results[True, True][1] > nbytes)
    return rep.result()


def test_verify_false_and_checksum_give_the_same_results(gloo):
    assert_reports(gloo.run(_noverify_body))


def _chunked_body(rank, world, specs):
    rep = Report()
    set_engine(Engine(num_threads=1, chunk_bytes=1024))
    try:
        xs = _inputs(world, numel=3001, seed=500)
        per = 1024 // 4
        with using(Policy(min_bytes=0, error_feedback=False)):
            for spec in specs:
                codec = get_codec(spec)
                for algorithm, op in (("auto", R.SUM), ("two_phase", R.SUM), ("auto", R.AVG)):
                    name = f"chunked all_reduce {spec} {algorithm} {op}"
                    with rep.case(name), using(algorithm=algorithm):
                        x = xs[rank].clone()
                        ref = x.clone()
                        dist.all_reduce(ref)
                        if op == R.AVG:
                            ref /= world
                        h = cdist.all_reduce(x, op=op, codec=spec, async_op=True)
                        h.wait()
                        algo = decide("all_reduce", x, op, spec, world_size=world).algorithm
                        bound = torch.cat(
                            [
                                reduce_bound(codec, algo, [v[a : a + per] for v in xs], op, world)
                                for a in range(0, 3001, per)
                            ]
                        )
                        rep.within(name, x, ref, bound)
                        rep.digest(name, x)
    finally:
        set_engine(None)
    return rep.result()


def test_chunked_pipeline_all_reduce(gloo):
    assert_reports(gloo.run(_chunked_body, ["int8", "bf16", "zstd", "int8+zstd"]))


# ============================================================ powersgd
def _powersgd_body(rank, world):
    rep = Report()
    u = gaussian((64, 2), seed=0)
    m = u @ gaussian((2, 48), seed=10 + rank)  # every rank's matrix shares u: the sum has rank 2
    exact = sum(u @ gaussian((2, 48), seed=10 + r) for r in range(world))
    with using(Policy(min_bytes=0)):
        with rep.case("powersgd all_reduce"):
            y = m.clone()
            cdist.all_reduce(y, codec="powersgd:rank=2", key="m")
            err = float((y - exact).norm() / exact.norm())
            rep.check("powersgd all_reduce", err < 1e-4, f"relative error {err}")
            rep.digest("powersgd all_reduce", y)
        with rep.case("powersgd reduce"):
            y = m.clone()
            cdist.reduce(y, 0, codec="powersgd:rank=2", key="r")
            if rank == 0:
                err = float((y - exact).norm() / exact.norm())
                rep.check("powersgd reduce", err < 1e-4, f"relative error {err}")
            else:
                rep.exact("powersgd reduce leaves non-dst alone", y, m)
    return rep.result()


def test_powersgd_dispatch(gloo):
    assert_reports(gloo.run(_powersgd_body))


# ============================================================ a rank dies
def _death_body(rank, world):
    group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=5))
    x = gaussian(5000, seed=rank)
    if rank == world - 1:
        from commpress.algorithms import two_phase

        def die(*args, **kwargs):
            os._exit(3)  # after the descriptor exchange, before the data moves

        two_phase.alltoallv = die
    t0 = time.monotonic()
    try:
        with using(Policy(min_bytes=0, algorithm="two_phase")):
            cdist.all_reduce(x, group=group, codec="int8")
        return ("no error", "", time.monotonic() - t0)
    except Exception as exc:  # noqa: BLE001 - returned to the test
        return (type(exc).__name__, str(exc), time.monotonic() - t0)


def test_rank_dying_mid_collective_fails_the_survivors_fast(gloo3):
    # Runs last: the pool restarts its workers afterwards.
    results = gloo3.run(_death_body, allow_death=True, timeout=60)
    assert isinstance(results[-1], RankDied)
    for r, (kind, msg, elapsed) in enumerate(results[:-1]):
        assert kind == "CollectiveError", (r, kind, msg)
        assert "all_reduce" in msg, msg
        assert elapsed < 20, f"rank {r} needed {elapsed:.1f}s to notice"
