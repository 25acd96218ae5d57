"""``commpress bench``: nccl-tests for compressed collectives.

Runs each op at each size with each codec on ``--world-size`` local gloo ranks,
next to plain fp32 and plain bf16 runs of the same op and size, and prints one
row per case (see `commpress.bench.collectives` for every column's meaning).

Example::

    commpress bench              # all_reduce 1M..16M, bf16/int8/int4/auto, 2 ranks, + 1 Gbit/s
    commpress bench --ops all_reduce,all_gather -b 8K -e 256M -f 4 --codecs int8,fp8
    commpress bench --link 1gbit --json out.json --plot busbw.png
    commpress bench --ops all -b 64K -e 64M -f 16 --codecs auto,bf16,fp16,int8

``auto`` in ``--codecs`` runs each call with ``codec="auto"``: its row says what
auto picked and its time over the best of plain fp32 and every codec auto could
have picked in the same run (``x best``). ``benchmarks/auto_grid.py`` runs the
issue's whole grid (links x sizes x ops) into one markdown table.

``--link RATE`` runs the ranks in a private network namespace whose loopback
is shaped to RATE (`commpress.bench.netem`); it needs root, ``unshare`` and
``tc`` and never touches another interface. ``--link none,1gbit`` runs the
sweep once per link, one table each. With no ``--link`` the run shows
unshaped loopback and, where link emulation is available, an emulated
1 Gbit/s link beside it (:data:`DEFAULT_LINKS`): on loopback compression
rarely pays, on a 1 Gbit/s link it usually does, and a newcomer should see
both; where emulation is unavailable the run says why in one line and shows
loopback alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from typing import Any

from ..errors import CommpressError
from ..units import format_size, parse_size
from .collectives import OPS, SweepConfig, add_speedups, size_range

__all__ = ["add_parser", "build_config", "run", "main"]

DEFAULT_OPS = "all_reduce"
DEFAULT_CODECS = "bf16,int8,int4,auto"
#: The links of a run without ``--link``: loopback, and 1 Gbit/s where it can be emulated.
DEFAULT_LINKS = ("none", "1gbit")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``commpress`` command's subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="time compressed collectives against plain fp32/bf16 (like nccl-tests)",
        description=(__doc__ or "").split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configure_parser(p)
    return p


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add ``commpress bench``'s options to ``p``."""
    p.add_argument("--ops", default=DEFAULT_OPS, help=f"comma list of {', '.join(OPS)}; or 'all'")
    p.add_argument(
        "--codecs",
        default=DEFAULT_CODECS,
        help="comma list of codec specs (e.g. 'int8,int4,int8:block=128+zstd'); "
        "plain fp32 and bf16 baselines are always added",
    )
    p.add_argument("-b", "--minbytes", default="1M", help="smallest size (bytes; K/M/G suffix)")
    p.add_argument("-e", "--maxbytes", default="16M", help="largest size (bytes; K/M/G suffix)")
    p.add_argument("-f", "--stepfactor", type=int, default=4, help="size multiplier per step")
    p.add_argument(
        "--shape",
        default=None,
        help="one 2-D shape ROWSxCOLS instead of -b/-e (matrix codecs such as powersgd)",
    )
    p.add_argument("--world-size", type=int, default=2, help="local gloo ranks to spawn")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per case")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per case")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="at most this many seconds of timed calls per case (at least one call; "
        "--iters stays the most)",
    )
    p.add_argument(
        "--link",
        default=None,
        help="comma list of links to emulate on loopback (e.g. 1gbit, 10gbit, 'none,1gbit'); "
        "'none' = as is; default: none, plus 1gbit where link emulation is available",
    )
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    p.add_argument("--plot", metavar="PNG", help="plot busbw vs size per codec")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> SweepConfig:
    """A `SweepConfig` from parsed arguments.

    Raises:
        ValueError: a bad op, size, shape or count (the message says which).
    """
    ops = OPS if args.ops.strip() == "all" else tuple(_csv(args.ops))
    shape = None
    if args.shape:
        try:
            shape = tuple(int(s) for s in args.shape.lower().split("x"))
        except ValueError:
            raise ValueError(f"--shape {args.shape!r} is not ROWSxCOLS, e.g. 4096x4096") from None
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"--shape {args.shape!r} must be two positive numbers, e.g. 4096x4096")
    sizes = size_range(
        parse_size(args.minbytes, minimum=1), parse_size(args.maxbytes, minimum=1), args.stepfactor
    )
    return SweepConfig(
        ops=ops,
        codecs=tuple(_csv(args.codecs)),
        sizes=tuple(sizes),
        world_size=args.world_size,
        warmup=args.warmup,
        iters=args.iters,
        link=(args.link or "none").split(",")[0].strip().lower(),
        shape=shape,
        budget_s=args.budget,
    )


