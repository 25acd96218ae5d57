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
