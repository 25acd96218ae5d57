"""Hierarchical all-reduce and topology: against a float64 reference, bit-identical on every rank.

Hosts are faked on one machine through ``LOCAL_WORLD_SIZE`` / ``LOCAL_RANK``
(4 gloo ranks as 2 hosts x 2 ranks in blocks and scattered as {0, 3} {1, 2},
and as 1 x 4; 3 ranks as 3 x 1). The
multi-namespace test (real ``torchrun --nnodes 2`` over shaped veth links)
runs where root and iproute2 exist and counts the bytes that cross the
emulated links; it skips with the reason elsewhere.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from commpress import ConfigError
from commpress.policy import Policy, decide

R = dist.ReduceOp


def _input(rank: int, case: int, numel: int, dtype: torch.dtype, integer: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * case + rank)
    x = torch.randn(numel, generator=g)
    if integer:  # sums of small integers are exact in float32: lossless must match bit for bit
        x = torch.round(x * 8)
    return x.to(dtype)


def _fake_hosts(rank: int, local_size: int, layout: list[list[int]] | None = None) -> None:
    """Blocks of ``local_size`` ranks, or ``layout`` (lists of global ranks): a rank's
    host key is ``block:<rank - LOCAL_RANK>``, so any layout can be faked."""
    from commpress import topology

    os.environ.pop("GROUP_RANK", None)
    os.environ["LOCAL_WORLD_SIZE"] = str(local_size)
    os.environ["LOCAL_RANK"] = str(rank % local_size)
    if layout is not None:
        os.environ["LOCAL_RANK"] = str(rank - min(next(h for h in layout if rank in h)))
    # A new layout may leave some ranks' host keys unchanged: every rank must re-learn.
    topology.clear_cache()


CASES = [
    # codec, dtype, numel, op, integer-valued input
    ("int8", torch.float32, 100_003, "SUM", False),
    ("int8", torch.float32, 65_536, "AVG", False),
    ("int4", torch.float32, 40_000, "SUM", False),
    ("int8", torch.bfloat16, 30_001, "SUM", False),
    ("bf16", torch.float32, 50_000, "AVG", False),
    ("zstd", torch.float32, 20_001, "SUM", True),
    ("zstd", torch.float32, 20_000, "MAX", True),
    ("int8", torch.float32, (6 << 20) // 4 + 5, "SUM", False),  # > Engine.chunk_bytes: chunked
    ("zstd", torch.float32, (6 << 20) // 4 + 7, "SUM", True),  # chunked, variable size
]
BOUND = {"int8": 2e-2, "int4": 0.25, "bf16": 1e-2, "zstd": 0.0}


def body_all_reduce(rank, world, local_size, cases, inner_pipeline=False, layout=None):
    import commpress
    import commpress.distributed as cdist
    from commpress import topology
    from commpress.algorithms import hierarchical
    from commpress.engine import Engine, set_engine
    from commpress.policy import using

    _fake_hosts(rank, local_size, layout)
    saved_pipe = hierarchical.PIPELINE_BYTES
    if inner_pipeline:  # one call for the whole tensor; the shard crosses hosts in chunks
        set_engine(Engine(chunk_bytes=0))
        hierarchical.PIPELINE_BYTES = 64 << 10
    out = []
    try:
        commpress.reset_stats()
        with using(Policy(algorithm="hierarchical", min_bytes=0)):
            for i, (codec, dtype, numel, opname, integer) in enumerate(cases):
                op = getattr(R, opname)
                t = _input(rank, i, numel, dtype, integer)
                cdist.all_reduce(t, op=op, codec=codec)
                ins = [_input(r, i, numel, dtype, integer).double() for r in range(world)]
                if opname == "MAX":
                    ref = torch.stack(ins).max(0).values
                else:
                    ref = torch.stack(ins).sum(0) / (world if opname == "AVG" else 1)
                err = ((t.double() - ref).norm() / ref.norm()).item()
                out.append((t, err))
        topo = topology.of(None)
        shape = (topo.hosts, topo.local_size, topo.intra_ranks, topo.inter_ranks)
        wire = commpress.stats()["all_reduce"].bytes_wire
    finally:
        if inner_pipeline:
            set_engine(None)  # a fresh default engine (the replaced one has stopped)
        hierarchical.PIPELINE_BYTES = saved_pipe
    return out, shape, wire


def _check(results, cases, world):
    outs = [r[0] for r in results]
    for i, (codec, dtype, numel, opname, _) in enumerate(cases):
        first, _ = outs[0][i]
        assert first.dtype == dtype and first.numel() == numel
        for r in range(1, world):
            assert torch.equal(outs[r][i][0], first), f"case {i} ({codec}): rank {r} differs"
        err = outs[0][i][1]
        assert err <= BOUND[codec], f"case {i} ({codec}, {opname}): relative error {err}"


def test_two_hosts_by_two(gloo4):
    results = gloo4.run(body_all_reduce, 2, CASES)
    _check(results, CASES, 4)
    shapes = [r[1] for r in results]
    assert shapes == [
        (2, 2, (0, 1), (0, 2)),
        (2, 2, (0, 1), (1, 3)),
        (2, 2, (2, 3), (0, 2)),
        (2, 2, (2, 3), (1, 3)),
    ]


def test_scattered_hosts(gloo4):
    # Hosts {0, 3} and {1, 2}: global rank 2 is host 1 but rank 0 of its inter group
    # (the inter step must use the inter group's rank order, not the host index).
    cases = [c for c in CASES if c[2] < 1 << 20][:3]
    results = gloo4.run(body_all_reduce, 2, cases, layout=[[0, 3], [1, 2]])
    _check(results, cases, 4)
    assert [r[1] for r in results] == [
        (2, 2, (0, 3), (0, 1)),
        (2, 2, (1, 2), (0, 1)),
        (2, 2, (1, 2), (2, 3)),
        (2, 2, (0, 3), (2, 3)),
    ]


def test_two_hosts_inner_pipeline(gloo4):
    cases = [
        ("int8", torch.float32, 200_003, "SUM", False),
        ("int4", torch.float32, 99_999, "AVG", False),
    ]
    _check(gloo4.run(body_all_reduce, 2, cases, inner_pipeline=True), cases, 4)


def test_one_host_is_exact(gloo4):
    # H == 1: nothing crosses hosts, nothing is compressed; integer data sums exactly.
    cases = [("int8", torch.float32, 10_001, "SUM", True)]
    results = gloo4.run(body_all_reduce, 4, cases)
    _check(results, cases, 4)
    assert results[0][0][0][1] == 0.0
    assert results[0][1][:2] == (1, 4)


def test_three_hosts_by_one(gloo3):
    cases = [c for c in CASES if c[2] < 1 << 20]
    results = gloo3.run(body_all_reduce, 1, cases)
    _check(results, cases, 3)
    assert [r[1][:2] for r in results] == [(3, 1)] * 3


def body_uneven(rank, world):
    import commpress.distributed as cdist
    from commpress.policy import using

    _fake_hosts(rank, 2)  # 3 ranks as blocks of 2: hosts {0, 1} and {2}
    try:
        with using(Policy(algorithm="hierarchical", min_bytes=0)):
            cdist.all_reduce(torch.ones(1000), codec="int8")
    except ConfigError as exc:
        return str(exc)
    return None


def test_uneven_hosts_raise_on_every_rank(gloo3):
    messages = gloo3.run(body_uneven)
    assert all(m and "same number of ranks on every host" in m for m in messages), messages


def test_policy_and_env_select_hierarchical():
    assert Policy(algorithm="hierarchical").algorithm == "hierarchical"
    env = Policy.from_env({"COMMPRESS_ALGORITHM": "hierarchical"})
    assert env.algorithm == "hierarchical"
    d = decide("all_reduce", torch.zeros(1 << 16), R.SUM, "int8", world_size=4, policy=env)
    assert d.algorithm == "hierarchical" and d.compressed


def test_cost_model_formula():
    from commpress.algorithms.hierarchical import cost

    S = 64 << 20
    fig = dict(intra_Bps=1e12, inter_Bps=1e8, encode_Bps=1e15, decode_Bps=1e15)
    t = cost(S, hosts=2, local=2, ratio=4.0, inter_latency_s=0, intra_latency_s=0, **fig)
    assert t == pytest.approx(2 * 1 / 2 * S / (2 * 4.0) / 1e8, rel=1e-3)
    assert cost(S, hosts=1, local=4, ratio=4.0, **fig) < t


@pytest.mark.parametrize("hosts, local", [(2, 2), (3, 1)], ids=["2x2", "3x1"])
def test_bytes_across_emulated_hosts(emulated_hosts, hosts, local):
    """Bytes out of each emulated host's NIC per call (kernel counters minus a barrier
    baseline) against ``2 (H-1)/H * S / ratio``, within 2%; real torchrun across namespaces
    (the layout's shared job: ``tests/conftest.py``, 16 MiB, 2 calls)."""
    from commpress.bench import multihost

    mib = 16
    ranks = emulated_hosts.ranks(hosts, local, "hierarchical")
    expected, ratio = multihost.expected_cross_bytes("int8", mib << 18, hosts, local)
    assert 3.9 < ratio < 4.0
    assert sorted(r["host"] for r in ranks) == sorted(
        str(h) for h in range(hosts) for _ in range(local)
    )
    for r in ranks:
        row = r["configs"]["hier-int8"]
        assert row["rel_err"] < 2e-2
        assert abs(row["out_bytes"] / expected - 1) < 0.02, (r["rank"], row["out_bytes"], expected)