class _Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()

    def __call__(self, done: int, total: int, case: Any) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        size = format_size(case.size, exact=True)
        label = f"{case.op} {size} {case.codec}" if done < total else "done"
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<40}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def measure(config: SweepConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Run the sweep here (no link emulation) and return rows with speedups."""
    from .collectives import sweep

    return add_speedups(list(sweep(config, progress=_Progress(progress))))


def run(args: argparse.Namespace) -> int:
    """Entry point of ``commpress bench``; returns the exit code.

    0: rows were measured (some may say ``error: ...``); 1: every case failed;
    2: bad arguments; 3: ``--link`` asked for but link emulation is unavailable.
    """
    from . import netem

    try:
        config = build_config(args)
        links = _links(args.link, netem)
    except ValueError as exc:
        print(f"commpress bench: {exc}", file=sys.stderr)
        return 2
    if links is None:
        return 3
    progress = not args.quiet
    rows: list[dict[str, Any]] = []
    for link in links:
        if link == "none":
            part = measure(replace(config, link="none"), progress)
        else:
            part = _measure_in_namespace(netem, replace(config, link=link), progress)
        _write_table(part, args, link)
        rows.extend(part)
    _write_files(rows, args)
    failed = [r for r in rows if r.get("status") != "ok"]
    return 1 if failed and len(failed) == len(rows) else 0


def _links(arg: str | None, netem: Any) -> list[str] | None:
    """The links to run: ``"none"`` or canonical rates; None if one cannot be emulated.

    Without ``--link``: `DEFAULT_LINKS`, less the emulated ones when emulation is
    unavailable (said in one line on stderr). An explicit rate that cannot be
    emulated is an error (one line on stderr; the caller exits with 3).

    Raises:
        ValueError: a rate that does not parse.
    """
    names = DEFAULT_LINKS if arg is None else tuple(p.strip().lower() for p in arg.split(","))
    links: list[str] = []
    for name in names:
        bits = netem.parse_rate(name)
        links.append("none" if bits is None else netem.format_rate(bits))
    if all(link == "none" for link in links):
        return links
    ok, why = netem.link_available()
    if ok:
        return links
    if arg is None:
        print(
            f"commpress bench: loopback only: cannot emulate a 1gbit link beside it ({why})",
            file=sys.stderr,
        )
        return ["none"]
    wanted = next(link for link in links if link != "none")
    print(
        f"commpress bench: cannot emulate a {wanted} link: {why}; {netem.HOW_TO_SKIP}",
        file=sys.stderr,
    )
    return None


def _measure_in_namespace(netem: Any, config: SweepConfig, progress: bool) -> list[dict[str, Any]]:
    """`measure` in a child process whose ranks talk over a loopback shaped to ``config.link``.

    The child's stderr (the progress bar) passes through; its rows come back as JSON.
    """
    with tempfile.TemporaryDirectory(prefix="commpress-bench-") as tmp:
        out = os.path.join(tmp, "rows.json")
        inner = [
            sys.executable, "-m", "commpress.bench.cli", "--inner",
            json.dumps(dataclasses.asdict(config)), out, "1" if progress else "0",
        ]  # fmt: skip
        proc = subprocess.run(netem.wrap_command(inner, config.link))
        if proc.returncode != 0 or not os.path.exists(out):
            raise CommpressError(
                f"the benchmark under an emulated {config.link} link failed "
                f"(exit code {proc.returncode}); its output is above"
            )
        with open(out) as f:
            return json.load(f)


def _inner_main(config_json: str, out: str, progress: str) -> int:
    """The child of `_measure_in_namespace`: measure and write rows to ``out``."""
    rows = measure(SweepConfig.from_dict(json.loads(config_json)), progress == "1")
    with open(out, "w") as f:
        json.dump(rows, f)
    return 0


#: Terminal columns and their headers (every column goes to --json/--csv).
TABLE_COLUMNS: dict[str, str] = {
    "op": "op",
    "size": "size",
    "codec": "codec",
    "time_us": "time(us)",
    "spread": "p10..p90(us)",
    "algbw_GBps": "algbw(GB/s)",
    "busbw_GBps": "busbw(GB/s)",
    "wire_bytes": "wire(B)",
    "ratio": "ratio",
    "encode_share": "enc%",
    "decode_share": "dec%",
    "rel_err": "rel_err",
    "compressed": "enc?",
    "speedup_fp32": "x fp32",
    "speedup_bf16": "x bf16",
    "pick": "auto chose",
    "x_best": "x best",
    "status": "status",
}
#: Shown only when a row has them (``auto`` in ``--codecs``).
_AUTO_COLUMNS = ("pick", "x_best")


def format_rows(rows: list[dict[str, Any]], title: str | None = None) -> str:
    """The terminal table of ``rows`` (through `commpress.bench.report`)."""
    from . import report

    shown = []
    for r in rows:
        row = dict(r)
        if r.get("time_p10_us") is not None:
            row["spread"] = f"{r['time_p10_us']:.0f}..{r['time_p90_us']:.0f}"
        shown.append(row)
    has_auto = any(r.get("pick") is not None for r in rows)
    cols = [c for c in TABLE_COLUMNS if c != "status" and (has_auto or c not in _AUTO_COLUMNS)]
    if any(r.get("status") != "ok" for r in rows):
        cols.append("status")
    percent = lambda v: f"{100 * v:.1f}"  # noqa: E731
    formats = {
        "size": lambda n: format_size(n, exact=True),
        "time_us": "{:.0f}",
        "algbw_GBps": "{:.3f}",
        "busbw_GBps": "{:.3f}",
        "ratio": "{:.2f}",
        "encode_share": percent,
        "decode_share": percent,
        "rel_err": "{:.2e}",
        "speedup_fp32": "{:.2f}",
        "speedup_bf16": "{:.2f}",
        "x_best": "{:.2f}",
    }
    return report.format_table(shown, cols, formats=formats, headers=TABLE_COLUMNS, title=title)


def _write_table(rows: list[dict[str, Any]], args: argparse.Namespace, link: str) -> None:
    """Print one link's table (and the loopback note under an unshaped one)."""
    first = rows[0] if rows else {}
    title = (
        f"commpress bench: {first.get('world_size', args.world_size)} gloo ranks, "
        f"link {link}, {args.iters} iters (median), sizes in bytes of fp32"
    )
    print(format_rows(rows, title))
    if link == "none":
        print(
            "note: unshaped loopback moves bytes at memory speed, where compression rarely "
            "pays; an emulated slow link (--link 1gbit, root) shows where it does."
        )


def _write_files(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """--json / --csv / --plot of every link's rows."""
    from . import report

    links = list(dict.fromkeys(str(r.get("link", "none")) for r in rows))
    meta = {"argv": sys.argv[1:], "world_size": args.world_size, "links": links}
    if args.json:
        report.write_json(args.json, rows, meta)
    if args.csv:
        report.write_csv(args.csv, rows)
    if args.plot:
        series = ["codec"]
        if len({r["op"] for r in rows}) > 1:
            series.insert(0, "op")
        if len(links) > 1:
            series.insert(0, "link")
        report.plot(
            [r for r in rows if r.get("status") == "ok"],
            x="size",
            y="busbw_GBps",
            path=args.plot,
            series=series if len(series) > 1 else "codec",
            title=f"busbw vs size ({', '.join(links)})",
            xlabel="size (bytes of fp32)",
            ylabel="busbw (GB/s, uncompressed bytes)",
            logx=True,
            logy=True,
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m commpress.bench.cli``: the same as ``commpress bench``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--inner"]:
        return _inner_main(*argv[1:])
    parser = argparse.ArgumentParser(prog="commpress bench", description=__doc__)
    configure_parser(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
