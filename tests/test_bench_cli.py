"""``commpress bench``: argument and size parsing, busbw factors, rows from a tiny 2-rank run."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

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
    assert config.codecs == ("bf16", "int8", "int4", "auto")
    assert config.sizes == (1 << 20, 4 << 20, 16 << 20)
    assert config.world_size == 2 and config.link == "none"
    names = [c.codec for c in config.cases()]
    assert names[:2] == list(BASELINES)  # plain fp32 and bf16 always come first
    assert names[:6] == ["plain-fp32", "plain-bf16", "bf16", "int8", "int4", "auto"]


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


def test_the_cases_of_one_op_and_size_take_turns():
    from commpress.bench.collectives import _turns

    assert _turns([2, 2, 2]) == [0, 1, 2, 1, 2, 0]
    assert _turns([3, 1]) == [0, 1, 0, 0]  # the case with one call is done after round 0
    assert _turns([]) == []


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


# ====================================================================== auto
def _row(op, codec, us, **extra):
    return {"op": op, "size": 1 << 16, "link": "none", "codec": codec, "status": "ok",
            "time_us": us, "time_p10_us": us, "time_p90_us": us, **extra}  # fmt: skip


def test_auto_eligible_is_a_candidate_within_the_default_budget():
    from commpress.bench.collectives import auto_eligible

    assert auto_eligible("int8") and auto_eligible("bf16") and auto_eligible("fp16")
    assert not auto_eligible("int4") and not auto_eligible("fp8")  # outside 1e-2
    assert not auto_eligible("powersgd") and not auto_eligible("int8:block=128")
    assert not auto_eligible("plain-bf16") and not auto_eligible("auto")


def test_x_best_is_auto_over_the_best_option_auto_could_have_picked():
    rows = [
        _row("all_reduce", "plain-fp32", 10.0),
        _row("all_reduce", "plain-bf16", 1.0),  # another dtype: not an option of auto
        _row("all_reduce", "int8", 5.0),
        _row("all_reduce", "int4", 2.0),  # outside auto's budget
        _row("all_reduce", "auto", 6.0, pick="int8/gather"),
        _row("broadcast", "plain-fp32", 4.0),
        _row("broadcast", "int8", 8.0),
        _row("broadcast", "auto", 4.2, pick="plain"),
    ]
    by = {(r["op"], r["codec"]): r for r in add_speedups(rows)}
    assert by[("all_reduce", "auto")]["x_best"] == pytest.approx(1.2)
    assert by[("all_reduce", "auto")]["best"] == "int8"
    assert by[("broadcast", "auto")]["x_best"] == pytest.approx(1.05)
    assert by[("broadcast", "auto")]["best"] == "plain-fp32"
    assert "x_best" not in by[("all_reduce", "int8")]
    table = cli.format_rows(rows)
    assert "auto chose" in table and "int8/gather" in table and "x best" in table
    assert "auto chose" not in cli.format_rows([r for r in rows if r["codec"] != "auto"])


def test_auto_in_codecs_and_budget_parse():
    config = cli.build_config(parse(["--codecs", "auto,int8", "--budget", "2"]))
    assert config.codecs == ("auto", "int8") and config.budget_s == 2.0
    assert [c.codec for c in config.cases()][:4] == ["plain-fp32", "plain-bf16", "auto", "int8"]
    with pytest.raises(ValueError, match="budget_s"):
        SweepConfig(budget_s=0.0)


def test_tiny_sweep_with_auto_says_what_it_picked():
    from commpress.bench.collectives import auto_eligible

    config = SweepConfig(
        ops=("all_reduce", "all_to_all"),
        codecs=("int8", "auto"),
        sizes=(64 << 10,),
        warmup=0,
        iters=3,
        budget_s=1e-9,  # one timed call per case
    )
    rows = add_speedups(list(sweep(config)))
    assert all(r["status"] == "ok" and r["iters"] == 1 for r in rows), rows
    by = {(r["op"], r["codec"]): r for r in rows}
    for op in config.ops:
        a = by[(op, "auto")]
        options = [
            by[(op, c)] for c in ("plain-fp32", "int8") if c == "plain-fp32" or auto_eligible(c)
        ]
        best = min(options, key=lambda r: r["time_us"])
        assert a["best"] == best["codec"] and a["x_best"] == pytest.approx(
            a["time_us"] / best["time_us"]
        )
        assert a["pick"] == "plain" or a["pick"].split("/")[0] in ("bf16", "fp16", "int8"), a
        assert a["compressed"] == (a["pick"] != "plain")
    # An even all_to_all_single is modelled like the other ops; at 64 KiB it stays plain.
    assert by[("all_to_all", "auto")]["pick"] == "plain"
    assert by[("all_to_all", "auto")]["modelled_us"] > 0
    assert by[("all_reduce", "auto")]["modelled_us"] > 0


def test_markdown_and_pivot():
    from commpress.bench import report

    wide = report.pivot(
        [_row("all_reduce", "int8", 5.0), _row("all_reduce", "auto", 6.0), _row("x", "auto", 1.0)],
        ["op", "size"],
        "codec",
        "time_us",
    )
    assert wide == [
        {"op": "all_reduce", "size": 1 << 16, "int8": 5.0, "auto": 6.0},
        {"op": "x", "size": 1 << 16, "auto": 1.0},
    ]
    text = report.format_markdown(wide, ["op", "int8", "auto"], formats={"auto": "{:.1f}"})
    assert text.splitlines() == [
        "| op | int8 | auto |",
        "|---|---:|---:|",
        "| all_reduce | 5 | 6.0 |",
        "| x | - | 1.0 |",
    ]
    assert report.format_markdown([{"a": "x|y"}]).splitlines()[-1] == "| x\\|y |"


def _grid_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "auto_grid.py"
    spec = importlib.util.spec_from_file_location("auto_grid", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_rows_one_per_link_size_op():
    grid = _grid_module()
    rows = [
        _row("all_reduce", "plain-fp32", 2000.0),
        _row("all_reduce", "plain-bf16", 1000.0, time_p10_us=900.0, time_p90_us=1100.0),
        _row("all_reduce", "int8", 1500.0),
        _row("all_reduce", "auto", 1560.0, pick="int8/gather", best="int8", x_best=1.04),
        _row("broadcast", "plain-fp32", 100.0),
        {**_row("broadcast", "int8", 1.0), "status": "error: no"},
        _row("broadcast", "auto", 100.0, pick="plain", best="plain-fp32", x_best=1.0),
    ]
    wide = grid.grid_rows(rows, ["int8"])
    assert [(w["op"], w["int8"], w["pick"], w["x_best"]) for w in wide] == [
        ("all_reduce", 1.5, "int8/gather", 1.04),
        ("broadcast", None, "plain", 1.0),
    ]
    assert wide[0]["spread"] == pytest.approx(20.0)
    lines = grid.markdown(wide, ["int8"]).splitlines()
    assert lines[0].startswith("| link | size | op | plain-fp32 ms | plain-bf16 ms | int8 ms |")
    assert (
        lines[2]
        == "| none | 64K | all_reduce | 2 | 1 | 1.5 | 1.56 | int8/gather | int8 | 1.04 | 20% |"
    )
    assert lines[3].split(" | ")[5] == "-"


def test_grid_script_runs_one_loopback_cell(tmp_path):
    grid = _grid_module()
    out = tmp_path / "grid.md"
    argv = ["--links", "none", "--sizes", "64K", "--ops", "broadcast", "--codecs", "int8"]
    assert grid.main([*argv, "--iters", "1", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and lines[2].startswith("| none | 64K | broadcast | ")
    assert "-" not in lines[2].split(" | ")[3:8]  # every option measured


def test_auto_pick_is_the_cases_choice_else_an_earlier_one_of_its_op_and_bucket():
    from commpress import auto
    from commpress.auto import Choice
    from commpress.bench.collectives import _auto_pick

    def choice(op, bucket, codec, seconds):
        algorithm = "two_phase" if codec else None
        return Choice("0", op, torch.float32, bucket, 2, codec, algorithm, seconds, 1.0, ())

    earlier, new = (
        choice("broadcast", 1 << 16, None, 2e-4),
        choice("all_reduce", 1 << 20, "int8", 1e-3),
    )
    auto.reset()
    try:
        auto._choices.update({1: earlier, 2: new})
        assert _auto_pick("broadcast", 1 << 16, {id(earlier)}) == ("int8/two_phase", 1e-3)
        known = {id(earlier), id(new)}  # both made by earlier cases
        assert _auto_pick("broadcast", 40 << 10, known) == ("plain", 2e-4)  # 64 KiB bucket
        assert _auto_pick("broadcast", 1 << 20, known) == ("plain", None)  # no model asked
        assert _auto_pick("all_to_all_single", 1 << 16, known) == ("plain", None)
    finally:
        auto.reset()


def _fake_sweep(monkeypatch):
    """Replace the measurements by one row per link, recording which links ran."""
    ran = []

    def fake(config, progress=True):
        ran.append(config.link)
        return [
            {"op": "all_reduce", "size": 1 << 20, "codec": "plain-fp32", "link": config.link,
             "world_size": 2, "time_us": 10.0, "status": "ok"},
        ]  # fmt: skip

    monkeypatch.setattr(cli, "measure", fake)
    monkeypatch.setattr(cli, "_measure_in_namespace", lambda netem, config, progress: fake(config))
    return ran


def test_the_default_run_shows_loopback_and_an_emulated_1gbit_link(monkeypatch, capsys):
    from commpress.bench import netem

    ran = _fake_sweep(monkeypatch)
    monkeypatch.setattr(netem, "link_available", lambda: (True, ""))
    assert cli.run(parse([])) == 0
    assert ran == ["none", "1gbit"]
    out = capsys.readouterr().out
    assert "link none" in out and "link 1gbit" in out
    assert "auto" in cli.DEFAULT_CODECS.split(",")


def test_the_default_run_without_emulation_says_why_and_shows_loopback(monkeypatch, capsys):
    from commpress.bench import netem

    ran = _fake_sweep(monkeypatch)
    monkeypatch.setattr(netem, "link_available", lambda: (False, "unshare: not permitted"))
    assert cli.run(parse([])) == 0
    assert ran == ["none"]
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "loopback only" in err and "unshare: not permitted" in err


def test_a_comma_list_of_links_runs_each_in_order(monkeypatch, tmp_path):
    from commpress.bench import netem, report

    ran = _fake_sweep(monkeypatch)
    monkeypatch.setattr(netem, "link_available", lambda: (True, ""))
    out = tmp_path / "rows.json"
    assert cli.run(parse(["--link", "100mbit,none", "--json", str(out)])) == 0
    assert ran == ["100mbit", "none"]
    rows, meta = report.read_json(out)
    assert [r["link"] for r in rows] == ["100mbit", "none"]
    assert meta["links"] == ["100mbit", "none"]
