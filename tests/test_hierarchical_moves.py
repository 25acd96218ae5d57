"""Hierarchical reduce-scatter and all-gather on faked hosts: exact across ranks, bytes counted.

Hosts are faked on one machine through ``LOCAL_WORLD_SIZE`` / ``LOCAL_RANK``
(a rank's host is the block starting at ``rank - LOCAL_RANK``, so any layout
can be made): 4 gloo ranks as 2 x 2 in blocks ``{0,1} {2,3}``, interleaved
``{0,2} {1,3}`` and scattered ``{0,3} {1,2}`` (where a rank's inter-group
rank is not its host index), and the one-level shapes 1 x 4 and 4 x 1 that
fall back to the flat algorithms; 6 ranks as 3 x 2 and 2 x 3. The bytes of
the inter-host step are what its `two_phase` / `transport` call added to the
call's record, compared exactly with the formulas of
`commpress.algorithms.hierarchical_moves`. Nothing is timed.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from commpress.policy import Policy, decide
from commpress.testing import DistPool

R = dist.ReduceOp

BLOCKS = [[0, 1], [2, 3]]
INTERLEAVED = [[0, 2], [1, 3]]
SCATTERED = [[0, 3], [1, 2]]
ONE_HOST = [[0, 1, 2, 3]]
ONE_PER_HOST = [[0], [1], [2], [3]]
BOUND = {"int8": 2e-2, "int4": 0.25, "zstd": 0.0}


def _fake_hosts(rank: int, hosts: list[list[int]]) -> None:
    """Make ``hosts`` (lists of global ranks) the layout `topology.of` learns next."""
    from commpress import topology

    mine = next(h for h in hosts if rank in h)
    os.environ.pop("GROUP_RANK", None)
    os.environ["LOCAL_WORLD_SIZE"] = str(len(mine))
    os.environ["LOCAL_RANK"] = str(rank - min(mine))  # the host key is "block:<min>"
    topology.clear_cache()


def _input(rank: int, case: int, numel: int, integer: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * case + rank)
    x = torch.randn(numel, generator=g)
    return torch.round(x * 8) if integer else x


def _packed(codec: str, numel: int) -> int:
    from commpress import get_codec
    from commpress.algorithms.common import Comm, packed_size

    comm = Comm("x", None, 0, 1, torch.device("cpu"), get_codec(codec))
    return packed_size(comm, (numel,), torch.float32)


class _Spy:
    """Record the wire bytes each inner flat call adds to the call's record."""

    def __init__(self) -> None:
        from commpress.algorithms import transport, two_phase

        self.calls: list[tuple[str, int, int]] = []
        self._saved = [
            (two_phase, "reduce_scatter", two_phase.reduce_scatter),
            (transport, "all_gather", transport.all_gather),
        ]
        for module, name, fn in self._saved:
            setattr(module, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def spied(comm, *args, **kwargs):
            before = comm.rec.bytes_wire
            result = fn(comm, *args, **kwargs)
            self.calls.append((name, comm.size, comm.rec.bytes_wire - before))
            return result

        return spied

    def restore(self) -> None:
        for module, name, fn in self._saved:
            setattr(module, name, fn)


def body_moves(rank, world, hosts, n, algorithm="hierarchical"):
    """Reduce-scatters and all-gathers under ``algorithm``: outputs, errors, spied bytes."""
    import commpress.distributed as cdist
    from commpress.policy import using

    _fake_hosts(rank, hosts)
    spy = _Spy()
    rows = {}
    try:
        with using(Policy(algorithm=algorithm, min_bytes=0)):
            # reduce_scatter_tensor, int8 SUM: n elements per rank (odd)
            x = _input(rank, 0, world * n)
            out = torch.empty(n)
            start = len(spy.calls)
            cdist.reduce_scatter_tensor(out, x, codec="int8")
            ref = sum(_input(r, 0, world * n).double() for r in range(world))[
                rank * n : (rank + 1) * n
            ]
            rows["rs_int8"] = (out, _rel(out, ref), spy.calls[start:])
            # reduce_scatter (list), int4 AVG
            xs = [_input(rank, 1 + j, n) for j in range(world)]
            out = torch.empty(n)
            start = len(spy.calls)
            cdist.reduce_scatter(out, xs, op=R.AVG, codec="int4")
            ref = sum(_input(r, 1 + rank, n).double() for r in range(world)) / world
            rows["rs_int4_avg"] = (out, _rel(out, ref), spy.calls[start:])
            # reduce_scatter_tensor of bfloat16, int8: float32 inside the host
            x = _input(rank, 10, world * n).bfloat16()
            out = torch.empty(n, dtype=torch.bfloat16)
            cdist.reduce_scatter_tensor(out, x, codec="int8")
            ins = [_input(r, 10, world * n).bfloat16().double() for r in range(world)]
            ref = sum(ins)[rank * n : (rank + 1) * n]
            rows["rs_int8_bf16"] = (out, _rel(out, ref), [])
            # reduce_scatter_tensor, zstd MAX on integers: exact
            x = _input(rank, 20, world * n, integer=True)
            out = torch.empty(n)
            cdist.reduce_scatter_tensor(out, x, op=R.MAX, codec="zstd")
            ins = torch.stack([_input(r, 20, world * n, integer=True) for r in range(world)])
            ref = ins.max(0).values[rank * n : (rank + 1) * n].double()
            rows["rs_zstd_max"] = (out, _rel(out, ref), [])
            # all_gather_into_tensor, int8
            x = _input(rank, 30, n)
            out = torch.empty(world, n)
            start = len(spy.calls)
            cdist.all_gather_into_tensor(out, x, codec="int8")
            ref = torch.stack([_input(r, 30, n) for r in range(world)]).double()
            rows["ag_int8"] = (out, _rel(out, ref), spy.calls[start:])
            # all_gather_into_tensor, zstd (variable size: the inner step exchanges sizes)
            x = _input(rank, 35, n, integer=True)
            out = torch.empty(world * n)
            cdist.all_gather_into_tensor(out, x, codec="zstd")
            ref = torch.cat([_input(r, 35, n, integer=True) for r in range(world)]).double()
            rows["ag_zstd"] = (out, _rel(out, ref), [])
            # all_gather (list), int4, a different size on every rank
            sizes = [n + 7 * r for r in range(world)]
            outs = [torch.empty(s) for s in sizes]
            start = len(spy.calls)
            cdist.all_gather(outs, _input(rank, 40, sizes[rank]), codec="int4")
            cat = torch.cat(outs)
            ref = torch.cat([_input(r, 40, sizes[r]) for r in range(world)]).double()
            rows["ag_int4_uneven"] = (cat, _rel(cat, ref), spy.calls[start:])
    finally:
        spy.restore()
    return rows


def _rel(t: torch.Tensor, ref: torch.Tensor) -> float:
    return ((t.double() - ref).norm() / ref.norm()).item()


def _check_values(results, world):
    for name in results[0]:
        codec = name.split("_")[1]
        for r in range(world):
            err = results[r][name][1]
            assert err <= BOUND[codec], f"{name} rank {r}: relative error {err}"
    for name in ("ag_int8", "ag_zstd", "ag_int4_uneven"):  # every rank holds the same bits
        for r in range(1, world):
            assert torch.equal(results[r][name][0], results[0][name][0]), (name, r)


def _check_bytes(results, hosts: int, local: int, n: int):
    """The inter step's record bytes against the formulas, per rank (module docstring)."""
    world = hosts * local
    for rows in results:
        # reduce-scatter: each rank sends (H-1)/H * S / (L r) bytes across hosts, S the input
        for name, codec in (("rs_int8", "int8"), ("rs_int4_avg", "int4")):
            S, packed = world * n * 4, _packed(codec, n)
            ratio = n * 4 / packed
            (call,) = rows[name][2]
            assert call[:2] == ("reduce_scatter", hosts), call
            assert call[2] == pytest.approx((hosts - 1) / hosts * S / (local * ratio), rel=1e-12)
            assert call[2] == (hosts - 1) * packed
        # all-gather: handed to the backend once, S / (N r); sent (H-1) times across hosts
        S, packed = world * n * 4, _packed("int8", n)
        (call,) = rows["ag_int8"][2]
        assert call[:2] == ("all_gather", hosts), call
        assert call[2] == pytest.approx(S / (world * (n * 4 / packed)), rel=1e-12)
        (call,) = rows["ag_int4_uneven"][2]
        assert call[:2] == ("all_gather", hosts), call


N = 10_001


@pytest.mark.parametrize(
    "layout", [BLOCKS, INTERLEAVED, SCATTERED], ids=["blocks", "interleaved", "scattered"]
)
def test_two_hosts_by_two(gloo4, layout):
    results = gloo4.run(body_moves, layout, N)
    _check_values(results, 4)
    _check_bytes(results, 2, 2, N)


def test_one_level_falls_back_to_flat(gloo4):
    """H == 1 or L == 1: the flat algorithm on the whole group, bit for bit the flat result."""
    flat = gloo4.run(body_moves, BLOCKS, N, algorithm="auto")
    for layout in (ONE_HOST, ONE_PER_HOST):
        results = gloo4.run(body_moves, layout, N)
        _check_values(results, 4)
        for r in range(4):
            for name, row in results[r].items():
                assert torch.equal(row[0], flat[r][name][0]), (layout, name, r)
                assert all(size == 4 for _, size, _ in row[2]), (layout, name, row[2])
    # Flat, for scale: N - L = 2 of each rank's 3 int8 pieces cross hosts on 2 x 2, twice
    # the hierarchical (H-1) = 1 per rank; the spy saw the whole-group call.
    (call,) = flat[0]["rs_int8"][2]
    assert call[:2] == ("reduce_scatter", 4)


def body_disagree(rank, world):
    import commpress.distributed as cdist
    from commpress.errors import CollectiveError
    from commpress.policy import using

    _fake_hosts(rank, BLOCKS)  # first call on this layout: topology not learned yet
    algorithm = "two_phase" if rank == 3 else "hierarchical"
    try:
        with using(Policy(algorithm=algorithm, min_bytes=0)):
            cdist.reduce_scatter_tensor(torch.empty(100), torch.ones(400), codec="int8")
    except CollectiveError as exc:
        return str(exc)
    return None


def test_rank_on_flat_algorithm_raises_everywhere(gloo4):
    messages = gloo4.run(body_disagree, timeout=60)
    assert all(m and "algorithm" in m for m in messages), messages


def test_policy_selects_hierarchical_for_moves():
    hier = Policy(algorithm="hierarchical")
    env = Policy.from_env({"COMMPRESS_ALGORITHM": "hierarchical"})
    t = torch.zeros(1 << 16)
    ops = ("reduce_scatter", "reduce_scatter_tensor", "all_gather", "all_gather_into_tensor")
    for policy in (hier, env):
        for op in ops:
            redop = R.SUM if "reduce" in op else None
            d = decide(op, t, redop, "int8", world_size=4, policy=policy)
            assert d.algorithm == "hierarchical" and d.compressed, (op, d)
        d = decide("broadcast", t, None, "int8", world_size=4, policy=policy)
        assert d.algorithm == "transport"
    flat = Policy()
    assert decide("reduce_scatter", t, R.SUM, "int8", world_size=4, policy=flat).algorithm == (
        "two_phase"
    )
    assert decide("all_gather", t, None, "int8", world_size=4, policy=flat).algorithm == (
        "transport"
    )


def test_cost_models():
    from commpress.algorithms import CodecSpeed, Link, get_algorithm
    from commpress.algorithms.hierarchical_moves import all_gather_cost, reduce_scatter_cost

    S = 64 << 20
    fig = dict(intra_Bps=1e12, inter_Bps=1e8, encode_Bps=1e15, decode_Bps=1e15)
    zero = dict(inter_latency_s=0, intra_latency_s=0)
    t = reduce_scatter_cost(S, hosts=2, local=2, ratio=4.0, **zero, **fig)
    assert t == pytest.approx(1 / 2 * S / (2 * 4.0) / 1e8, rel=1e-3)
    t = all_gather_cost(S // 4, hosts=2, local=2, ratio=4.0, **zero, **fig)
    assert t == pytest.approx(S // 4 / 4.0 / 1e8, rel=1e-3)
    algo = get_algorithm("hierarchical")
    link, speed = Link(20e-6, 1e8, local=2, intra_bandwidth_Bps=1e12), CodecSpeed(1e15, 1e15, 4.0)
    assert algo.cost(S, 4, link, speed, family="reduce_scatter") < algo.cost(S, 4, link, speed)


@pytest.fixture(scope="module")
def gloo6():
    with DistPool(6, pg_timeout=60, job_timeout=200) as pool:
        yield pool


@pytest.mark.parametrize(
    "layout, hosts, local",
    [([[0, 1], [2, 3], [4, 5]], 3, 2), ([[0, 2, 5], [1, 3, 4]], 2, 3)],
    ids=["3x2-blocks", "2x3-scattered"],
)
def test_six_ranks(gloo6, layout, hosts, local):
    results = gloo6.run(body_moves, layout, 2_001)
    _check_values(results, 6)
    _check_bytes(results, hosts, local, 2_001)


def measure_moves(mib: float, iters: int = 2) -> dict:
    """One rank's side of `test_bytes_across_emulated_hosts` (run by `multihost.run_function`):
    bytes out of this rank's host NIC per hierarchical int8 reduce-scatter of ``mib`` MiB and
    all-gather into ``mib`` MiB, less a barrier-only baseline."""
    import commpress.distributed as cdist
    from commpress.bench.multihost import nic_bytes
    from commpress.policy import using

    world = dist.get_world_size()
    n = int(mib * (1 << 20)) // 4 // world
    x, piece = torch.randn(world * n), torch.randn(n)
    calls = {
        "rs": lambda: cdist.reduce_scatter_tensor(torch.empty(n), x, codec="int8"),
        "ag": lambda: cdist.all_gather_into_tensor(torch.empty(world * n), piece, codec="int8"),
    }
    out = {"host": os.environ.get("GROUP_RANK"), "n": n}
    with using(Policy(algorithm="hierarchical", min_bytes=0)):
        for name, call in calls.items():
            call()  # warm-up: subgroups and connections
            dist.barrier()
            c0 = nic_bytes()["tx_bytes"]
            dist.barrier()
            c1 = nic_bytes()["tx_bytes"]
            for _ in range(iters):
                call()
            dist.barrier()
            c2 = nic_bytes()["tx_bytes"]
            out[name] = ((c2 - c1) - (iters + 1) * (c1 - c0)) / iters
    return out


def test_bytes_across_emulated_hosts(emulated_hosts):
    """Bytes out of each emulated host's NIC (kernel counters; real torchrun across network
    namespaces, 1 Gbit/s) against ``(H-1)/H * S / ratio`` per host, within 2%, for both ops
    (the 2x2 layout's shared job: ``tests/conftest.py``, 8 MiB)."""
    hosts, local, mib = 2, 2, 8
    for r in emulated_hosts.ranks(hosts, local, "moves"):
        S, packed = mib << 20, _packed("int8", r["n"])
        expected = (hosts - 1) / hosts * S / (S / (hosts * local * packed))  # ratio of packets
        for name in ("rs", "ag"):
            assert abs(r[name] / expected - 1) < 0.02, (r["host"], name, r[name], expected)
