"""Internode MoE dispatch/combine against flat `moe` and a single-process reference.

4 gloo ranks as 2 fake hosts x 2 ranks (blocks, and scattered as {0, 3} {1, 2}),
as 1 host x 4 (fallback), 3 ranks as 3 x 1 (fallback); hosts are faked with
``LOCAL_WORLD_SIZE`` / ``LOCAL_RANK`` as in ``test_hierarchical.py``. The byte
count runs real ``torchrun`` jobs over emulated hosts where root and iproute2
exist (skips with the reason elsewhere).
"""

from __future__ import annotations

import os

import pytest
import torch

import commpress
from commpress import moe, moe_internode
from commpress.errors import ConfigError

HIDDEN = 128  # one fp8 scale block per row: a row decodes alike in any piece
FIELDS = (
    "num_experts",
    "bounds",
    "num_tokens",
    "topk",
    "send_slots",
    "send_splits",
    "recv_splits",
    "recv_expert_ids",
    "tokens_per_expert",
    "codec",
)


def _fake_hosts(rank: int, local_size: int, layout: list[list[int]] | None = None) -> None:
    """Blocks of ``local_size`` ranks, or ``layout`` (lists of global ranks)."""
    from commpress import topology

    os.environ.pop("GROUP_RANK", None)
    os.environ["LOCAL_WORLD_SIZE"] = str(local_size)
    os.environ["LOCAL_RANK"] = str(rank % local_size)
    if layout is not None:
        os.environ["LOCAL_RANK"] = str(rank - min(next(h for h in layout if rank in h)))
    topology.clear_cache()


def _case(route="random", tokens=37, topk=3, experts=8, codecs=("none", "none"), **kw):
    return dict(route=route, tokens=tokens, topk=topk, experts=experts, codecs=codecs, **kw)


def _inputs(rank: int, i: int, case: dict, host_of: tuple[int, ...]):
    g = torch.Generator().manual_seed(1000 * i + rank)
    T, k, E = case["tokens"] + rank, case["topk"], case["experts"]
    if case.get("integer"):  # small integers, dyadic weights: every sum is exact in float32
        x = torch.randint(-8, 9, (T, HIDDEN), generator=g).float()
        w = torch.randint(0, 5, (T, k), generator=g).float() / 4
    else:
        x = torch.randn(T, HIDDEN, generator=g) * (1 + rank)
        w = torch.rand(T, k, generator=g)
    if case["route"] == "random":
        ids = torch.randint(-1, E, (T, k), generator=g)
    elif case["route"] == "one_rank":
        ids = torch.zeros(T, k, dtype=torch.int64)
    else:  # "one_remote_host": all k experts of a token on the next host
        hosts = max(host_of) + 1
        target = (host_of[rank] + 1) % hosts
        owners = _owners(E, len(host_of))
        there = torch.tensor([e for e in range(E) if host_of[owners[e]] == target])
        ids = there[torch.randint(len(there), (T, k), generator=g)]
    if T and case["route"] == "random":
        ids[0] = -1  # a token with every slot dropped
    return x, ids, w


def _owners(num_experts: int, world: int) -> list[int]:
    b = moe.expert_bounds(num_experts, world)
    return [next(r for r in range(world) if b[r] <= e < b[r + 1]) for e in range(num_experts)]


