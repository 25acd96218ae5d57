"""The algorithm table, the chunked driver, and profiler ranges of compressed calls."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.distributed as dist

from commpress.algorithms import (
    Algorithm,
    CodecSpeed,
    Link,
    algorithm_names,
    algorithms,
    get_algorithm,
    register_algorithm,
)
from commpress.algorithms import registry as algo_registry
from commpress.algorithms.chunked import chunk_ranges, prepare_ahead, run_stages
from commpress.engine import Engine
from commpress.errors import ConfigError
from commpress.policy import Policy, algorithm_choices, decide


def test_every_algorithm_declares_a_unique_name_and_code():
    table = algorithms()
    assert {a.name for a in table} >= {"direct", "two_phase", "gather", "hierarchical", "powersgd"}
    assert len({a.code for a in table}) == len(table)
    for a in table:
        assert get_algorithm(a.name) is a
        assert a.families, a


def test_unknown_algorithm_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown algorithm 'ring'.*two_phase"):
        get_algorithm("ring")


def test_policy_algorithms_come_from_the_table():
    forced = [a.name for a in algorithms("all_reduce") if not a.by_codec]
    assert algorithm_choices() == ("auto", *forced)
    assert "powersgd" not in algorithm_choices()  # chosen by its codec only


@pytest.fixture
def ring():
    """A toy algorithm registered for one test, then removed from the table."""

    @register_algorithm
    class Ring(Algorithm):
        name = "ring_test"
        code = 99

        def cost(self, nbytes, world, link, speed):
            return link.seconds(nbytes / speed.ratio, world)

    yield get_algorithm("ring_test")
    del algo_registry._TABLE["ring_test"]


def test_a_registered_algorithm_is_found_by_name(ring):
    assert "ring_test" in algorithm_names()
    assert "ring_test" in algorithm_choices()  # registered after import: still a choice
    x = torch.zeros(1 << 20)
    forced = Policy(algorithm="ring_test")
    assert (
        decide("all_reduce", x, dist.ReduceOp.SUM, "int8", world_size=2, policy=forced).algorithm
        == "ring_test"
    )
    assert ring.cost(1000, 2, Link(1e-3, 1e6), CodecSpeed(1e9, 1e9, 4.0)) == pytest.approx(
        2e-3 + 250 / 1e6
    )
    assert ring in algorithms("all_reduce")


def test_registering_a_taken_name_or_code_fails(ring):
    with pytest.raises(ConfigError, match="clashes"):

        @register_algorithm
        class Again(Algorithm):
            name = "ring_test"
            code = 98

    with pytest.raises(ConfigError, match="clashes"):

        @register_algorithm
        class SameCode(Algorithm):
            name = "other_test"
            code = 99


def test_default_choice_follows_auto_order_and_declarations():
    x = torch.zeros(1 << 20)
    small = torch.zeros(1 << 14)
    assert decide("all_reduce", x, dist.ReduceOp.SUM, "bf16", world_size=2).algorithm == "direct"
    assert decide("all_reduce", x, dist.ReduceOp.SUM, "int8", world_size=2).algorithm == "two_phase"
    assert (
        decide(
            "all_reduce", small, dist.ReduceOp.SUM, "int8", world_size=2, policy=Policy(min_bytes=0)
        ).algorithm
        == "gather"
    )
    with pytest.raises(ConfigError, match="Policy\\(algorithm='direct'\\) needs a summable"):
        decide(
            "all_reduce",
            x,
            dist.ReduceOp.SUM,
            "int8",
            world_size=2,
            policy=Policy(algorithm="direct"),
        )


def test_cost_models_are_positive_and_grow_with_size():
    link = Link(latency_s=50e-6, bandwidth_Bps=125e6, local=2, intra_bandwidth_Bps=5e9)
    speed = CodecSpeed(encode_Bps=2e9, decode_Bps=2e9, ratio=3.9)
    for a in algorithms("all_reduce"):
        small, large = a.cost(1 << 16, 4, link, speed), a.cost(1 << 26, 4, link, speed)
        assert 0 < small < large < math.inf, a
    plain = get_algorithm("direct").cost(1 << 26, 4, link, CodecSpeed.plain())
    compressed = get_algorithm("two_phase").cost(1 << 26, 4, link, speed)
    assert compressed < plain  # at 1 Gbit/s int8-like compression pays


def test_run_stages_interleaves_by_lag():
    log = []

    def stage(name):
        def fn(k, state):
            log.append((name, k))
            return (state or ()) + (name,)

        return fn

    last = run_stages(3, [(0, stage("a")), (1, stage("b")), (2, stage("c"))])
    assert last == [("a", "b", "c")] * 3
    assert log == [
        ("a", 0),
        ("a", 1), ("b", 0),
        ("a", 2), ("b", 1), ("c", 0),
        ("b", 2), ("c", 1),
        ("c", 2),
    ]  # fmt: skip


def test_prepare_ahead_prepares_ahead_and_finishes_in_order():
    engine = Engine(num_threads=2)
    prepared: list[int] = []
    finished: list[int] = []

    def prepare(i):
        prepared.append(i)
        return i * 10

    def finish(i, state):
        assert state == i * 10
        if i == 0:
            time.sleep(0.05)
            assert len(prepared) >= 3  # chunks 1 and 2 were encoded meanwhile
        finished.append(i)

    prepare_ahead(6, prepare, finish, engine)
    assert finished == list(range(6)) and sorted(prepared) == list(range(6))
    with pytest.raises(ValueError, match="bad chunk"):
        prepare_ahead(
            4, prepare, lambda i, s: (_ for _ in ()).throw(ValueError("bad chunk")), engine
        )
    engine.close()


def test_chunk_ranges_cover_the_tensor():
    assert chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_ranges(8, 4) == [(0, 4), (4, 8)]


# ------------------------------------------------------------- multi-process
def _chunked_equals_whole(rank: int, world: int) -> list[float]:
    """Chunked and whole all-reduces of one tensor, for every form of the driver."""
    import commpress
    import commpress.distributed as cdist
    from commpress.engine import Engine, set_engine

    torch.manual_seed(rank)
    x = torch.randn(300_001)
    gaps = []
    try:
        for spec, threads in (("int8", 1), ("bf16", 1), ("int8+zstd", 1), ("int8+zstd", 0)):
            set_engine(Engine(chunk_bytes=0))
            whole = x.clone()
            cdist.all_reduce(whole, codec=spec)
            set_engine(Engine(chunk_bytes=64 << 10, num_threads=threads))
            chunked = x.clone()
            cdist.all_reduce(chunked, codec=spec)
            ref = x.clone()
            dist.all_reduce(ref)
            # Chunks quantize in other blocks, so compare both with the exact sum.
            gaps.append(
                float((chunked - ref).abs().max() / (whole - ref).abs().max().clamp_min(1e-30))
            )
        commpress.reset_stats()
    finally:
        set_engine(None)
    return gaps


def test_chunked_driver_matches_the_whole_call(gloo):
    for gaps in gloo.run(_chunked_equals_whole):
        assert all(g < 2.0 for g in gaps), gaps


def _profiled(rank: int, world: int) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    import commpress.distributed as cdist

    t = torch.randn(1 << 18)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cdist.all_reduce(t, codec="int8")
        cdist.broadcast(t, 0, codec="int8")
    return sorted({e.name for e in prof.events() if e.name.startswith("commpress:")})


def test_compressed_calls_show_in_profiler_traces(gloo2):
    for names in gloo2.run(_profiled):
        assert "commpress:all_reduce[int8]" in names, names
        assert "commpress:broadcast[int8]" in names, names
        for phase in ("commpress:encode", "commpress:transfer", "commpress:decode"):
            assert phase in names, names


def _ratios(rank: int, world: int) -> dict[str, float]:
    import commpress
    import commpress.distributed as cdist

    commpress.reset_stats()
    x = torch.randn(world * (1 << 18))
    cdist.all_reduce(x.clone(), codec="int8")
    cdist.reduce_scatter_tensor(torch.empty(1 << 18), x, codec="int8")
    cdist.reduce_scatter(torch.empty(1 << 18), list(x.chunk(world)), codec="int8")
    cdist.all_to_all_single(torch.empty_like(x), x, codec="int8")
    ins = list(x.chunk(world))
    cdist.all_to_all([torch.empty_like(t) for t in ins], ins, codec="int8")
    s = commpress.stats()
    ops = (
        "all_reduce",
        "reduce_scatter_tensor",
        "reduce_scatter",
        "all_to_all_single",
        "all_to_all",
    )
    return {op: s[op].ratio for op in ops}


def test_stats_ratio_compares_like_with_like(gloo):
    """A rank's own block of a reduce-scatter or all-to-all never leaves it: not counted
    on either side of the ratio, so int8 reads ~3.9x on every op (it read ~2x more)."""
    for ratios in gloo.run(_ratios):
        for op, ratio in ratios.items():
            assert 3.5 < ratio < 4.0, (op, ratios)


def test_the_protocol_refuses_what_an_algorithm_does_not_declare():
    with pytest.raises(ConfigError, match="'transport' does not run all_reduce; it runs"):
        get_algorithm("transport").all_reduce(None, torch.zeros(1), dist.ReduceOp.SUM)

    class NoModel(Algorithm):
        name = "no_model_test"
        code = 97

    with pytest.raises(TypeError, match="abstract"):
        NoModel()  # every algorithm states its cost model
