"""``commpress run``: argv pass-through, exit codes, exceptions, stats, env policy, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import textwrap

import pytest
import torch.distributed as dist

from commpress.cli import main
from commpress.patch import is_patched
from commpress.testing import DistPool

REPORT = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    from commpress.patch import is_patched
    from commpress.policy import get_policy
    with open(sys.argv[1], "w") as f:
        json.dump({"argv": sys.argv, "name": __name__, "codec": get_policy().codec,
                   "min_bytes": get_policy().min_bytes, "patched": is_patched(),
                   "swapped": hasattr(dist.all_reduce, "__commpress_original__")}, f)
    """
)


def _script(tmp_path, body, name="script.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_script_runs_patched_as_main_with_its_own_arguments(tmp_path):
    script = _script(tmp_path, REPORT)
    out = tmp_path / "out.json"
    argv_before = sys.argv[:]
    rc = main(["run", "--codec", "int8", "--min-bytes", "0", script, str(out), "--lr", "0.1",
               "--codec", "fp8", "-m"])  # fmt: skip
    assert rc == 0
    seen = json.loads(out.read_text())
    assert seen["argv"] == [script, str(out), "--lr", "0.1", "--codec", "fp8", "-m"]
    assert seen["name"] == "__main__" and seen["patched"] and seen["swapped"]
    assert seen["codec"] == "int8" and seen["min_bytes"] == 0
    assert not is_patched() and sys.argv == argv_before
    assert not hasattr(dist.all_reduce, "__commpress_original__")


def test_policy_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COMMPRESS_CODEC", "fp16")
    monkeypatch.setenv("COMMPRESS_MIN_BYTES", "4k")
    out = tmp_path / "out.json"
    assert main(["run", _script(tmp_path, REPORT), str(out)]) == 0
    seen = json.loads(out.read_text())
    assert seen["codec"] == "fp16" and seen["min_bytes"] == 4096


def test_module_mode(tmp_path, monkeypatch):
    pkg = tmp_path / "cp_run_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "job.py").write_text(REPORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out.json"
    assert main(["run", "--codec", "bf16", "-m", "cp_run_pkg.job", str(out)]) == 0
    seen = json.loads(out.read_text())
    assert seen["name"] == "__main__" and seen["codec"] == "bf16"


@pytest.mark.parametrize("code", [0, 3, "message"])
def test_exit_status_propagates(tmp_path, code):
    script = _script(tmp_path, f"import sys\nsys.exit({code!r})\n")
    with pytest.raises(SystemExit) as exc:
        main(["run", script])
    assert exc.value.code == code
    assert not is_patched()


@pytest.mark.parametrize(
    "raise_line, shown",
    [
        ("raise ValueError('boom')", "ValueError: boom"),
        ("raise commpress.ConfigError('bad knob')", "commpress.errors.ConfigError: bad knob"),
    ],
)
def test_exception_is_reported_like_python_does(tmp_path, capsys, raise_line, shown):
    script = _script(tmp_path, f"import commpress\n\ndef f():\n    {raise_line}\n\nf()\n")
    assert main(["run", "--stats", script]) == 1
    err = capsys.readouterr()
    assert err.err.startswith("Traceback (most recent call last):")
    assert f'File "{script}", line 6, in <module>' in err.err and shown in err.err
    assert "runpy" not in err.err and "cli_run" not in err.err
    assert "commpress stats" in err.out and "calls" in err.out  # --stats even on failure
    assert not is_patched()


def test_bad_arguments_exit_2_before_running(tmp_path, capsys):
    script = _script(tmp_path, "raise SystemExit('should not run')\n")
    assert main(["run", "--codec", "int8:block=x", script]) == 2
    assert "commpress run: error:" in capsys.readouterr().err
    assert main(["run", "--codec", "int9", script]) == 2
    assert "registered codecs" in capsys.readouterr().err
    assert main(["run", "--min-bytes", "-1", script]) == 2
    assert main(["run", str(tmp_path / "missing.py")]) == 2
    assert "missing.py" in capsys.readouterr().err
    assert not is_patched()


# ----------------------------------------------------------- 2 gloo ranks, in-process run


ALL_REDUCE = """
import torch, torch.distributed as dist
t = torch.full((4096,), 1.0 + dist.get_rank())
dist.all_reduce(t)
print("sum", t[0].item())
"""


def _run_on_rank(rank, world, script, codecs):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["run", "--codec", codecs[rank], "--min-bytes", "0", script])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pool():
    with DistPool(2) as p:
        yield p


def test_same_codec_on_every_rank_runs(pool, tmp_path):
    script = _script(tmp_path, ALL_REDUCE)
    for rc, out, err in pool.run(_run_on_rank, script, ("int8", "int8")):
        assert rc == 0, err
        assert "sum 3.0" in out


def test_codec_mismatch_across_ranks_surfaces(pool, tmp_path):
    script = _script(tmp_path, ALL_REDUCE)
    results = pool.run(_run_on_rank, script, ("int8", "fp8"), timeout=60)
    for rc, _, err in results:
        assert rc == 1
        assert "CodecMismatchError" in err and "int8" in err and "fp8" in err


def test_help_recommends_auto_like_the_readme():
    from pathlib import Path

    from commpress.cli import build_parser

    parser = build_parser()
    run = next(a for a in parser._actions if hasattr(a, "choices") and a.choices)
    text = " ".join(run.choices["run"].format_help().split())
    assert "auto (recommended" in text
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "**`auto` is the recommended setting**" in readme
