"""Benchmark tools: link-rate parsing and emulation (netem), and the row writer (report)."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import threading
import time

import pytest

from commpress.bench import netem, report

ROWS = [
    {"codec": "fp32", "time_ms": 512.25, "ratio": 1.0, "wire_bytes": 67108864},
    {"codec": "int8", "time_ms": 140.9, "ratio": 3.94, "note": "a, b"},
    {"codec": "bad", "time_ms": float("nan"), "ratio": None, "ok": False},
]

# ------------------------------------------------------------------- netem


@pytest.mark.parametrize(
    "text, bits",
    [
        ("1gbit", 10**9),
        ("10gbit", 10**10),
        ("100mbit", 10**8),
        ("2.5Gbit", 25 * 10**8),
        (" 800kbit ", 8 * 10**5),
        ("none", None),
        ("", None),
        (None, None),
        ("NONE", None),
    ],
)
def test_parse_rate(text, bits):
    assert netem.parse_rate(text) == bits
    if bits is not None:
        assert netem.parse_rate(netem.format_rate(bits)) == bits


@pytest.mark.parametrize("text", ["1gbps", "fast", "1", "gbit", "-1gbit", "0bit", "5tbit", "1 g"])
def test_parse_rate_rejects(text):
    with pytest.raises(ValueError, match="rate"):
        netem.parse_rate(text)
    if text == "1gbps":
        with pytest.raises(ValueError, match="bytes per second"):
            netem.parse_rate(text)


def test_format_rate_and_tbf():
    assert netem.format_rate(10**9) == "1gbit"
    assert netem.format_rate(1_500_000) == "1500kbit"
    assert netem.format_rate(None) == "none"
    args = dict(zip(*[iter(netem.tbf_args(10**9))] * 2, strict=True))
    assert args == {"rate": "1000000000bit", "burst": str(512 * 1024), "latency": "100ms"}
    # At 10gbit the bucket grows to 4 ms of traffic, or tbf would cap the rate.
    assert int(netem.tbf_args(10**10)[3]) == 5_000_000


def test_wrap_command():
    assert netem.wrap_command(["python", "x.py"], "none") == ["python", "x.py"]
    cmd = netem.wrap_command(["python", "x.py"], "1gbit")
    assert cmd[:3] == ["unshare", "-n", "--"]
    assert cmd[-5:] == ["1gbit", "--exec", "--", "python", "x.py"]
    assert "--inside" in cmd


def test_link_available_answers():
    ok, why = netem.link_available()
    assert isinstance(ok, bool) and isinstance(why, str)
    assert ok or why  # a "no" always says why


def test_refuses_to_shape_this_namespace(capsys):
    # --inside outside a fresh namespace: this one has a loopback that is already up.
    with pytest.raises(SystemExit, match="refusing"):
        netem.main(["--inside", "--rate", "1gbit", "--exec", "--", "true"])


def _socket_rate(nbytes: int) -> dict:
    """Send ``nbytes`` over TCP on 127.0.0.1 in this process; bytes/s and the qdisc."""
    import subprocess

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got = []

    def sink():
        conn, _ = server.accept()
        n = 0
        while chunk := conn.recv(1 << 20):
            n += len(chunk)
        got.append(n)
        conn.close()

    th = threading.Thread(target=sink)
    th.start()
    payload = b"\0" * nbytes
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.perf_counter()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        th.join()
        seconds = time.perf_counter() - t0
    qdisc = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True)
    return {
        "rate": got[0] / seconds,
        "interfaces": [n for _, n in socket.if_nameindex()],
        "qdisc": qdisc.stdout,
        "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
    }


def test_shaped_link_really_shapes():
    ok, why = netem.link_available()
    if not ok:
        pytest.skip(f"no link emulation here: {why}")
    out = netem.run_function(
        "100mbit", "test_bench_tools:_socket_rate", {"nbytes": 8 << 20},
        pythonpath=[os.path.dirname(__file__)], timeout=60,
    )  # fmt: skip
    assert out["interfaces"] == ["lo"] and out["gloo_ifname"] == "lo"
    assert "tbf" in out["qdisc"] and "100Mbit" in out["qdisc"]
    # 12.5 MB/s nominal; the first 512 KiB may pass at once (the bucket).
    assert 0.7 * 12.5e6 < out["rate"] < 1.15 * 12.5e6, out["rate"]


def test_run_function_reports_failure():
    with pytest.raises(RuntimeError, match="failed"):
        netem.run_function(None, "commpress.bench.netem:no_such_function", timeout=60)


# ------------------------------------------------------------------ report


def test_format_table_aligns():
    text = report.format_table(ROWS, title="all_reduce")
    lines = text.splitlines()
    assert lines[0] == "all_reduce"
    assert lines[1].split() == ["codec", "time_ms", "ratio", "wire_bytes", "note", "ok"]
    assert set(lines[2]) <= {"-", " "}
    widths = {len(line) for line in lines[1:3]}
    assert len(widths) == 1  # header and rule line up
    assert "512.2" in lines[3] and "67108864" in lines[3]
    assert lines[5].split()[:3] == ["bad", "nan", "-"]
    # numbers right-aligned: the time column ends at the same place on every row
    ends = {
        line.index(v) + len(v) for line, v in zip(lines[3:], ["512.2", "140.9", "nan"], strict=True)
    }
    assert len(ends) == 1


def test_format_table_columns_formats_headers():
    text = report.format_table(
        ROWS, ["codec", "time_ms"], formats={"time_ms": "{:.1f}"}, headers={"time_ms": "ms"}
    )
    lines = text.splitlines()
    assert lines[0].split() == ["codec", "ms"]
    assert lines[2].split() == ["fp32", "512.2"]  # "{:.1f}" rounds half to even
    assert report.format_table([], ["a"]).splitlines() == ["a", "-"]


def test_format_value():
    fv = report.format_value
    assert (fv(None), fv(True), fv(3), fv(0.5), fv(123456.7), fv(1.5e-7)) == (
        "-", "yes", "3", "0.5", "123457", "1.5e-07",
    )  # fmt: skip
    assert fv(float("inf")) == "inf" and fv(float("nan")) == "nan"


def test_json_round_trip(tmp_path):
    path = report.write(ROWS, tmp_path / "sub" / "rows.json", meta={"link": "1gbit", "n": (1, 2)})
    rows, meta = report.read_json(path)
    assert meta == {"link": "1gbit", "n": [1, 2]}
    assert rows[0] == ROWS[0] and rows[2]["time_ms"] is None  # NaN -> null (strict JSON)
    json.loads(open(path).read())  # strict
    assert report.read_json(_write(tmp_path / "list.json", json.dumps(ROWS[:1])))[0] == ROWS[:1]
    with pytest.raises(ValueError, match="rows"):
        report.read_json(_write(tmp_path / "bad.json", '{"x": 1}'))


def test_csv(tmp_path):
    path = report.write(ROWS, tmp_path / "rows.csv")
    parsed = list(csv.DictReader(io.StringIO(open(path).read())))
    assert [r["codec"] for r in parsed] == ["fp32", "int8", "bad"]
    assert parsed[1]["note"] == "a, b" and parsed[2]["ratio"] == "" and parsed[0]["ok"] == ""
    assert float(parsed[0]["time_ms"]) == 512.25  # full precision
    assert report.to_csv(ROWS, ["ratio"]).splitlines() == ["ratio", "1.0", "3.94", '""']


def test_txt_and_unknown_suffix(tmp_path):
    path = report.write(ROWS, tmp_path / "rows.txt")
    assert open(path).read().startswith("codec")
    with pytest.raises(ValueError, match="format"):
        report.write(ROWS, tmp_path / "rows.xlsx")


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {"size": s, "codec": c, "link": "1gbit", "time_ms": s * k}
        for s in (1, 2, 4) for c, k in (("fp32", 1.0), ("int8", 0.3))
    ]  # fmt: skip
    line = report.plot(rows, "size", "time_ms", tmp_path / "line.png", series=["codec", "link"],
                       logx=True, title="t")  # fmt: skip
    bar = report.write(rows, tmp_path / "bar.svg", x="codec", y="time_ms", kind="bar",
                       series="size")  # fmt: skip
    for p in (line, bar):
        assert os.path.getsize(p) > 1000
    assert open(line, "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="kind"):
        report.plot(rows, "size", "time_ms", tmp_path / "x.png", kind="pie")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path
