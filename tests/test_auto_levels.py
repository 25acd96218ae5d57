"""``auto`` on two-level groups: the levels are calibrated, and ``hierarchical`` is weighed.

Hosts are faked on one machine through ``LOCAL_WORLD_SIZE`` / ``LOCAL_RANK`` (4 gloo
ranks as 2 hosts x 2 ranks, and as 1 x 4), as in ``tests/test_hierarchical.py``. The
links of one machine do not make ``hierarchical`` pay, so the end-to-end test gives
every rank the same slow levels (as ``tests/test_auto.py`` does for the flat link) and
checks that the calls then run hierarchically, bit-identical on every rank and within
the codec's bound. Whether auto picks it on real emulated hosts is a measurement:
``benchmarks/bench_multihost.py --configs ...,auto`` (``benchmarks/results/multihost.md``).
No test here is timed.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist

from commpress import auto
from commpress.algorithms import Link
from commpress.calibration import Speed, Table, fit_levels
from commpress.policy import Policy
from commpress.testing import override_tables

F32 = torch.float32
SIZE = 16 << 20


def _table(flat_Bps: float, levels: Link | None, hier: bool = True) -> Table:
    """Codecs at 10 GB/s, every algorithm modelled as is (``hierarchical`` too if ``hier``)."""
    fast = Speed(1e-5, 1e10, 1e-5, 1e10)
    names = ["direct", "gather", "two_phase"] + (["hierarchical"] if hier else [])
    return Table(
        Link(1e-4, flat_Bps),
        Link(1e-4, flat_Bps),
        1e-4,
        {s: fast for s in ("bf16", "fp16", "int8")},
        {a: (0.0, 1.0) for a in names},
        "gloo",
        levels,
    )


# Two hosts of two ranks: 1 GB/s inside a host, a 10 MB/s link per host shared by its two
# ranks (5 MB/s each while both cross); the flat figures are the whole group's ring.
LEVELS = Link(1e-4, 5e6, 2, 1e-5, 1e9)


AUTO = Policy(codec="auto")


def _options(table: Table, family: str, policy: Policy = AUTO) -> set:
    choice, _ = auto.model(table, family, F32, SIZE, 4, True, 1e-2, policy)
    return {(c, a) for c, a, _ in choice[4]}


def test_hierarchical_is_weighed_only_where_the_group_has_two_levels():
    for family in ("all_reduce", "reduce_scatter", "all_gather"):
        assert ("int8", "hierarchical") in _options(_table(1e7, LEVELS), family), family
        assert not any(a == "hierarchical" for _, a in _options(_table(1e7, None), family))
        # Levels but never timed on this group: not trusted, not weighed.
        untimed = _options(_table(1e7, LEVELS, hier=False), family)
        assert not any(a == "hierarchical" for _, a in untimed), family


def test_the_model_picks_hierarchical_where_only_the_slow_level_pays():
    policy = Policy(codec="auto")
    (codec, algorithm, *_), d = auto.model(
        _table(1e7, LEVELS), "all_reduce", F32, SIZE, 4, True, 1e-2, policy
    )
    assert d.compressed and (codec, algorithm) == ("int8", "hierarchical"), d.reason
    # A slow host link that the flat figures already see at full speed, and a slow inside:
    # the flat algorithms win.
    slow_inside = dataclasses.replace(LEVELS, bandwidth_Bps=1e8, intra_bandwidth_Bps=1e6)
    _, d = auto.model(_table(1e7, slow_inside), "all_reduce", F32, SIZE, 4, True, 1e-2, policy)
    assert d.compressed and d.algorithm != "hierarchical", d.reason


def test_forcing_hierarchical_under_auto_binds_every_family_it_runs():
    forced = Policy(codec="auto", algorithm="hierarchical")
    for family in ("all_reduce", "reduce_scatter", "all_gather"):
        got = _options(_table(1e7, LEVELS), family, forced)
        assert {a for _, a in got} == {None, "hierarchical"}, (family, got)
    # Forcing a flat algorithm leaves the moving ops as they were (it binds reductions).
    two_phase = _options(
        _table(1e7, LEVELS), "all_gather", Policy(codec="auto", algorithm="two_phase")
    )
    assert ("int8", "transport") in two_phase and ("int8", "hierarchical") in two_phase


def test_fit_levels_recovers_each_levels_figures():
    # Ring all-reduce figures on each level: 2(n-1) alpha + 2(n-1)/n S / B.
    def ring(n: int, alpha: float, bw: float, s: int) -> float:
        return 2 * (n - 1) * alpha + 2 * (n - 1) / n * s / bw

    small, large = 4 << 10, 4 << 20
    times = [ring(2, 1e-5, 1e9, small), ring(2, 1e-5, 1e9, large)]
    times += [ring(3, 2e-4, 6e7, small), ring(3, 2e-4, 6e7, large)]
    link = fit_levels(3, 2, times)
    assert link.local == 2
    assert link.intra_latency_s == pytest.approx(1e-5, rel=1e-6)
    assert link.intra_bandwidth_Bps == pytest.approx(1e9, rel=1e-6)
    assert link.latency_s == pytest.approx(2e-4, rel=1e-6)
    assert link.bandwidth_Bps == pytest.approx(6e7, rel=1e-6)


# =================================================================== on gloo
def _fake_hosts(rank: int, local_size: int) -> None:
    from commpress import topology

    os.environ.pop("GROUP_RANK", None)
    os.environ["LOCAL_WORLD_SIZE"] = str(local_size)
    os.environ["LOCAL_RANK"] = str(rank % local_size)
    topology.clear_cache()


def _input(rank: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(100 + rank))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _levels_body(rank, world, local_size):
    import commpress.distributed as cdist
    from commpress import topology
    from commpress.policy import using

    _fake_hosts(rank, local_size)
    auto.reset()
    before = set(topology._subgroups)
    try:
        table = auto.calibrate(dist.group.WORLD, torch.device("cpu"), F32)
        made = sorted(set(topology._subgroups) - before)
        out = {"levels": table.levels, "corrections": sorted(table.corrections), "made": made}
        if table.levels is None:
            return out
        # The same slow levels on every rank: the large calls pay hierarchically only.
        override_tables(
            reduce_link=Link(1e-4, 1e7),
            gather_link=Link(1e-4, 1e7),
            levels=LEVELS,
            corrections={a: (0.0, 1.0) for a in ("direct", "gather", "two_phase")}
            | {"hierarchical": (0.0, 1.0)},
        )
        n = (4 << 20) // 4  # 4 MiB per rank: a bucket the slow levels make pay
        xs = [_input(r, n) for r in range(world)]
        got = {}
        with using(Policy(codec="auto", min_bytes=0)):
            t = xs[rank].clone()
            cdist.all_reduce(t)
            got["all_reduce"] = (t, _rel(t, sum(xs)))
            shard = torch.empty(n // world)
            cdist.reduce_scatter_tensor(shard, xs[rank])
            ref = sum(xs)[rank * (n // world) : (rank + 1) * (n // world)]
            got["reduce_scatter"] = (shard, _rel(shard, ref))
            gathered = torch.empty(world * n)
            cdist.all_gather_into_tensor(gathered, xs[rank])
            got["all_gather"] = (gathered, _rel(gathered, torch.cat(xs)))
        out["calls"] = got
        out["choices"] = [(c.op, c.bucket, c.codec, c.algorithm) for c in auto.decisions()]
        return out
    finally:
        os.environ.pop("LOCAL_WORLD_SIZE", None)
        os.environ.pop("LOCAL_RANK", None)
        topology.clear_cache()
        auto.reset()


def test_two_levels_are_calibrated_and_run_hierarchically_when_chosen(gloo4):
    results = gloo4.run(_levels_body, 2)
    first = results[0]
    levels = first["levels"]
    assert levels is not None and levels.local == 2
    assert levels.bandwidth_Bps > 0 and levels.intra_bandwidth_Bps > 0
    assert "hierarchical" in first["corrections"]  # timed in-band like the flat algorithms
    for r in results[1:]:  # combined across ranks: the same table everywhere
        assert r["levels"] == levels and r["corrections"] == first["corrections"]
        assert r["choices"] == first["choices"]
    chosen = {op: algo for op, bucket, codec, algo in first["choices"] if bucket == 4 << 20}
    assert chosen == {
        "all_reduce": "hierarchical",
        "reduce_scatter_tensor": "hierarchical",
        "all_gather_into_tensor": "hierarchical",
    }, first["choices"]
    for op, bound in (("all_reduce", 2e-2), ("reduce_scatter", 2e-2), ("all_gather", 1e-2)):
        if op != "reduce_scatter":  # a reduce-scatter's blocks differ by rank
            for r in results[1:]:
                assert torch.equal(r["calls"][op][0], first["calls"][op][0]), op
        for r in results:
            assert r["calls"][op][1] <= bound, (op, r["calls"][op][1])


def test_one_host_has_no_levels_and_builds_no_subgroup(gloo4):
    for r in gloo4.run(_levels_body, 4):
        assert r["levels"] is None and r["made"] == []
        assert "hierarchical" not in r["corrections"]


def _emulated_body(mib: int = 16) -> dict:
    """One rank of a real ``torchrun --nnodes 2`` job: auto on all_reduce, reduce_scatter
    and all_gather of ``mib`` MiB, with what it chose and a digest of each result."""
    import hashlib

    import commpress.distributed as cdist
    from commpress.policy import using

    rank, world = dist.get_rank(), dist.get_world_size()
    n = (mib << 20) // 4 // world * world
    x = _input(rank, n)
    xs = [_input(r, n) for r in range(world)]
    out = {"rank": rank}
    with using(Policy(codec="auto")):
        t = x.clone()
        cdist.all_reduce(t)
        shard = torch.empty(n // world)
        cdist.reduce_scatter_tensor(shard, x)
        gathered = torch.empty(world * n)
        cdist.all_gather_into_tensor(gathered, x)
    total = sum(xs)
    out["errors"] = [
        _rel(t, total),
        _rel(shard, total[rank * (n // world) : (rank + 1) * (n // world)]),
        _rel(gathered, torch.cat(xs)),
    ]
    digest = lambda y: hashlib.sha256(y.numpy().tobytes()).hexdigest()  # noqa: E731
    out["digests"] = [digest(t), digest(gathered)]
    out["choices"] = [(c.op, c.bucket, c.codec, c.algorithm) for c in auto.decisions()]
    out["levels"] = [repr(tb.levels) for tb in auto.tables().values()]
    return out


def test_auto_across_emulated_hosts_agrees_and_stays_within_bounds(emulated_hosts):
    """2 emulated hosts x 2 ranks at 1 Gbit/s, real torchrun: every rank calibrates the same
    levels and makes the same choices; results are identical and within int8's bound
    (the 2x2 layout's shared job: ``tests/conftest.py``)."""
    ranks = emulated_hosts.ranks(2, 2, "auto")
    first = ranks[0]
    assert first["levels"] and all(lv != "None" for lv in first["levels"])
    for r in ranks[1:]:
        assert r["choices"] == first["choices"] and r["levels"] == first["levels"]
        assert r["digests"] == first["digests"]
    for r in ranks:
        assert all(e <= 2e-2 for e in r["errors"]), r["errors"]