def _expert(rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Expert e multiplies by (e + 1)."""
    return rows * (expert_ids.to(rows.dtype) + 1).unsqueeze(1)


def _reference_out(x, ids, weights):
    factor = torch.where(ids >= 0, ids + 1, 0).to(x.dtype)
    return (x.unsqueeze(1) * factor.unsqueeze(-1) * weights.unsqueeze(-1)).sum(1)


def _reference_recv(xs, idss, num_experts, rank):
    """Flat order: by source rank, then local expert, then slot."""
    b = moe.expert_bounds(num_experts, len(xs))
    rows = [xs[0].new_empty(0, HIDDEN)]  # a rank owning no expert receives nothing
    for x, ids in zip(xs, idss, strict=True):
        flat = ids.reshape(-1)
        for e in range(b[rank], b[rank + 1]):
            rows.append(x[(flat == e).nonzero().squeeze(1) // ids.shape[1]])
    return torch.cat(rows)


def _crossing_counts(ids, num_experts, host_of, rank):
    owners = torch.tensor(_owners(num_experts, len(host_of)))
    hosts = torch.tensor(host_of)
    h = torch.where(ids >= 0, hosts[owners[ids.clamp(min=0)]], -1)
    remote = (h >= 0) & (h != host_of[rank])
    distinct = sum(len(set(h[t][remote[t]].tolist())) for t in range(ids.shape[0]))
    return int(remote.sum()), distinct


def body_compare(rank, world, local, cases, layout=None, subgroup=False):
    import torch.distributed as dist

    from commpress import topology
    from commpress.policy import using

    _fake_hosts(rank, local, layout)
    # A group other than the world (all ranks, so the group rank is the global rank):
    # the topology's subgroup path (use_local_synchronization), and group= passed through.
    group = dist.new_group(list(range(world))) if subgroup else None
    topo = topology.of(group)
    results = []
    with using(min_bytes=0):  # compress even these small test tensors
        for i, case in enumerate(cases):
            x, ids, w = _inputs(rank, i, case, topo.host_of)
            E, (cd, cc), async_op = case["experts"], case["codecs"], case.get("async", False)
            r = {"x": x, "ids": ids, "w": w, "host_of": topo.host_of}
            for name, mod in (("flat", moe), ("inter", moe_internode)):
                recv, handle = mod.dispatch(x, ids, E, group=group, codec=cd, async_op=async_op)
                handle.wait()
                lay = handle.layout
                y = _expert(recv, lay.recv_expert_ids)
                out = mod.combine(y, handle, weights=w, codec=cc, async_op=async_op)
                if async_op:
                    out.wait()
                    out = out.result()[0]
                r[name] = {
                    "recv": recv,
                    "out": out,
                    "fields": {f: getattr(lay, f) for f in FIELDS},
                    "kind": type(lay).__name__,
                    "cross_rows": getattr(lay, "cross_rows", None),
                }
                if name == "inter":  # moe.combine takes the internode handle (flat return)
                    r["mixed"] = moe.combine(y, handle, weights=w, codec=cc)
            r["crossings"] = moe_internode.crossings(ids, E, group=group)
            results.append(r)
    return results


def _check(results, cases, world, exact_fp8=True):
    for i, case in enumerate(cases):
        per_rank = [res[i] for res in results]
        xs, idss = [r["x"] for r in per_rank], [r["ids"] for r in per_rank]
        E, (cd, cc) = case["experts"], case["codecs"]
        for rank, r in enumerate(per_rank):
            flat, inter = r["flat"], r["inter"]
            where = f"case {i} {case['route']} rank {rank}"
            for f in FIELDS:  # the same layout, field by field
                a, b = flat["fields"][f], inter["fields"][f]
                same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                assert same, f"{where}: layout field {f}: flat {a}, internode {b}"
            if cd == "none":
                ref = _reference_recv(xs, idss, E, rank)
                assert torch.equal(inter["recv"], ref), where
                assert torch.equal(flat["recv"], ref), where
            elif exact_fp8:  # each row is encoded once, in its own scale block, either way
                assert torch.equal(inter["recv"], flat["recv"]), where
            ref_out = _reference_out(r["x"], r["ids"], r["w"])
            if cd == cc == "none" and case.get("integer"):
                assert torch.equal(inter["out"], ref_out), where
                assert torch.equal(inter["out"], flat["out"]), where
                assert torch.equal(r["mixed"], ref_out), where
            elif cd == cc == "none":
                torch.testing.assert_close(inter["out"], flat["out"], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(r["mixed"], flat["out"], rtol=1e-5, atol=1e-5)
            else:
                _check_codec_bound(r, ref_out, cd, cc, where)
            if r["ids"].shape[0] and case["route"] == "random":
                assert not inter["out"][0].any(), f"{where}: a dropped token's row is not zero"
            flat_rows, distinct = _crossing_counts(r["ids"], E, r["host_of"], rank)
            c = r["crossings"]
            if inter["kind"] == "InternodeLayout":
                assert (c.flat, c.internode) == (flat_rows, distinct), where
                assert inter["cross_rows"] == distinct, where
            else:  # the fallback is the flat dispatch: it sends what flat sends
                assert (c.flat, c.internode) == (flat_rows, flat_rows), where


def _check_codec_bound(r, ref_out, cd, cc, where):
    """Slot-wise bound, as in test_moe: fp8 error of x scaled by the expert, then the
    combine codec's error; one bf16 rounding per (token, host) sum is within it, plus
    float32 reordering slack."""
    dcodec, ccodec = commpress.get_codec(cd), commpress.get_codec(cc)
    x, ids, w = r["x"], r["ids"], r["w"]
    scale = torch.where(ids >= 0, ids + 1, 0).float()
    x_err = dcodec.error_bound(x)
    y_mag = scale.unsqueeze(-1) * (x.abs() + x_err).unsqueeze(1)
    slot_err = scale.unsqueeze(-1) * x_err.unsqueeze(1) + ccodec.error_bound(y_mag)
    bound = (w.unsqueeze(-1) * slot_err).sum(1) + 1e-5 * (w.unsqueeze(-1) * y_mag).sum(1) + 1e-6
    for name in ("inter", "mixed"):
        out = r[name] if name == "mixed" else r[name]["out"]
        err = (out - ref_out).abs()
        assert (err <= bound).all(), f"{where} {name}: {float((err - bound).max())}"


CASES = [
    _case(),
    _case(integer=True),
    _case(integer=True, tokens=50, topk=4, experts=12, **{"async": True}),
    _case(tokens=64, topk=2, experts=6, codecs=("fp8", "bf16")),
    _case(tokens=64, topk=4, experts=8, codecs=("fp8", "bf16"), **{"async": True}),
    _case("one_rank", integer=True),
    _case("one_remote_host", integer=True, topk=4),
    _case("one_remote_host", tokens=20, topk=1, codecs=("fp8", "bf16")),
    _case(tokens=0, topk=2),  # rank 0 has no tokens (the others 1, 2, 3)
    _case(integer=True, tokens=30, topk=3, experts=3),  # fewer experts than ranks
]


def test_two_hosts_by_two_matches_flat(gloo4):
    results = gloo4.run(body_compare, 2, CASES)
    _check(results, CASES, 4)
    assert all(r["inter"]["kind"] == "InternodeLayout" for res in results for r in res)
    # All k experts on one remote host: each token crosses once, not k times.
    one = CASES.index(_case("one_remote_host", integer=True, topk=4))
    for rank, res in enumerate(results):
        c = res[one]["crossings"]
        assert (c.internode, c.flat) == (37 + rank, 4 * (37 + rank))
        assert res[one]["inter"]["cross_rows"] == 37 + rank
    # Everything to expert 0 (rank 0): rank 0 receives every row, the others none.
    to_one = CASES.index(_case("one_rank", integer=True))
    assert results[0][to_one]["inter"]["recv"].shape[0] == 3 * sum(37 + r for r in range(4))
    assert all(res[to_one]["inter"]["recv"].shape[0] == 0 for res in results[1:])


def test_scattered_hosts_match_flat(gloo4):
    # Hosts {0, 3} and {1, 2}: host index and inter rank differ (see topology.py).
    cases = [CASES[i] for i in (0, 1, 3, 6)]
    results = gloo4.run(body_compare, 2, cases, layout=[[0, 3], [1, 2]])
    assert results[0][0]["host_of"] == (0, 1, 1, 0)
    _check(results, cases, 4)


def test_subgroup_matches_flat(gloo4):
    cases = [CASES[i] for i in (1, 4)]
    _check(gloo4.run(body_compare, 2, cases, subgroup=True), cases, 4)


def test_one_host_falls_back_to_flat(gloo4):
    cases = [CASES[i] for i in (1, 3)]
    results = gloo4.run(body_compare, 4, cases)
    _check(results, cases, 4)
    assert all(r["inter"]["kind"] == "DispatchLayout" for res in results for r in res)
    assert all(r["crossings"].flat == r["crossings"].internode == 0 for res in results for r in res)


def test_three_hosts_by_one_falls_back_to_flat(gloo3):
    cases = [CASES[i] for i in (1, 3, 6)]
    results = gloo3.run(body_compare, 1, cases)
    _check(results, cases, 3)
    assert all(r["inter"]["kind"] == "DispatchLayout" for res in results for r in res)
    assert all(r["crossings"].flat == r["crossings"].internode for res in results for r in res)


def body_bad(rank, world):
    from commpress.handle import Handle

    _fake_hosts(rank, 2)
    x = torch.randn(4, HIDDEN)
    errors = []

    def expect(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
            errors.append(None)
        except ConfigError as exc:
            errors.append(str(exc))

    d = moe_internode.dispatch
    expect(d, x, torch.tensor([[0], [1], [9], [0]]), 3)  # id out of range
    expect(d, x, torch.zeros(3, 1, dtype=torch.int64), 3)  # wrong T
    expect(d, x, torch.zeros(4, 1), 3)  # float ids
    expect(d, x[0], torch.zeros(4, 1, dtype=torch.int64), 3)  # x not 2-D
    expect(d, x, torch.zeros(4, 1, dtype=torch.int64), 3, codec="int9")  # bad codec
    expect(moe_internode.crossings, torch.zeros(4, 1), 3)
    recv, handle = d(x, torch.zeros(4, 2, dtype=torch.int64), 4, codec="none")
    expect(moe_internode.combine, torch.zeros(recv.shape[0] + 1, HIDDEN), handle)
    expect(moe_internode.combine, recv, handle, codec="int9")
    expect(moe_internode.combine, recv, Handle.done([]))
    expect(moe_internode.combine, recv, handle, weights=torch.ones(4, 3), codec="none")
    # Hosts of 3 and 1 ranks: no same-local-index forwarder exists on the small host.
    _fake_hosts(rank, 2, layout=[[0, 1, 2], [3]])
    expect(d, x, torch.zeros(4, 1, dtype=torch.int64), 3)
    return errors


def test_bad_input_raises_on_every_rank(gloo4):
    for errors in gloo4.run(body_bad):
        assert all(e is not None for e in errors), errors
        assert "[0, 3)" in errors[0] and "int9" in errors[4] and "weights" in errors[-2]
        assert "same number of ranks on every host" in errors[-1]


def test_nbytes_formula_matches_packed_pieces():
    from commpress import wire

    c = moe_internode.Crossings(2, 2, 8, flat_pieces=(10, 3), internode_pieces=(4,))

    def packed(codec, n):
        return wire.packed_nbytes(commpress.get_codec(codec).encode(torch.zeros(n, 256)))

    got = c.nbytes(256)
    assert got["flat"] == sum(packed("fp8", n) + packed("bf16", n) for n in (10, 3))
    assert got["internode"] == packed("fp8", 4) + packed("bf16", 4) + 4 * 8 * (4 + 4)
    plain = c.nbytes(256, dispatch_codec="none", combine_codec="none", weights=False)
    assert plain == {"flat": 13 * 256 * 4 * 2, "internode": 4 * 256 * 4 * 2 + 4 * 8 * 4}
    fallback = moe_internode.Crossings(3, 1, 8, (5,), (5,)).nbytes(256)
    assert fallback["flat"] == fallback["internode"]


def measure_cross_bytes(tokens=512, hidden=1024, topk=4, experts=16, iters=2):
    """One rank's side of the emulated-host byte count (through multihost.run_function)."""
    import torch.distributed as dist

    from commpress.bench.multihost import nic_bytes

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, hidden, generator=g)
    ids = torch.rand(tokens, experts, generator=g).argsort(1)[:, :topk]  # top-k, distinct
    w = torch.rand(tokens, topk, generator=g)
    out = {}
    for name, mod in (("flat", moe), ("internode", moe_internode)):

        def call(mod=mod):
            recv, handle = mod.dispatch(x, ids, experts)
            mod.combine(recv, handle, weights=w)

        call()  # warm-up: subgroups and connections
        dist.barrier()
        c0 = nic_bytes()
        dist.barrier()
        c1 = nic_bytes()
        for _ in range(iters):
            dist.barrier()
            call()
        dist.barrier()
        c2 = nic_bytes()
        tx = "tx_bytes"
        out[name] = ((c2[tx] - c1[tx]) - (iters + 1) * (c1[tx] - c0[tx])) / iters
    c = moe_internode.crossings(ids, experts)
    return {
        "rank": rank,
        "host": os.environ.get("GROUP_RANK"),
        "out": out,
        "formula": c.nbytes(hidden),
        "rows": [c.flat, c.internode],
    }


@pytest.mark.parametrize("hosts, local", [(2, 2), (3, 1)], ids=["2x2", "3x1"])
def test_bytes_across_emulated_hosts(emulated_hosts, hosts, local):
    """Bytes out of the hosts' NICs per dispatch + combine (counters minus a barrier
    baseline, summed over hosts) against the formula summed over ranks, within 5%
    (the layout's shared job: ``tests/conftest.py``)."""
    ranks = emulated_hosts.ranks(hosts, local, "moe")
    one_per_host = {r["host"]: r["out"] for r in ranks}  # a host's ranks read one NIC
    assert len(one_per_host) == hosts
    for name in ("flat", "internode"):
        measured = sum(o[name] for o in one_per_host.values())
        expected = sum(r["formula"][name] for r in ranks)
        assert abs(measured / expected - 1) < 0.05, (name, measured, expected)
    if local > 1:  # top-4 of 16 experts on 2 hosts: ~2 remote slots per token, ~1 host
        assert all(r["rows"][1] < 0.6 * r["rows"][0] for r in ranks)
    else:
        assert all(r["rows"][0] == r["rows"][1] for r in ranks)
