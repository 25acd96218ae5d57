"""Policy, decide, Engine, Handle and stats: the single-process parts of the collectives."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist

import commpress
from commpress import ConfigError, UnknownCodecError, get_codec
from commpress.engine import Engine, Handle, get_engine, set_engine
from commpress.errors import CollectiveError, UnsupportedDtypeError
from commpress.policy import Policy, decide, get_policy, set_policy, using
from commpress.stats import CallRecord, record

R = dist.ReduceOp
F32 = torch.zeros(10_000)  # 40 KB
I32 = torch.zeros(10_000, dtype=torch.int32)


# -------------------------------------------------------------------- Policy
def test_policy_defaults_and_canonical_codec():
    p = Policy()
    assert p.codec == "none" and p.verify and p.error_feedback is None and p.ops is None
    assert Policy(codec=None).codec == "none"
    assert Policy(codec={"id": "fp16"}).codec == "fp16"
    assert Policy(ops="all_reduce, isend").ops == frozenset({"all_reduce", "p2p"})
    assert Policy(codec="bf16").replace(min_bytes=0).min_bytes == 0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"min_bytes": -1}, ["min_bytes=-1"]),
        ({"min_bytes": 1.5}, ["min_bytes=1.5"]),
        ({"ops": ["all_reduce", "bogus"]}, ["'bogus'", "all_reduce"]),
        ({"algorithm": "ring"}, ["'ring'", "two_phase"]),
        ({"verify": "yes"}, ["verify='yes'"]),
        ({"error_feedback": 2}, ["error_feedback=2"]),
    ],
)
def test_policy_rejects_bad_values(kwargs, words):
    with pytest.raises(ConfigError) as info:
        Policy(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_policy_unknown_codec():
    with pytest.raises(UnknownCodecError):
        Policy(codec="nope")


def test_policy_from_env():
    env = {
        "COMMPRESS_CODEC": "fp16",
        "COMMPRESS_MIN_BYTES": "64k",
        "COMMPRESS_OPS": "all_reduce,p2p",
        "COMMPRESS_ERROR_FEEDBACK": "off",
        "COMMPRESS_ALGORITHM": "gather",
        "COMMPRESS_VERIFY": "0",
        "COMMPRESS_GATHER_BYTES": "1MiB",
        "COMMPRESS_CHECKSUM": "1",
    }
    p = Policy.from_env(env)
    assert p == Policy(
        codec="fp16",
        min_bytes=65536,
        ops={"all_reduce", "p2p"},
        error_feedback=False,
        algorithm="gather",
        verify=False,
        gather_bytes=1 << 20,
        checksum=True,
    )
    assert Policy.from_env({"COMMPRESS_OPS": "all"}).ops is None
    assert Policy.from_env({"COMMPRESS_ERROR_FEEDBACK": "auto"}).error_feedback is None
    assert Policy.from_env(env, min_bytes=0).min_bytes == 0


@pytest.mark.parametrize(
    "var, value",
    [
        ("COMMPRESS_MIN_BYTES", "lots"),
        ("COMMPRESS_VERIFY", "maybe"),
        ("COMMPRESS_OPS", "all_reduce,bogus"),
        ("COMMPRESS_ALGORITHM", "ring"),
    ],
)
def test_policy_from_env_names_the_bad_variable(var, value):
    with pytest.raises(ConfigError) as info:
        Policy.from_env({var: value})
    assert var in str(info.value) and value.split(",")[-1] in str(info.value)


def test_set_policy_and_thread_local_using():
    before = get_policy()
    try:
        set_policy(Policy(codec="bf16"))
        assert get_policy().codec == "bf16"
        seen = []
        with using(min_bytes=7) as p:
            assert p.codec == "bf16" and get_policy().min_bytes == 7
            t = threading.Thread(target=lambda: seen.append(get_policy().min_bytes))
            t.start()
            t.join()
        assert seen == [Policy(codec="bf16").min_bytes]  # other threads keep the global one
        assert get_policy().min_bytes != 7
    finally:
        set_policy(before)


# -------------------------------------------------------------------- decide
def _d(op, tensor, reduce_op=None, codec=None, world=4, **policy):
    """decide() for a per-call ``codec`` under ``Policy(**policy)`` (codec: ``policy_codec``)."""
    if "policy_codec" in policy:
        policy["codec"] = policy.pop("policy_codec")
    return decide(op, tensor, reduce_op, codec, world_size=world, policy=Policy(**policy))


def test_decide_never_lossy_where_it_must_not_be():
    assert not _d("all_reduce", F32, R.SUM, codec="none").compressed
    assert _d("all_reduce", F32, R.SUM, codec="bf16").algorithm == "direct"
    assert not _d("all_reduce", I32, R.SUM, codec="bf16").compressed
    assert not _d("broadcast", I32, codec="bf16").compressed
    for op in (R.MIN, R.MAX, R.PRODUCT):
        assert not _d("all_reduce", F32, op, codec="bf16").compressed
    assert not _d("all_reduce", F32, R.SUM, codec="bf16", world=1).compressed
    assert not _d("all_reduce", torch.zeros(0), R.SUM, codec="bf16", min_bytes=0).compressed
    assert not _d("all_reduce", F32, R.SUM, codec="bf16", min_bytes=40_001).compressed
    assert _d("all_reduce", F32, R.SUM, codec="bf16", min_bytes=40_000).compressed


def test_decide_lossless_codecs_take_exact_ops_and_integers():
    d = _d("all_reduce", F32, R.MAX, codec="zstd")
    assert d.compressed and d.algorithm in ("gather", "two_phase") and not d.error_feedback
    assert _d("all_reduce", I32, R.SUM, codec="zstd").compressed
    assert _d("all_gather", I32, codec="zstd").algorithm == "transport"


def test_decide_algorithms():
    big = torch.zeros(1 << 20)
    assert _d("all_reduce", F32, R.SUM, codec="int8").algorithm == "gather"
    assert _d("all_reduce", big, R.SUM, codec="int8").algorithm == "two_phase"
    assert _d("all_reduce", F32, R.SUM, codec="int8", world=9).algorithm == "two_phase"
    assert _d("reduce_scatter_tensor", F32, R.SUM, codec="int8").algorithm == "two_phase"
    with pytest.raises(ConfigError, match="summable"):
        _d("all_reduce", F32, R.SUM, codec="int8", algorithm="direct")
    assert (
        _d("all_reduce", F32, R.SUM, codec="bf16", algorithm="two_phase").algorithm == "two_phase"
    )
    for op in ("broadcast", "all_gather", "gather", "scatter", "all_to_all_single", "send"):
        assert _d(op, F32, codec="bf16").algorithm == "transport"
    d = _d("all_to_all_single", torch.zeros(1), codec="bf16", min_bytes=123)
    assert d.compressed and d.min_bytes == 123  # decided after the exchange


def test_decide_ops_filter_applies_to_the_policy_codec_only():
    assert not _d("broadcast", F32, policy_codec="bf16", ops={"all_reduce"}).compressed
    assert _d("all_reduce", F32, R.SUM, policy_codec="bf16", ops={"all_reduce"}).compressed
    assert _d("broadcast", F32, codec="bf16", ops={"all_reduce"}).compressed  # per-call codec=


def test_decide_avg_of_integers_is_refused():
    with pytest.raises(UnsupportedDtypeError, match="AVG"):
        _d("all_reduce", I32, R.AVG, codec="bf16")


def test_decide_error_feedback_defaults():
    assert _d("all_reduce", F32, R.SUM, codec="sign").error_feedback
    assert not _d("all_reduce", F32, R.SUM, codec="int8").error_feedback
    assert _d("all_reduce", F32, R.SUM, codec="int8", error_feedback=True).error_feedback
    assert not _d("all_reduce", F32, R.SUM, codec="sign", error_feedback=False).error_feedback
    assert not _d("broadcast", F32, codec="sign").error_feedback  # transport: no residuals


def test_decide_powersgd_is_all_reduce_only():
    assert _d("all_reduce", F32, R.SUM, codec="powersgd").algorithm == "powersgd"
    with pytest.raises(ConfigError, match="powersgd"):
        _d("broadcast", F32, codec="powersgd")
    # As the policy's default it simply does not apply to other ops.
    assert not _d("broadcast", F32, policy_codec="powersgd").compressed


def test_codec_declares_error_feedback_capability():
    assert get_codec("bf16").wants_error_feedback is False


# -------------------------------------------------------------------- Engine
@pytest.mark.parametrize(
    "kwargs", [{"num_threads": -1}, {"chunk_bytes": 1.5}, {"num_sms": 0}, {"stream_priority": "hi"}]
)
def test_engine_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        Engine(**kwargs)


def test_engine_rejects_absurd_thread_counts():
    with pytest.raises(ConfigError, match="at most 1024"):
        Engine(num_threads=10**9)
    Engine(num_threads=1024)  # the limit itself is allowed


def test_engine_runs_one_group_in_issue_order_and_handles_wait_out_of_order():
    engine = Engine()
    order: list[int] = []

    def job(i, delay):
        def run():
            time.sleep(delay)
            order.append(i)
            return i

        return run

    handles = [engine.run("g", job(i, 0.02 * (3 - i)), async_op=True) for i in range(3)]
    assert not engine.idle("g")
    assert engine.run("g", job(3, 0), async_op=False) == 3  # a blocking call queues behind
    assert handles[2].wait() and handles[0].wait() and handles[1].wait()
    assert order == [0, 1, 2, 3]
    assert [h.result() for h in handles] == [[0], [1], [2]]
    assert engine.idle("g")
    engine.close()


def test_handle_errors_futures_and_completed_handles():
    engine = Engine()

    def boom():
        raise CollectiveError("peer died")

    h = engine.run("g", boom, async_op=True)
    with pytest.raises(CollectiveError, match="peer died"):
        h.wait()
    assert h.is_completed() and not h.is_success()
    assert isinstance(h.exception(), CollectiveError)
    with pytest.raises(CollectiveError):
        h.get_future().wait()
    ok = engine.run("g", lambda: [torch.ones(2)], async_op=True)
    assert torch.equal(ok.get_future().wait()[0], torch.ones(2))
    done = Handle.done([torch.zeros(1)])
    assert done.is_completed() and done.wait() and done.get_future().done()
    lazy = Handle(completer=lambda: [torch.ones(1)], poll=lambda: True)
    assert lazy.is_completed() and torch.equal(lazy.result()[0], torch.ones(1))
    engine.close()


def test_get_and_set_engine():
    before = get_engine()
    mine = Engine(num_threads=0, chunk_bytes=0)
    try:
        assert set_engine(mine) is mine and get_engine() is mine
    finally:
        set_engine(None)
    assert get_engine() is not before and get_engine() is not mine


# --------------------------------------------------------------------- stats
def test_stats_are_thread_safe_and_print_a_table():
    commpress.reset_stats()

    def many():
        for _ in range(500):
            record(CallRecord("x_op", compressed=True, bytes_in=100, bytes_wire=25, encode_s=1e-6))

    threads = [threading.Thread(target=many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    record(CallRecord("y_op", compressed=False, bytes_in=64, bytes_wire=999))
    s = commpress.stats()
    assert s["x_op"].calls == 2000 and s["x_op"].compressed == 2000
    assert s["x_op"].ratio == 4.0
    assert s["y_op"].bytes_wire == 64  # an uncompressed call moves what it was given
    assert s["never"].calls == 0 and s.total().calls == 2001
    text = str(s)
    assert text.splitlines()[0].split()[:3] == ["op", "calls", "compressed"]
    assert "x_op" in text and "4.00" in text
    commpress.reset_stats()
    assert "no calls recorded" in str(commpress.stats())
