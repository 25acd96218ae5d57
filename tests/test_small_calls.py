"""Small compressed calls: what repeats is computed once, and nothing goes unchecked.

The packet layout and header of a codec, shape and dtype are computed once
(`wire.packet._plan`), a header already seen is not parsed again, and a descriptor
table whose rows agree is read without running the checks that cannot fail
(`DescriptorTable.uniform`). These tests pin that the results are those of the
uncached path, bit for bit, and that ranks which disagree after many agreeing calls
(a codec of the same or another size, another element count, a rank rejecting its
arguments) still raise a clear error on every rank, with the group usable after.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import commpress
from commpress import wire
from commpress.errors import CollectiveError, WireError
from commpress.testing import gaussian
from commpress.wire.descriptor import FIXED_WORDS, Descriptor, DescriptorTable


# ------------------------------------------------------------ descriptor table
def _desc(**kw) -> Descriptor:
    fields = dict(
        op=1, algorithm=3, config_hash=7, spec_nbytes=4, dtype=torch.float32, numel=10,
        sizes=(96, 96),
    )  # fmt: skip
    fields.update(kw)
    return Descriptor(**fields)


def test_rows_that_agree_are_read_once_and_keep_their_sizes():
    rows = [_desc().words(2), _desc(sizes=(96, 0)).words(2)]
    table = DescriptorTable.from_rows(rows, "all_reduce")
    assert table.uniform and table.rows == (_desc(), _desc(sizes=(96, 0)))
    assert table.rows == DescriptorTable.from_tensor(torch.tensor(rows), 2, "all_reduce").rows
    table.check_status()
    table.check_call(same_numel=True)
    # One word of difference and the checks run (and name it) as before.
    other = DescriptorTable.from_rows([rows[0], _desc(numel=11).words(2)], "all_reduce")
    assert not other.uniform
    with pytest.raises(CollectiveError, match="number of elements: rank 0: 10, rank 1: 11"):
        other.check_call(same_numel=True)
    both_rejected = [_desc(status=1).words(2)] * 2  # equal rows, but not a call to run
    with pytest.raises(CollectiveError, match=r"rank\(s\) \[0, 1\].*rejected"):
        DescriptorTable.from_rows(both_rejected, "all_reduce").check_status()
    hostile = _desc().words(2)
    hostile[FIXED_WORDS] = -5  # a negative size from a rank that agrees on all else
    with pytest.raises(CollectiveError, match="rank 1 is malformed"):
        DescriptorTable.from_rows([rows[0], hostile], "all_reduce")


# ------------------------------------------------------------ packets
@pytest.mark.parametrize("spec", ["int8", "int4:block=64", "fp8", "bf16"])
@pytest.mark.parametrize("checksum", [False, True])
def test_encode_pack_gives_the_bytes_of_pack_every_time(spec, checksum):
    codec = commpress.get_codec(spec)
    for seed in range(3):  # the first call computes the layout, the others reuse it
        x = gaussian((7, 300), torch.float32, seed=seed)
        buf = wire.encode_pack(codec, x, checksum=checksum)
        assert torch.equal(buf, wire.pack(codec.encode(x), checksum=checksum)), (spec, seed)
        again = wire.unpack(buf.clone(), codec)
        assert again.meta == codec.encode(x).meta
        assert torch.equal(codec.decode(again), codec.decode(wire.unpack(buf, codec)))


def test_a_header_seen_before_is_still_checked_against_its_buffer():
    codec = commpress.get_codec("int8")
    buf = wire.encode_pack(codec, gaussian(1000, torch.float32, seed=1))
    wire.unpack(buf, codec)  # parsed, and remembered
    with pytest.raises(WireError, match="header describes"):
        wire.unpack(torch.cat([buf, torch.zeros(8, dtype=torch.uint8)]), codec)
    with pytest.raises(WireError, match="truncated|header describes"):
        wire.unpack(buf[:-8], codec)
    flipped = buf.clone()
    flipped[0] ^= 1  # the magic: refused before any remembered parse is looked at
    with pytest.raises(WireError, match="not a commpress wire buffer"):
        wire.unpack(flipped, codec)


# ------------------------------------------------------------ multi-process
def _gather_body(rank: int, world: int) -> dict[str, bool]:
    import commpress.distributed as cdist
    from commpress.policy import Policy, using

    codec = commpress.get_codec("int8")
    xs = [gaussian(3000, seed=10 + r) for r in range(world)]
    got = {}
    with using(Policy(min_bytes=0, algorithm="gather")):
        for name, op in (("sum", dist.ReduceOp.SUM), ("avg", dist.ReduceOp.AVG)):
            # The reference: every rank's packet decoded, then added in rank order.
            ref = codec.decode(codec.encode(xs[0])).clone()
            for x in xs[1:]:
                ref += codec.decode(codec.encode(x))
            if op == dist.ReduceOp.AVG:
                ref /= world
            for i in range(3):  # the first call and the repeats alike
                t = xs[rank].clone()
                cdist.all_reduce(t, op=op, codec="int8")
                got[f"{name} {i}"] = torch.equal(t, ref)
        t = xs[rank].clone()
        cdist.broadcast(t, src=world - 1, codec="int8")
        got["broadcast"] = torch.equal(t, codec.decode(codec.encode(xs[world - 1])))
    return got


def test_small_calls_give_the_decoded_packets_summed_in_rank_order(gloo):
    for rank, got in enumerate(gloo.run(_gather_body)):
        assert all(got.values()), (rank, got)


def _disagree_body(rank: int, world: int) -> dict[str, str]:
    import commpress.distributed as cdist
    from commpress.errors import CommpressError
    from commpress.policy import Policy, using
    from commpress.testing import gaussian

    x = gaussian(2000, seed=rank)
    got: dict[str, str] = {}

    def attempt(name, fn):
        try:
            fn()
            got[name] = "ok"
        except CommpressError as exc:
            got[name] = f"{type(exc).__name__}: {exc}"

    with using(Policy(min_bytes=0)):
        for _ in range(3):  # the same calls agreed on, many times
            cdist.all_reduce(x.clone(), codec="int8")
            cdist.broadcast(x.clone(), 0, codec="int8")
            cdist.all_gather([torch.empty(2000) for _ in range(world)], x, codec="int8")
        last = world - 1
        # Payloads of different sizes (int4 is half of int8): the round still carries them.
        mine = "int4" if rank == last else "int8"
        attempt("all_reduce size", lambda: cdist.all_reduce(x.clone(), codec=mine))
        attempt("broadcast size", lambda: cdist.broadcast(x.clone(), 0, codec=mine))
        # Another config of the same codec (same sections; only the header's spec differs).
        mine = "int8:stochastic=1" if rank == last else "int8"
        attempt("all_reduce config", lambda: cdist.all_reduce(x.clone(), codec=mine))
        attempt("broadcast config", lambda: cdist.broadcast(x.clone(), 0, codec=mine))
        n = 2000 + 3 * (rank == last)
        attempt("numel", lambda: cdist.all_reduce(gaussian(n, seed=rank), codec="int8"))
        short = [torch.empty(2000) for _ in range(world - (rank == last))]
        attempt("short output list", lambda: cdist.all_gather(short, x, codec="int8"))
        t = x.clone()
        attempt("still usable", lambda: cdist.all_reduce(t, codec="int8"))
    return got


def test_ranks_that_disagree_after_agreeing_raise_on_every_rank(gloo):
    results = gloo.run(_disagree_body)
    last = gloo.world_size - 1
    for rank, got in enumerate(results):
        for case in ("all_reduce size", "broadcast size"):
            assert got[case].startswith("CodecMismatchError"), (rank, case, got[case])
            assert "'int8'" in got[case] and "'int4'" in got[case], (rank, case, got[case])
        for case in ("all_reduce config", "broadcast config"):
            assert got[case].startswith("CodecMismatchError"), (rank, case, got[case])
            assert "'int8:stochastic=1'" in got[case], (rank, case, got[case])
        assert "number of elements" in got["numel"] and "2003" in got["numel"], got["numel"]
        if rank == last:
            assert "tensor_list must hold" in got["short output list"], got["short output list"]
        else:
            assert f"rank(s) [{last}]" in got["short output list"], got["short output list"]
        assert got["still usable"] == "ok", got["still usable"]


# ------------------------------------------------------------ one round
def test_a_frame_carries_its_row_and_a_small_payload_only():
    from commpress.wire.descriptor import (
        INLINE_BYTES,
        frame,
        frame_capacity,
        read_frames,
    )

    world, words = 3, _desc(sizes=(5, 5, 5)).words(3)
    payload = torch.arange(5, dtype=torch.uint8)
    cap = frame_capacity(world)
    small, bare = frame(words, world, payload), frame(words, world, None)
    assert bare.numel() + 5 == small.numel() <= cap
    too_big = torch.zeros(INLINE_BYTES + 1, dtype=torch.uint8)
    assert frame(words, world, too_big).numel() == bare.numel()  # the row only
    # Rank 1's view of a round: rank 0 sent the small frame, rank 2 the bare one.
    received = torch.zeros(2 * cap, dtype=torch.uint8)
    received[: small.numel()] = small
    received[cap : cap + bare.numel()] = bare
    got = read_frames(received, world, 1, words, None)
    assert got.rows == [words, words, words]
    assert torch.equal(got.payloads[0], payload) and got.payloads[1:] == [None, None]
    hostile = small.clone()
    hostile[8 * len(words) : 8 * len(words) + 8].view(torch.int64)[0] = cap  # past the slot
    received[: hostile.numel()] = hostile
    assert read_frames(received, world, 1, words, None).payloads[0] is None
    assert frame_capacity(64) == 8 * (FIXED_WORDS + 65)  # large groups: rows only


def _rounds_body(rank: int, world: int) -> dict[str, object]:
    import commpress.distributed as cdist
    from commpress.policy import using

    calls: list[str] = []
    names = ("all_to_all_single", "all_gather_single", "all_gather_into_tensor", "broadcast")
    saved = {n: getattr(dist, n) for n in names}

    def counting(name):
        def call(*a, **k):
            calls.append(name)
            return saved[name](*a, **k)

        return call

    got: dict[str, object] = {}
    for n in names:
        setattr(dist, n, counting(n))
    try:
        for numel in (16384, 1 << 18):  # 64 KiB: one round; 1 MiB: its payload is too big
            xs = [gaussian(numel, seed=r) for r in range(world)]
            for verify in (True, False):
                with using(min_bytes=0, verify=verify, algorithm="gather"):
                    t, b = xs[rank].clone(), xs[rank].clone()
                    outs = [torch.empty(numel) for _ in range(world)]
                    calls.clear()
                    cdist.all_reduce(t, codec="int8")
                    cdist.broadcast(b, world - 1, codec="int8")
                    cdist.all_gather(outs, xs[rank], codec="int8")
                    got[f"{numel} {verify} rounds"] = len(calls)
                    got[f"{numel} {verify}"] = (t, b, torch.cat(outs))
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)
    return got


def test_a_small_compressed_call_is_one_round_with_the_results_of_two(gloo):
    for rank, got in enumerate(gloo.run(_rounds_body)):
        assert got["16384 True rounds"] == 3, (rank, got["16384 True rounds"])  # 1 per call
        assert got["262144 True rounds"] == 6, (rank, got["262144 True rounds"])  # 2 per call
        assert got["16384 False rounds"] == got["262144 False rounds"] == 3
        for numel in (16384, 262144):  # the same bits with and without the descriptors
            for a, b in zip(got[f"{numel} True"], got[f"{numel} False"], strict=True):
                assert torch.equal(a, b), (rank, numel)


def _plain_body(rank: int, world: int) -> dict[str, object]:
    import commpress.distributed as cdist
    from commpress import stats, watchdog
    from commpress.policy import using

    got: dict[str, object] = {}
    commpress.reset_stats()
    first = watchdog.begin("0", "probe", None, torch.zeros(1)).seq
    x = gaussian(16384, seed=rank)
    with using(min_bytes=0):
        handles = [cdist.all_reduce(x.clone(), codec="int8", async_op=True) for _ in range(3)]
        t = torch.full((8,), float(rank + 1))
        cdist.all_reduce(t, codec="none")  # plain, behind the queued calls
        for h in handles:
            h.wait()
        for _ in range(5):
            cdist.all_reduce(t, codec="none")
    got["plain"] = t
    got["seq"] = watchdog.begin("0", "probe", None, torch.zeros(1)).seq - first
    s = stats()["all_reduce"]
    got["counts"] = (s.calls, s.compressed, s.bytes_in)
    return got


def test_plain_calls_are_counted_numbered_and_kept_in_issue_order(gloo):
    world = gloo.world_size
    total = world * (world + 1) / 2
    for rank, got in enumerate(gloo.run(_plain_body)):
        assert torch.equal(got["plain"], torch.full((8,), total * world**5)), rank
        assert got["seq"] == 3 + 6 + 1, (rank, got["seq"])  # every call numbered once
        assert got["counts"] == (9, 3, 3 * 65536 + 6 * 32), (rank, got["counts"])
