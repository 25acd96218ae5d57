"""Issue 10's grid: ``codec="auto"`` against plain and every codec, per link, size and op.

    sudo python benchmarks/auto_grid.py --out benchmarks/results/auto_grid.md
    python benchmarks/auto_grid.py --links none --sizes 64K --ops all_reduce   # one cell

For each link of ``--links`` (``none``: loopback as is; a rate: the ranks in a
private network namespace whose loopback is shaped to it, `commpress.bench.netem`,
which needs root) one `commpress.bench.collectives` sweep runs every op of
``--ops`` at every size of ``--sizes`` with plain fp32, plain bf16, each codec of
``--codecs`` and ``auto``, on ``--world-size`` gloo ranks. The markdown table has
one row per link x size x op: the median milliseconds of each, what auto picked,
the best of plain fp32 and every codec auto could have picked (within its default
error budget) and auto's time over it (``auto/best``; the target is at most 1.05),
and ``spread``: the widest p10..p90 range of the row's cells, in percent of its
median.

Repeats: each case is timed ``--iters`` times (25) or as many as fit in
``--budget`` seconds (1.5) at its first call's pace, at least once. 25, not 5 (until
2026-12-03): at 64 KiB and 1 MiB a call is 0.3-5 ms and five of them left spreads
of 84-768% and cells where auto (plain) and plain, the same path, differed 1.5-2x;
slow cells get no more calls than before, the budget caps them: a 64 MiB
all-reduce at 100 Mbit/s (about 10 s a call on the shaped loopback, which all
ranks share) is timed once, so its row has no spread; a tbf-shaped transfer of
seconds varies little between calls. About 11 minutes for 2 ranks with 5 calls
(measured 2026-12-03), about 5.5 of them at 100 Mbit/s; the elapsed seconds of each
link are printed.

A link that cannot be emulated (not root, no ``tc``) is reported and skipped; the
exit code is then 3.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from commpress.bench import netem, report
from commpress.bench.collectives import AUTO, BASELINES, OPS, SweepConfig
from commpress.units import format_size, parse_size

LINKS = ("none", "10gbit", "1gbit", "100mbit")
SIZES = ("64K", "1M", "16M", "64M")
#: The codecs auto weighs under its default budget (fp16 3e-4, bf16 3e-3, int8 8e-3).
CODECS = ("bf16", "fp16", "int8")
INDEX = ("link", "size", "op")


def grid_rows(rows: list[dict[str, Any]], codecs: list[str]) -> list[dict[str, Any]]:
    """One row per link x size x op from sweep rows: milliseconds per option, auto's
    pick, the best option, ``x_best`` and the widest spread (percent of the median)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    wide = report.pivot([{**r, "ms": r["time_us"] / 1e3} for r in ok], list(INDEX), "codec", "ms")
    extra: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in ok:
        e = extra.setdefault(tuple(r[k] for k in INDEX), {"spread": 0.0})
        spread = 100 * (r["time_p90_us"] - r["time_p10_us"]) / r["time_us"]
        e["spread"] = max(e["spread"], spread)
        if r["codec"] == AUTO:
            e.update(pick=r.get("pick"), best=r.get("best"), x_best=r.get("x_best"))
    for w in wide:
        w.update(extra[tuple(w[k] for k in INDEX)])
        for name in (*BASELINES, *codecs, AUTO):
            w.setdefault(name, None)  # a failed case prints "-"
    return wide


def markdown(rows: list[dict[str, Any]], codecs: list[str]) -> str:
    """The grid as a markdown table (milliseconds)."""
    names = [*BASELINES, *codecs, AUTO]
    cols = [*INDEX, *names, "pick", "best", "x_best", "spread"]
    ms = "{:.3g}"
    formats: dict[str, Any] = {n: ms for n in names}
    formats.update(size=lambda n: format_size(n, exact=True), x_best="{:.2f}", spread="{:.0f}%")
    headers = {n: f"{n} ms" for n in names}
    headers.update(pick="auto chose", x_best="auto/best")
    return report.format_markdown(rows, cols, formats=formats, headers=headers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--links", default=",".join(LINKS), help="comma list: none or rates")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma list of sizes (K/M suffix)")
    p.add_argument("--ops", default=",".join(OPS), help="comma list of ops")
    p.add_argument("--codecs", default=",".join(CODECS), help="codecs beside plain and auto")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--iters", type=int, default=25, help="most timed calls per case")
    p.add_argument("--budget", type=float, default=1.5, help="seconds of timed calls per case")
    p.add_argument("--out", help="write the markdown table here (else print it)")
    p.add_argument("--json", help="write every sweep row here")
    args = p.parse_args(argv)
    split = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    codecs = [c for c in split(args.codecs) if c != AUTO]
    fields = {
        "ops": split(args.ops),
        "codecs": [*codecs, AUTO],
        "sizes": [parse_size(s, minimum=1) for s in split(args.sizes)],
        "world_size": args.world_size,
        "warmup": 0,  # the untimed first call of each case warms it up
        "iters": args.iters,
        "budget_s": args.budget,
    }
    SweepConfig.from_dict(fields)  # bad arguments fail here, before any link
    rows: list[dict[str, Any]] = []
    skipped = []
    for link in split(args.links):
        t0 = time.perf_counter()
        try:
            rows += netem.run_function(
                link, "commpress.bench.collectives:sweep_rows", {**fields, "link": link}
            )
        except RuntimeError as exc:
            print(f"auto_grid: link {link} skipped: {exc}", file=sys.stderr)
            skipped.append(link)
            continue
        print(f"auto_grid: link {link}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    table = markdown(grid_rows(rows, codecs), codecs)
    if args.json:
        report.write_json(args.json, rows, {"argv": sys.argv[1:], "skipped": skipped})
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    else:
        print(table)
    if rows and not any(r.get("status") == "ok" for r in rows):
        return 1
    return 3 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
