"""The DDP comm hook under ``codec="auto"``: a decision per bucket, on 2 and 3 gloo ranks.

Which buckets pay depends on the link, so most tests replace the calibrated table of
the hook's group (after `commpress.hooks.register` calibrated it) by a synthetic one,
as ``tests/test_auto.py`` does for calls: a fast link (nothing pays: every bucket must
be plain DDP's bit for bit) or a slow one with a fixed cost per compressed call (the
large buckets compress with int8, the small ones stay plain, in one step). The tests
that keep the measured table (`patch`, the hook registered without `register`) check
against the bound of whatever codec auto chose. No test is timed.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch
import torch.distributed as dist

import commpress
from commpress import auto, hook_group
from commpress.algorithms import Link
from commpress.calibration import Speed
from commpress.errors import CodecMismatchError, ConfigError
from commpress.hooks import CompressionState, compress_hook, register
from commpress.testing import DistPool, override_tables

PG_TIMEOUT = 20  # a rank out of order fails in seconds, not at torch's 30 minutes
JOB_TIMEOUT = 150  # calibration included (1-3 s on an idle machine)
STEPS = 3
FAST = "fast"  # nothing pays
MIXED = "mixed"  # 64 KiB buckets pay (int8), 8 KiB and smaller do not


@pytest.fixture(scope="module")
def pool2():
    with DistPool(2, pg_timeout=PG_TIMEOUT, job_timeout=JOB_TIMEOUT) as p:
        yield p


@pytest.fixture(scope="module")
def pool3():
    with DistPool(3, pg_timeout=PG_TIMEOUT, job_timeout=JOB_TIMEOUT) as p:
        yield p


@pytest.fixture(params=[2, 3], ids=["world2", "world3"])
def pool(request):
    return request.getfixturevalue(f"pool{request.param}")


# ------------------------------------------------------------------ jobs (run on every rank)


class _Net(torch.nn.Module):
    """Parameters of 16 B to 64 KiB of gradient, one layer never used (``idle``) and one
    used by some ranks on some steps (``branch``): what ``find_unused_parameters`` is for."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(16, 128)
        self.hidden = torch.nn.Linear(128, 128)
        self.idle = torch.nn.Linear(128, 128)
        self.branch = torch.nn.Linear(128, 4)
        self.out = torch.nn.Linear(128, 4)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = torch.relu(self.hidden(torch.relu(self.inp(x))))
        y = self.out(h)
        return y + self.branch(h) if use_branch else y


def _force(group: dist.ProcessGroup, kind: str) -> None:
    """Replace the calibrated tables of ``group`` by a synthetic link; forget decisions."""
    fast = Speed(1e-5, 1e10, 1e-5, 1e10)
    bandwidth = 1e12 if kind == FAST else 1e7
    override_tables(
        group.group_name,
        reduce_link=Link(1e-4, bandwidth),
        gather_link=Link(1e-4, bandwidth),
        descriptor_s=1e-4,
        speeds={"int8": fast},  # the only candidate: one bound covers every choice
        corrections={a: (2e-3, 1.0) for a in ("gather", "two_phase")},
    )


@contextlib.contextmanager
def _skewed(rank: int):
    """Rank 0's engine starts each job late, rank 1's hook decides each bucket late.

    So on rank 0 a plain bucket arrives while the compressed bucket before it still
    waits in the engine's queue, and on rank 1 after that bucket posted its collectives.
    Yields a list that collects, on rank 0, every float32 backend all-reduce (a plain
    bucket: the compressed ones move uint8) issued outside the engine's queue while a
    job of the queue was still pending: one that may overtake an earlier bucket.
    """
    from commpress import engine, hooks

    eng = engine.get_engine()
    run, decide, all_reduce = eng.run, hooks._auto, dist.all_reduce
    pending = [0]
    local = threading.local()
    overtaking: list[str] = []

    def late_run(key, fn, **kw):
        def job():
            local.in_queue = True
            try:
                time.sleep(0.2)
                return fn()
            finally:
                pending[0] -= 1

        pending[0] += 1
        return run(key, job, **kw)

    def watched(tensor, *args, **kw):
        if tensor.dtype == torch.float32 and pending[0] and not getattr(local, "in_queue", 0):
            overtaking.append(f"{tensor.numel()} floats posted with {pending[0]} job(s) queued")
        return all_reduce(tensor, *args, **kw)

    def late_decide(*args):
        time.sleep(0.2)
        return decide(*args)

    if rank == 0:
        eng.run = late_run
        dist.all_reduce = watched
    else:
        hooks._auto = late_decide
    try:
        yield overtaking
    finally:
        eng.__dict__.pop("run", None)
        hooks._auto, dist.all_reduce = decide, all_reduce


