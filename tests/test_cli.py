"""The ``commpress`` command line and its ``codecs`` subcommand."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest

import commpress
from commpress import cli, cli_codecs
from commpress.cli_codecs import Progress, parse_codec_list, parse_size
from commpress.codec import Codec


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows by codec name (first column) -> the other cells."""
    rows = {}
    for line in text.splitlines():
        cells = line.split()
        if len(cells) == 7 and not cells[0].startswith("-"):
            rows[cells[0]] = cells[1:]
    return rows


def test_codecs_table(capsys):
    assert cli.main(["codecs", "--size", "64K", "--codecs", "none,bf16", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "64 KiB of float32 (16384 Gaussian elements, seed 0) on cpu" in out
    assert out.splitlines()[1].split()[:2] == ["codec", "ratio"]
    rows = _rows(out)
    assert list(rows) == ["dst.copy_(x)", "tensor.clone()", "none", "bf16"]
    assert rows["none"][0] == "1.00" and rows["none"][5] == "0"
    assert rows["bf16"][0] == "2.00" and 1e-4 < float(rows["bf16"][5]) < 1e-2
    assert rows["dst.copy_(x)"][2] == "1.00x" and rows["dst.copy_(x)"][4] == "1.00x"
    for name in ("dst.copy_(x)", "tensor.clone()", "none", "bf16"):
        assert float(rows[name][1]) > 0 and float(rows[name][3]) > 0
        assert float(rows[name][2].rstrip("x")) > 0 and float(rows[name][4].rstrip("x")) > 0
    assert "dst.copy_(x) into a preallocated buffer (memory speed)" in out


def test_codecs_json(capsys):
    argv = ["codecs", "--size", "4K", "--codecs", "none,zstd,bf16+lz4", "--json", "--repeat", "1"]
    assert cli.main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["size_bytes"] == 4096 and doc["numel"] == 1024 and doc["dtype"] == "float32"
    assert [r["codec"] for r in doc["rows"]] == ["none", "zstd", "bf16+lz4"]
    assert doc["clone_gbps"] > 0 and doc["copy_gbps"] > 0 and doc["threads"] == 1
    by_name = {r["codec"]: r for r in doc["rows"]}
    assert by_name["none"]["ratio"] == 1.0 and by_name["zstd"]["rel_l2_error"] == 0.0
    assert by_name["bf16+lz4"]["ratio"] > 1.9


def test_unsupported_dtype_shows_n_a(capsys):
    argv = [
        "codecs",
        "--size",
        "4K",
        "--dtype",
        "int32",
        "--codecs",
        "none,bf16,lz4",
        "--repeat",
        "1",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert rows["bf16"] == ["n/a"] * 6
    assert rows["lz4"][5] == "0" and rows["none"][0] == "1.00"
    assert "bf16: n/a: does not take int32" in out


def test_large_size_works(capsys):
    argv = ["codecs", "--size", "64MiB", "--codecs", "none", "--repeat", "1", "--json"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["size_bytes"] == 64 << 20


def test_console_script_in_a_subprocess():
    argv = [
        sys.executable,
        "-m",
        "commpress.cli",
        "codecs",
        "--size",
        "64K",
        "--codecs",
        "none,bf16",
        "--repeat",
        "1",
        "--progress",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert set(_rows(done.stdout)) >= {"tensor.clone()", "none", "bf16"}
    assert "[" in done.stderr and "3/3" not in done.stdout  # the bar goes to stderr only


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["codecs", "--size", "abc"], "invalid size 'abc'"),
        (["codecs", "--size", "0"], "at least 1 byte"),
        (["codecs", "--size", "5X"], "invalid size"),
        (["codecs", "--codecs", "nosuchcodec"], "registered codecs"),
        (["codecs", "--codecs", "zstd:level=99"], "1 <= level <= 22"),
        (["codecs", "--codecs", "int8:"], "must be followed"),
        (["codecs", "--repeat", "0"], "positive integer"),
        (["codecs", "--dtype", "float7"], "invalid choice"),
        (["nosuchcommand"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments_exit_nonzero_with_a_clear_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_size_smaller_than_an_element(capsys):
    assert cli.main(["codecs", "--size", "1", "--dtype", "float64"]) == 2
    assert "smaller than one float64 element" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert commpress.__version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, nbytes",
    [
        ("1K", 1024),
        ("4M", 4 << 20),
        ("64MiB", 64 << 20),
        ("1G", 1 << 30),
        ("100", 100),
        ("64kb", 64 << 10),
        ("1.5M", 3 << 19),
        ("16 MiB", 16 << 20),
        ("7B", 7),
    ],
)
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "abc", "-1", "0", "0.1", "MiB", "1iB", "1 K M", "1e6"])
def test_parse_size_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_codec_list_keeps_parameters_together():
    codecs = parse_codec_list("zstd:level=5,shuffle=0,lz4, bf16+zstd:level=2")
    assert [c.spec for c in codecs] == ["zstd:level=5,shuffle=0", "lz4", "bf16+zstd:level=2"]


def test_default_codec_list_covers_the_registry():
    specs = [c.spec for c in cli_codecs.default_codecs()]
    assert set(commpress.list_codecs()) <= set(specs)
    assert "bf16+zstd" in specs


@dataclass(frozen=True, repr=False)
class Broken(Codec):
    codec_id: ClassVar[str] = "test_broken"

    def _encode(self, x):
        raise RuntimeError("boom")

    def _decode(self, payload, numel, dtype):
        raise RuntimeError("never reached: encode fails first")


def test_a_broken_codec_is_reported_and_fails_the_run(capsys):
    args = argparse.Namespace(
        size=4096,
        dtype="float32",
        codecs=[commpress.get_codec("none"), Broken()],
        repeat=1,
        device="cpu",
        seed=0,
        json=False,
        progress=False,
        threads=1,
    )
    assert cli_codecs.run(args) == 1
    out = capsys.readouterr().out
    assert "test_broken: failed: RuntimeError: boom" in out
    assert _rows(out)["none"][0] == "1.00"


def test_progress_bar():
    stream = io.StringIO()
    bar = Progress(2, stream, enabled=True, width=4)
    bar.step("a")
    bar.step("bbb")
    bar.close()
    text = stream.getvalue()
    assert "[----] 0/2 a" in text and "[##--] 1/2 bbb" in text and text.endswith("\r")
    quiet = io.StringIO()
    Progress(2, quiet, enabled=False).step("a")
    assert quiet.getvalue() == ""
