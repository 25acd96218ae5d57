"""Convergence study: does a codec change what DDP training learns, and what does a step cost?

The study itself lives in `commpress.bench.convergence` (model, data, methods,
budget); this script runs it and prints one JSON row per method.

Run::

    python benchmarks/bench_convergence.py        # full study over an emulated 1 Gbit/s link
    python benchmarks/bench_convergence.py --steps 20 --methods fp32,int8 --link none
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from commpress.bench.convergence import METHODS, StudyConfig, link_usable, study


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=StudyConfig.steps)
    p.add_argument("--link", default="1gbit", help="emulated link rate, or 'none'")
    p.add_argument("--json", help="write rows to this JSON file")
    args = p.parse_args(argv)
    ok, why = link_usable(args.link)
    if not ok:
        print(
            f"bench_convergence: cannot emulate {args.link}: {why}; use --link none",
            file=sys.stderr,
        )
        return 3
    cfg = replace(StudyConfig(), steps=args.steps)
    rows = study(tuple(m for m in args.methods.split(",") if m), cfg, args.link)
    for r in rows:
        shown = {k: v for k, v in r.items() if k != "curve"}
        print(json.dumps(shown))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