def _train(
    rank,
    world,
    spec,
    *,
    table=None,
    how="register",
    state_kwargs=None,
    ddp_kwargs=None,
    skew=False,
):
    """Gradients after each step (params fixed), the state's choices, stats and decisions.

    ``spec``: None for plain DDP, else the hook's codec, installed ``how``: "register",
    "comm_hook" (``ddp.register_comm_hook``: calibration at the first bucket) or "patch".
    ``table``: `FAST` or `MIXED` to replace the calibrated table before the hook is
    installed. ``skew``: train under `_skewed`.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _Net()
    kwargs = ddp_kwargs or {"find_unused_parameters": True}
    static = kwargs.get("static_graph", False)  # then the same parameters every step
    if table is not None:
        twin = hook_group.twin(None)
        auto.calibrate(twin, torch.device("cpu"), torch.float32)
        _force(twin, table)
    patched = commpress.patch(codec=spec) if how == "patch" else None
    with patched or contextlib.nullcontext():
        net = DDP(model, bucket_cap_mb=0.002, **kwargs)
        state = None
        if spec is not None and how != "patch":
            state = CompressionState(codec=spec, **(state_kwargs or {}))
            if how == "register":
                register(net, state)
            else:
                net.register_comm_hook(state, compress_hook)
        commpress.reset_stats()
        grads = []
        skewed = _skewed(rank) if skew else contextlib.nullcontext([])
        with skewed as overtaking:
            for step in range(STEPS):
                gen = torch.Generator().manual_seed(1000 * rank + step)
                x = torch.randn(8, 16, generator=gen)
                for p in model.parameters():
                    p.grad = None
                net(x, static or (rank + step) % 2 == 0).pow(2).mean().backward()
                grads.append(
                    [None if p.grad is None else p.grad.clone() for p in model.parameters()]
                )
        hooks = net._comm_hooks if spec is not None else []
        if hooks:
            assert hooks[0][0] is compress_hook, hooks
            state = hooks[0][1]
    twin = hook_group.twin(None).group_name
    s = commpress.stats()["all_reduce"]
    return {
        "grads": grads,
        "chosen": dict(state.chosen) if state is not None else {},
        "spec": state.spec if state is not None else None,
        "hooked": bool(hooks),
        "overtaking": overtaking,
        "plain_ddp": state.plain_ddp if state is not None else None,
        "state": state.state_dict() if state is not None else None,
        "stats": (s.calls, s.compressed, s.bytes_in, s.bytes_wire),
        "decisions": [
            (c.op, c.dtype, c.bucket, c.codec, c.algorithm)
            for c in auto.decisions()
            if c.group == twin
        ],
    }


def _job(rank, world, runs):
    auto.reset()
    return {name: _train(rank, world, *args, **kwargs) for name, (args, kwargs) in runs.items()}


# ------------------------------------------------------------------------------ checks


def _bound(spec, plain_grads, world):
    """Elementwise bound on |hook - plain DDP| for one step, over every parameter (as in
    ``tests/test_ddp_modes.py``: each rank's pre-divided share encoded once, the sum once
    more; a block spans parameters, so the step's largest magnitude scales it)."""
    codec = commpress.get_codec(spec)
    top = world * max(float(g.abs().max()) for g in plain_grads if g is not None)
    share = world * float(codec.error_bound(torch.full((1024,), top / world)).max())
    return share + float(codec.error_bound(torch.full((1024,), top + share)).max()) + 1e-7


def _check(res, world, ours="ours", plain="plain"):
    """Every rank made the same decisions and holds the same gradients; those equal plain
    DDP's exactly when no bucket compressed, else within the chosen codecs' bound."""
    for r in range(1, world):
        assert res[r][ours]["chosen"] == res[0][ours]["chosen"]
        assert res[r][ours]["decisions"] == res[0][ours]["decisions"]
    codecs = {c for c in res[0][ours]["chosen"].values() if c is not None}
    for s in range(STEPS):
        exact = res[0][plain]["grads"][s]
        tol = max((_bound(c, exact, world) for c in codecs), default=0.0)
        for r in range(world):
            for i, got in enumerate(res[r][ours]["grads"][s]):
                want = res[r][plain]["grads"][s][i]
                assert (got is None) == (want is None), (s, i)
                if got is None:
                    continue
                assert torch.equal(got, res[0][ours]["grads"][s][i]), (s, i, r)
                if codecs:
                    assert float((got - want).abs().max()) <= tol, (s, i, codecs)
                else:
                    assert torch.equal(got, want), (s, i, r)
    return codecs


def _runs(**ours):
    return {"plain": ((None,), {}), "ours": (("auto",), ours)}


# ------------------------------------------------------------------------------- tests


def test_nothing_pays_register_leaves_the_model_on_plain_ddp(pool):
    world = pool.world_size
    res = pool.run(_job, _runs(table=FAST), timeout=JOB_TIMEOUT)
    assert _check(res, world) == set()
    for r in range(world):
        ours = res[r]["ours"]
        assert ours["plain_ddp"] and not ours["hooked"] and not ours["chosen"]
        assert ours["stats"][0] == 0  # DDP's own all-reduce, no commpress call at all


def test_plain_buckets_through_the_hook_are_plain_ddp_bit_for_bit(pool):
    """Hooked without `register` (nothing decides it away): every bucket decided plain."""
    world = pool.world_size
    res = pool.run(_job, _runs(table=FAST, how="comm_hook"), timeout=JOB_TIMEOUT)
    assert _check(res, world) == set()
    for r in range(world):
        ours = res[r]["ours"]
        assert ours["hooked"] and not ours["plain_ddp"]
        assert ours["chosen"] and all(c is None for c in ours["chosen"].values())
        calls, compressed, bytes_in, bytes_wire = ours["stats"]
        assert calls >= STEPS and compressed == 0 and bytes_wire == bytes_in  # no descriptor
        # the buckets' decisions are auto's, listed like a call's, and all plain
        assert ours["decisions"] and all(d[0] == "all_reduce" for d in ours["decisions"])
        assert all(d[3] is None for d in ours["decisions"])


def test_slow_link_compresses_large_buckets_and_keeps_small_ones_plain(pool):
    world = pool.world_size
    res = pool.run(_job, _runs(table=MIXED), timeout=JOB_TIMEOUT)
    assert _check(res, world) == {"int8"}
    chosen = res[0]["ours"]["chosen"]
    assert None in chosen.values()  # plain buckets between compressed ones, in one step
    for r in range(world):
        calls, compressed, bytes_in, bytes_wire = res[r]["ours"]["stats"]
        assert 0 < compressed < calls and 0 < bytes_wire < bytes_in
        assert {d[4] for d in res[r]["ours"]["decisions"] if d[3]} <= {"gather", "two_phase"}


def test_a_plain_bucket_never_overtakes_a_queued_compressed_one(pool2):
    res = pool2.run(_job, _runs(table=MIXED, skew=True), timeout=JOB_TIMEOUT)
    assert _check(res, 2) == {"int8"}
    assert None in res[0]["ours"]["chosen"].values()
    assert res[0]["ours"]["overtaking"] == []


def test_static_graph_under_auto(pool2):
    runs = {
        "plain": ((None,), {"ddp_kwargs": {"static_graph": True}}),
        "ours": (("auto",), {"table": MIXED, "ddp_kwargs": {"static_graph": True}}),
    }
    res = pool2.run(_job, runs, timeout=JOB_TIMEOUT)
    assert _check(res, 2) == {"int8"}


def test_hook_registered_by_ddp_calibrates_at_the_first_bucket(pool):
    """``ddp.register_comm_hook(state, compress_hook)`` (Lightning's way): no `register`,
    so the first bucket calibrates, from inside backward, in the group's queue."""
    res = pool.run(_job, _runs(how="comm_hook"), timeout=JOB_TIMEOUT)
    _check(res, pool.world_size)
    assert res[0]["ours"]["decisions"]


@pytest.mark.parametrize("table", [MIXED, FAST])
def test_patch_with_auto_hooks_ddp_where_a_bucket_pays(pool2, table):
    res = pool2.run(_job, _runs(how="patch", table=table), timeout=JOB_TIMEOUT)
    assert _check(res, 2) == ({"int8"} if table == MIXED else set())
    for r in range(2):
        assert res[r]["ours"]["hooked"] == (table == MIXED)
        if table == MIXED:
            assert res[r]["ours"]["spec"] == "auto" and res[r]["ours"]["chosen"]


def test_patch_with_auto_on_the_measured_link(pool2):
    res = pool2.run(_job, _runs(how="patch"), timeout=JOB_TIMEOUT)
    _check(res, 2)


def test_error_feedback_under_auto_keeps_residuals_of_the_chosen_codec(pool2):
    runs = {"ours": (("auto",), {"table": MIXED, "state_kwargs": {"error_feedback": True}})}
    res = pool2.run(_job, runs, timeout=JOB_TIMEOUT)
    for r in range(2):
        state = res[r]["ours"]["state"]
        compressed = {i for i, c in state["chosen"].items() if c is not None}
        assert compressed and set(state["feedback"]) == compressed
        fresh = CompressionState(codec="auto", error_feedback=True)
        fresh._layouts = dict(state["layouts"])
        fresh.load_state_dict(state)
        again = fresh.residuals()
        assert again.keys() == state["feedback"].keys()
        assert all(torch.equal(again[i], state["feedback"][i]) for i in again)


# ------------------------------------------------------------------- no pool needed


def test_auto_state_spec_and_checkpoint_checks():
    state = CompressionState(codec="auto")
    assert state.codec is None and state.spec == "auto" and state.auto_max_err == 1e-2
    assert not state.error_feedback  # auto never chooses a codec that needs it
    assert "auto" in repr(state)
    narrow = CompressionState(codec="auto:max_err=1e-3")
    assert narrow.spec == "auto:max_err=0.001" and narrow.auto_max_err == 1e-3
    saved = state.state_dict()
    assert saved["codec"] == "auto"
    with pytest.raises(CodecMismatchError, match="auto"):
        CompressionState(codec="int8").load_state_dict(saved)
    with pytest.raises(CodecMismatchError, match="max_err"):
        state.load_state_dict(narrow.state_dict())
    with pytest.raises(ConfigError, match="auto"):
        CompressionState(codec="auto:foo=1")
