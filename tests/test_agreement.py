"""Agreement through the rendezvous store: unpatched or differently patched ranks are named."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from commpress import agreement
from commpress.errors import ConfigError
from commpress.policy import Policy
from commpress.testing import free_port

RANK = """
import os, sys, time
import torch, torch.distributed as dist
if os.environ.get("USE_PATCH") == "1":
    import commpress
    commpress.patch(codec="int8", min_bytes=0)
dist.init_process_group("gloo", init_method=sys.argv[1], rank=int(sys.argv[2]), world_size=2)
t0 = time.monotonic()
try:
    dist.all_reduce(torch.ones(1 << 14))
    print("done", flush=True)
except Exception as exc:
    print(f"raised after {time.monotonic() - t0:.1f} s: {type(exc).__name__}: {exc}", flush=True)
    os._exit(3)
"""


def test_fingerprint_is_canonical():
    a = Policy(codec="int8", ops={"all_reduce", "reduce_scatter"})
    b = Policy(codec="int8", ops=["reduce_scatter", "all_reduce"])
    assert agreement.fingerprint(a) == agreement.fingerprint(b)
    assert agreement.fingerprint(a) != agreement.fingerprint(a.replace(min_bytes=0))
    assert agreement.fingerprint(Policy(codec="int8")) != agreement.fingerprint(Policy(codec="fp8"))


def test_timeout_default_and_environment():
    assert agreement.timeout_s({}) == agreement.DEFAULT_TIMEOUT_S <= 60
    assert agreement.timeout_s({agreement.ENV_TIMEOUT: "2.5"}) == 2.5
    assert agreement.timeout_s({agreement.ENV_TIMEOUT: "0"}) == 0  # off
    with pytest.raises(ConfigError, match="COMMPRESS_AGREE_TIMEOUT"):
        agreement.timeout_s({agreement.ENV_TIMEOUT: "soon"})


def test_an_unpatched_rank_is_named_within_the_deadline(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK))
    init = f"tcp://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMMPRESS_")}
    env.update(OMP_NUM_THREADS="1", COMMPRESS_AGREE_TIMEOUT="4")
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), init, str(rank)],
            env=dict(env, USE_PATCH="1" if rank == 0 else "0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        out, err = procs[0].communicate(timeout=120)
        elapsed = time.monotonic() - start
        # The unpatched rank runs no commpress code, so nothing can tell it why; but
        # it is not left hanging: the patched rank's exit closes its connections.
        out1, err1 = procs[1].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 3, err[-3000:]
    assert (
        "CollectiveError" in out and "rank(s) [1] published no commpress policy within 4 s" in out
    )
    assert "commpress run" in out  # says what to do
    raised_after = float(out.split("raised after ")[1].split(" s")[0])
    assert 3.5 <= raised_after < 15, out
    assert elapsed < 90
    assert procs[1].returncode == 3 and "raised after" in out1, (out1, err1[-2000:])
