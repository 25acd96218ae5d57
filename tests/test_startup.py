"""The start-up hook: free when unset, patches every process of a job when asked.

Each test runs fresh interpreters (the hook acts at interpreter start), so
they are the slow kind: a handful of 2-rank jobs, each bounded by TIMEOUT.
"""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import _commpress_startup

TIMEOUT = 150
ROOT = Path(__file__).resolve().parent.parent

# A rank's body: init gloo, one all_reduce big enough to compress, report its stats.
RANK_BODY = """
import os, sys
import torch, torch.distributed as dist
import commpress

def body(rank, world, init):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    t = torch.full((1 << 14,), 1.0 + rank)
    dist.all_reduce(t)
    ar = commpress.stats()["all_reduce"]
    print(f"rank {rank}: sum {t[0].item():.3f} compressed {ar.compressed} of {ar.calls}"
          f" patched {commpress.is_patched()}", flush=True)
    dist.destroy_process_group()
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMMPRESS_")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning", **extra)
    return env


def _python(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT
    )


def _script(tmp_path: Path, body: str, name: str = "job.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def _ranks(output: str) -> dict[int, tuple[int, int]]:
    """rank -> (compressed, calls) from the RANK_BODY lines."""
    found = re.findall(r"rank (\d+): sum \S+ compressed (\d+) of (\d+) patched True", output)
    return {int(r): (int(c), int(n)) for r, c, n in found}


# ------------------------------------------------------------------- installation, cost


def test_pth_file_is_installed_with_the_package():
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    found = [
        Path(d) / "commpress-startup.pth"
        for d in dirs
        if (Path(d) / "commpress-startup.pth").is_file()
    ]
    assert found, f"commpress-startup.pth not in {dirs}: reinstall with `pip install -e .`"
    assert found[0].read_text() == _commpress_startup.PTH_LINE


PROBE = (
    "import sys; print(sorted(m for m in sys.modules"
    " if m.split('.')[0] in ('torch', 'commpress', '_commpress_startup', 'numba')))"
)


def test_unset_variables_cost_nothing_and_set_ones_never_import_torch_alone():
    assert _python("-c", PROBE, env=_env()).stdout.strip() == "[]"
    # Asked to patch, a process that never imports torch loads only the tiny hook module.
    out = _python("-c", PROBE, env=_env(COMMPRESS_CODEC="int8")).stdout.strip()
    assert out == "['_commpress_startup']"


@pytest.mark.parametrize(
    "env, patched",
    [
        ({"COMMPRESS_CODEC": "int8"}, True),
        ({"COMMPRESS_PATCH": "1"}, True),
        ({"COMMPRESS_CODEC": "int8", "COMMPRESS_PATCH": "0"}, False),
        ({"COMMPRESS_CODEC": "none"}, False),
        ({}, False),
    ],
)
def test_wanted(env, patched):
    assert _commpress_startup.wanted(env) is patched


def test_import_torch_patches_and_a_bad_value_warns_instead_of_breaking_torch():
    probe = (
        "import torch.distributed as dist; "
        "print(hasattr(dist.all_reduce, '__commpress_original__'))"
    )
    proc = _python("-c", probe, env=_env(COMMPRESS_CODEC="int8"))
    assert proc.stdout.strip() == "True", proc.stderr[-2000:]
    proc = _python("-c", probe, env=_env(COMMPRESS_CODEC="int9"))
    assert proc.returncode == 0 and proc.stdout.strip() == "False"
    assert "commpress start-up hook: not patching" in proc.stderr and "int9" in proc.stderr


# ------------------------------------------------------------------------- whole jobs


def test_commpress_run_covers_mp_spawn_children(tmp_path):
    script = _script(
        tmp_path,
        RANK_BODY
        + """
if __name__ == "__main__":
    import socket, torch.multiprocessing as mp
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    mp.spawn(body, args=(2, f"tcp://127.0.0.1:{port}"), nprocs=2)
""",
    )
    proc = _python(
        "-m", "commpress", "run", "--codec", "int8", "--min-bytes", "0", "--stats", script,
        env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _ranks(proc.stdout) == {0: (1, 1), 1: (1, 1)}, proc.stdout
    # each spawned rank printed its own table; the parent says it made no call itself
    assert proc.stdout.count("commpress stats (pid") >= 3, proc.stdout
    assert "this process made no torch.distributed collective call" in proc.stderr


def test_commpress_run_covers_a_subprocess_relaunch(tmp_path):
    # What Lightning's launcher does: rank 0 runs in the first process and starts the
    # script again, with its own environment, for the other rank.
    script = _script(
        tmp_path,
        RANK_BODY
        + """
if __name__ == "__main__":
    import subprocess
    if "JOB_RANK" not in os.environ:
        import socket
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        child = subprocess.Popen([sys.executable, sys.argv[0]],
                                 env=dict(os.environ, JOB_RANK="1", JOB_PORT=str(port)))
        body(0, 2, f"tcp://127.0.0.1:{port}")
        sys.exit(child.wait())
    body(1, 2, f"tcp://127.0.0.1:{os.environ['JOB_PORT']}")
""",
    )
    proc = _python(
        "-m", "commpress", "run", "--codec", "int8", "--min-bytes", "0", script, env=_env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _ranks(proc.stdout) == {0: (1, 1), 1: (1, 1)}, proc.stdout


def test_torchrun_with_the_variable_alone_compresses(tmp_path):
    script = _script(
        tmp_path,
        RANK_BODY
        + """
if __name__ == "__main__":
    body(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://")
""",
    )
    proc = _python(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script,
        env=_env(COMMPRESS_CODEC="int8", COMMPRESS_MIN_BYTES="0"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _ranks(proc.stdout) == {0: (1, 1), 1: (1, 1)}, proc.stdout
