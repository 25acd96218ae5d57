"""The headline measured on two revisions of commpress, side by side in one run.

    python benchmarks/compare_revisions.py --base 7916b1e            # base vs this checkout
    python benchmarks/compare_revisions.py --base v0.1 --repeats 3 --quick

For each repeat the two trees run the same command one after the other (the
order alternates between repeats, so drift of the machine's load hits both):
the README headline (64 MiB fp32 all_reduce at an emulated 1 Gbit/s, every
headline codec against plain fp32, from ``make_results.headline_repeat`` of
each tree) and small calls on unshaped loopback (64 KiB and 1 MiB, where
the fixed cost of a call shows). The base tree is exported with ``git
archive`` into a temporary directory and put first on ``PYTHONPATH`` of its
processes. Prints one table: seconds per call on each tree (median over
repeats) and ``base / head`` (above 1: this checkout is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from commpress.bench import netem

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def export(rev: str, into: Path) -> Path:
    """The ``src/`` and ``benchmarks/`` of ``rev``, unpacked under ``into``."""
    archive = into / "tree.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "archive", rev, "src", "benchmarks"], cwd=ROOT, stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def _call(tree: Path, rate: str, target: str, kwargs: dict[str, Any]) -> Any:
    """``target(**kwargs)`` in a fresh process that imports commpress from ``tree``."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), str(tree / "benchmarks")])
    try:
        return netem.run_function(rate, target, kwargs, timeout=3600)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def measure(tree: Path, quick: bool) -> list[dict[str, Any]]:
    """One repeat on ``tree``: the headline at 1 Gbit/s, then small calls unshaped."""
    size, shape = ((4 << 20), [1024, 1024]) if quick else ((64 << 20), [4096, 4096])
    rows = _call(
        tree,
        "1gbit",
        "make_results:headline_repeat",
        {"size": size, "iters": 2 if quick else 3, "shape": shape},
    )
    small = _call(
        tree,
        "none",
        "commpress.bench.collectives:sweep_rows",
        {
            "ops": ["all_reduce", "broadcast"],
            "world_size": 2,
            "warmup": 3,
            "iters": 10 if quick else 30,
            "codecs": ["int8", "bf16"],
            "sizes": [64 << 10, 1 << 20],
            "link": "none",
        },
    )
    for r in small:
        r["tensor"] = f"{r['size'] >> 10} KiB loopback"
    return rows + small


def _key(r: dict[str, Any]) -> tuple:
    return (r.get("op", "all_reduce"), r.get("tensor"), r.get("codec"))


def compare(base: list[list[dict]], head: list[list[dict]]) -> list[dict[str, Any]]:
    """Median milliseconds per call of each (op, tensor, codec) on both trees, and their ratio."""
    times: dict[tuple, dict[str, list[float]]] = {}
    for side, runs in (("base", base), ("head", head)):
        for rows in runs:
            for r in rows:
                if r.get("status", "ok") == "ok" and r.get("time_us"):
                    times.setdefault(_key(r), {"base": [], "head": []})[side].append(r["time_us"])
    out = []
    for (op, tensor, codec), t in times.items():
        if not t["base"] or not t["head"]:
            continue
        b, h = statistics.median(t["base"]), statistics.median(t["head"])
        out.append(
            {
                "op": op,
                "tensor": tensor,
                "codec": codec,
                "base_ms": round(b / 1e3, 2),
                "head_ms": round(h / 1e3, 2),
                "base_over_head": round(b / h, 3),
                "head_spread_ms": f"{min(t['head']) / 1e3:.1f}..{max(t['head']) / 1e3:.1f}",
            }
        )
    return out


COLUMNS = ("op", "tensor", "codec", "base_ms", "head_ms", "base_over_head", "head_spread_ms")


def table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a plain-text table, one row per op, tensor and codec."""
    cells = [[str(r.get(c, "-")) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git revision to compare with (e.g. 7916b1e)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small sizes (checks the pipeline)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="commpress-base-") as tmp:
        base_tree = export(args.base, Path(tmp))
        base_runs: list[list[dict]] = []
        head_runs: list[list[dict]] = []
        for repeat in range(args.repeats):
            order = [(base_tree, base_runs), (ROOT, head_runs)]
            for tree, runs in order if repeat % 2 == 0 else order[::-1]:
                print(f"repeat {repeat}: {'base' if tree is base_tree else 'head'}", flush=True)
                runs.append(measure(tree, args.quick))
    rows = compare(base_runs, head_runs)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"base": args.base, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
