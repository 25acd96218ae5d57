"""``commpress bench``: argument and size parsing, busbw factors, rows from a tiny 2-rank run."""

from __future__ import annotations

import argparse
import math

import pytest

from commpress.bench import cli
from commpress.bench.collectives import (
    BASELINES,
    OPS,
    SweepConfig,
    add_speedups,
    bus_factor,
    size_range,
    sweep,
)
from commpress.units import parse_size


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    return parser.parse_args(argv)


def test_size_range_is_nccl_tests_b_e_f():
    assert size_range(parse_size("8K"), parse_size("256M"), 4)[:3] == [8192, 32768, 131072]
    assert size_range(parse_size("8K"), parse_size("256M"), 4)[-1] == 128 << 20
    assert size_range(1 << 20, 16 << 20, 4) == [1 << 20, 4 << 20, 16 << 20]
    with pytest.raises(ValueError):
        size_range(16, 8, 2)
    with pytest.raises(ValueError):
        size_range(8, 16, 1)


@pytest.mark.parametrize(
    "op, n, factor",
    [
        ("all_reduce", 2, 1.0),
        ("all_reduce", 4, 1.5),
        ("all_gather", 4, 0.75),
        ("reduce_scatter", 2, 0.5),
        ("broadcast", 8, 1.0),
        ("all_to_all", 4, 0.75),
    ],
)
def test_bus_factors_are_nccl_tests(op, n, factor):
    assert bus_factor(op, n) == pytest.approx(factor)


def test_default_invocation_is_the_short_demo():
    config = cli.build_config(parse([]))
    assert config.ops == ("all_reduce",)
    assert config.codecs == ("bf16", "int8", "int4")
    assert config.sizes == (1 << 20, 4 << 20, 16 << 20)
    assert config.world_size == 2 and config.link == "none"
    names = [c.codec for c in config.cases()]
    assert names[:2] == list(BASELINES)  # plain fp32 and bf16 always come first
    assert names[:5] == ["plain-fp32", "plain-bf16", "bf16", "int8", "int4"]


def test_options_parse():
    args = parse(
        [
            "--ops",
            "all_gather,broadcast",
            "--codecs",
            "int8:block=128+zstd,fp8",
            "-b",
            "8K",
            "-e",
            "256M",
            "-f",
            "8",
            "--world-size",
            "3",
            "--warmup",
            "0",
            "--iters",
            "2",
            "--link",
            "1GBIT",
        ]
    )
    config = cli.build_config(args)
    assert config.ops == ("all_gather", "broadcast")
    assert config.codecs == ("int8:block=128+zstd", "fp8")
    assert config.sizes[0] == 8192 and config.sizes[1] == 65536
    assert (config.world_size, config.warmup, config.iters, config.link) == (3, 0, 2, "1gbit")
    assert cli.build_config(parse(["--ops", "all"])).ops == OPS
    shaped = cli.build_config(parse(["--shape", "64x32", "--codecs", "powersgd:rank=4"]))
    assert {c.size for c in shaped.cases()} == {64 * 32 * 4}


@pytest.mark.parametrize(
    "argv", [["--ops", "all_sum"], ["-b", "1Q"], ["--shape", "4x"], ["-b", "16M", "-e", "1M"]]
)
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    assert cli.run(parse(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("commpress bench: ") and "\n" not in err


COLUMNS = {
    "op",
    "size",
    "count",
    "codec",
    "world_size",
    "link",
    "time_us",
    "time_p10_us",
    "time_p90_us",
    "algbw_GBps",
    "busbw_GBps",
    "wire_bytes",
    "ratio",
    "encode_share",
    "decode_share",
    "rel_err",
    "speedup_fp32",
    "speedup_bf16",
    "iters",
    "status",
}


def test_tiny_two_rank_sweep_gives_rows_with_every_column():
    # 128 KiB: every rank's contribution is above the policy's 32 KiB min_bytes.
    config = SweepConfig(ops=OPS, codecs=("int8",), sizes=(128 << 10,), warmup=0, iters=2)
    rows = add_speedups(list(sweep(config)))
    assert len(rows) == len(OPS) * 3
    for r in rows:
        assert r["status"] == "ok", r
        assert COLUMNS <= set(r)
        assert r["time_p10_us"] <= r["time_us"] <= r["time_p90_us"]
        assert r["algbw_GBps"] == pytest.approx(r["size"] / r["time_us"] / 1e3)
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * bus_factor(r["op"], 2))
    by = {(r["op"], r["codec"]): r for r in rows}
    for op in OPS:
        fp32, bf16 = by[(op, "plain-fp32")], by[(op, "plain-bf16")]
        assert fp32["rel_err"] == 0.0 and fp32["speedup_fp32"] == 1.0
        assert bf16["ratio"] == 2.0 and bf16["rel_err"] < 1e-2 and bf16["speedup_bf16"] == 1.0
        assert by[(op, "int8")]["compressed"] is True
        assert by[(op, "int8")]["ratio"] > 2.0 and by[(op, "int8")]["rel_err"] < 0.05
        assert 0.0 <= by[(op, "int8")]["encode_share"] <= 1.0
        assert math.isclose(
            by[(op, "int8")]["speedup_bf16"],
            bf16["time_us"] / by[(op, "int8")]["time_us"],
        )


def test_link_unavailable_says_why_in_one_line_and_exits_nonzero(monkeypatch, capsys):
    from commpress.bench import netem

    monkeypatch.setattr(netem, "link_available", lambda: (False, "unshare: not permitted"))
    assert cli.run(parse(["--link", "1gbit"])) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "unshare: not permitted" in err and "without --link" in err


def test_break_even_models():
    from commpress.bench.breakeven import codec_rows, predicted_speedup

    # 1 GB/s codec, ratio 4, 1 Gbit/s (0.125 GB/s) link: serial 1/(1/1 + 1/(4*0.125)) / (1/0.125)
    assert predicted_speedup(1.0, 4.0, 1.0, pipelined=False) == pytest.approx(8 / 3)
    assert predicted_speedup(1.0, 4.0, 1.0, pipelined=True) == pytest.approx(4.0)
    assert predicted_speedup(1.0, 4.0, 16.0, pipelined=True) == pytest.approx(0.5)  # codec-bound
    (row,) = codec_rows(["int8"], nbytes=1 << 16, repeats=1)
    assert row["status"] == "ok" and row["ratio"] > 3.5
    gbit = 8 * row["codec_GBps"]
    assert row["break_even_pipelined_gbit"] == pytest.approx(gbit)
    assert row["break_even_serial_gbit"] == pytest.approx(gbit * (1 - 1 / row["ratio"]))
    # At the serial break-even speed the serial model predicts a tie.
    tie = predicted_speedup(row["codec_GBps"], row["ratio"], row["break_even_serial_gbit"], False)
    assert tie == pytest.approx(1.0)
