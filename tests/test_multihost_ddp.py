"""A DDP training run launched by ``torchrun --nnodes 2`` across emulated hosts.

The documented command (docs/cluster.md)::

    COMMPRESS_ALGORITHM=hierarchical python -m commpress.bench.multihost \\
        --hosts 2 --local 2 --rate 1gbit -- examples/ddp_train.py --codec int8

Needs root and iproute2 (network namespaces); skips with the reason otherwise.
No timings are asserted: that the job runs on 4 ranks across two hosts, that the
hook compressed every bucket, that the loss fell, and that bytes crossed the link.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from commpress.bench import multihost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ddp_train_across_two_emulated_hosts() -> None:
    ok, why = multihost.available()
    if not ok:
        pytest.skip(f"no multi-host emulation: {why}")
    env = dict(os.environ, COMMPRESS_ALGORITHM="hierarchical")
    cmd = [
        sys.executable, "-m", "commpress.bench.multihost", "--hosts", "2", "--local", "2",
        "--rate", "1gbit", "--timeout", "240", "--",
        os.path.join(ROOT, "examples", "ddp_train.py"), "--codec", "int8", "--steps", "20",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "(hook codec int8, 4 ranks)" in out
    first = float(re.search(r"step\s+0\s+loss ([0-9.]+)", out).group(1))
    final = float(re.search(r"final loss ([0-9.]+)", out).group(1))
    assert final < first
    calls = re.search(r"all_reduce\s+(\d+)\s+(\d+)", out)
    assert calls is not None and calls.group(1) == calls.group(2) == "20"
    sent = [int(m) for m in re.findall(r"'out_bytes': (\d+)", out)]
    assert len(sent) == 2 and min(sent) > 0
