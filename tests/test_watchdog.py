"""Ranks in different calls (compressed against plain) are told so, on every rank, in seconds.

Each case starts real processes (gloo on loopback) whose ranks disagree the way the
issue's reproducers do, with a short watchdog slice, and asserts every rank raises
`CollectiveError` naming the call, the ranks and what each called, well before the
process group's timeout (120 s here; torch's default is 30 minutes). A peer that is
merely late is not an error.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from commpress import watchdog
from commpress.errors import ConfigError
from commpress.testing import free_port

RANK = textwrap.dedent(
    """
    import datetime, json, sys, time
    import torch, torch.distributed as dist
    import commpress.distributed as cdist
    from commpress.policy import using

    init, rank, world, case = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    x = torch.full((1 << 14,), float(rank + 1))
    cdist.all_reduce(x.clone(), codec="int8")  # one agreed call first: numbering lines up
    t0 = time.monotonic()
    try:
        if case == "int8-vs-none":
            cdist.all_reduce(x, codec="int8" if rank == 0 else "none")
        elif case == "bf16-vs-none":
            cdist.all_reduce(x, codec="bf16" if rank == world - 1 else "none")
        elif case == "min-bytes":
            with using(codec="int8", min_bytes=0 if rank == 0 else 1 << 20):
                cdist.all_reduce(x)
        elif case == "raw-torch":  # the last rank calls torch.distributed itself
            if rank == world - 1:
                dist.all_reduce(x)
            else:
                cdist.all_reduce(x, codec="int8")
        elif case == "late-peer":
            if rank == 1:
                time.sleep(3)
            cdist.all_reduce(x, codec="int8")
        print(json.dumps({"ok": x[:4].tolist()}), flush=True)
    except Exception as exc:
        print(json.dumps({"raised": type(exc).__name__, "message": str(exc),
                          "after": time.monotonic() - t0}), flush=True)
    dist.destroy_process_group()
    """
)


def _run(case: str, world: int, slice_s: str = "0.5") -> list[dict]:
    import json

    init = f"tcp://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMMPRESS_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", COMMPRESS_WATCHDOG_S=slice_s)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, init, str(r), str(world), case],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    results = []
    for r, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{case}: rank {r} still waiting after 90 s (a hang)")
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert lines, f"{case}: rank {r} printed no result; stderr:\n{err[-3000:]}"
        results.append(json.loads(lines[-1]))
    return results


@pytest.mark.parametrize(
    "case, world, names",
    [
        ("int8-vs-none", 2, ("all_reduce int8 float32", "all_reduce plain float32")),
        ("bf16-vs-none", 3, ("all_reduce bf16 float32", "all_reduce plain float32")),
        ("min-bytes", 2, ("all_reduce int8 float32", "all_reduce plain float32")),
    ],
)
def test_compressed_against_plain_raises_on_every_rank(case, world, names):
    results = _run(case, world)
    for rank, got in enumerate(results):
        assert got.get("raised") == "CollectiveError", f"rank {rank}: {got}"
        assert got["after"] < 60, f"rank {rank} took {got['after']:.1f} s"
        message = got["message"]
        assert "call 2" in message and "different collective calls" in message, message
        for name in names:
            assert name in message, (name, message)


@pytest.mark.parametrize("world", [2, 3])
def test_a_peer_in_a_direct_torch_call_is_named_on_every_compressing_rank(world):
    results = _run("raw-torch", world)
    for rank, got in enumerate(results[:-1]):
        assert got.get("raised") == "CollectiveError", f"rank {rank}: {got}"
        assert got["after"] < 60, f"rank {rank} took {got['after']:.1f} s"
        message = got["message"]
        assert f"rank {world - 1} is in torch.distributed.all_reduce, called directly" in message
        assert "call #2 all_reduce int8 float32" in message, message
    # The direct caller cannot be woken from its backend wait; it fails when the others
    # leave (their exit closes its connections) instead of waiting for the timeout.
    assert results[-1].get("raised") == "RuntimeError", results[-1]
    assert results[-1]["after"] < 60, results[-1]


def test_a_late_peer_is_not_an_error():
    results = _run("late-peer", 2)
    for rank, got in enumerate(results):
        assert "ok" in got, f"rank {rank}: {got}"
        assert got["ok"] == pytest.approx([3.0] * 4, rel=0.02)


def test_interval_default_and_environment():
    assert watchdog.interval_s({}) == watchdog.DEFAULT_INTERVAL_S
    assert watchdog.interval_s({watchdog.ENV_INTERVAL: "0"}) == 0  # off
    assert watchdog.interval_s({watchdog.ENV_INTERVAL: "1.5"}) == 1.5
    with pytest.raises(ConfigError, match="COMMPRESS_WATCHDOG_S"):
        watchdog.interval_s({watchdog.ENV_INTERVAL: "-1"})
    with pytest.raises(ConfigError, match="COMMPRESS_WATCHDOG_S"):
        watchdog.interval_s({watchdog.ENV_INTERVAL: "often"})
