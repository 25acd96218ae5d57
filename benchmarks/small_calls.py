"""The fixed cost of small compressed calls, against plain torch.distributed in one run.

    python benchmarks/small_calls.py                       # 2 ranks, 64 KiB..1 MiB, 4 ops
    python benchmarks/small_calls.py --sizes 64K --ops all_reduce broadcast --repeats 5
    python benchmarks/small_calls.py --profile all_reduce  # cProfile of rank 0, 64 KiB int8

Each rank runs one thread (``torch.set_num_threads(1)``) on a gloo world over
loopback. For every op and size the variants are timed back to back in one
process (each call on a fresh ``clone()`` of the input, so in-place ops
cost the same everywhere): plain ``torch.distributed`` on the float32
tensor, plain on the tensor cast to bfloat16 beforehand, ``codec="int8"``
under the default policy (descriptors verified), and ``codec="int8"`` with
``verify=False``. A repeat is one pass over everything; the table shows the
median over repeats of rank 0's per-repeat median, the spread of those
medians, and each variant's time as a multiple of plain fp32 and plain bf16
(issue 10's targets: int8 all_reduce at most 1.5x fp32 and broadcast at most
2x at 64 KiB).

Times on a shared machine are noisy: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from commpress.bench.report import format_table
from commpress.testing import DistPool
from commpress.units import format_size, parse_size

OPS = ("all_reduce", "broadcast", "all_gather", "reduce_scatter")
VARIANTS = ("fp32", "bf16", "int8", "int8 verify=False")
SIZES = ("64K", "256K", "1M")


def _call(op: str, variant: str, x: Any, outs: dict[Any, Any]) -> Any:
    """A function of no arguments making one call of ``op`` the way ``variant`` does."""
    import torch
    import torch.distributed as dist

    import commpress.distributed as cdist
    from commpress.policy import using

    plain = variant in ("fp32", "bf16")
    src = x if variant != "bf16" else x.to(torch.bfloat16)
    out = outs[op, src.dtype]
    mod: Any = dist if plain else cdist
    kw = {} if plain else {"codec": "int8"}
    policy = {"min_bytes": 0, "verify": variant != "int8 verify=False"}
    if op == "all_reduce":
        one = lambda: mod.all_reduce(src.clone(), **kw)  # noqa: E731
    elif op == "broadcast":
        one = lambda: mod.broadcast(src.clone(), 0, **kw)  # noqa: E731
    elif op == "all_gather":
        one = lambda: mod.all_gather_into_tensor(out, src.clone(), **kw)  # noqa: E731
    else:
        one = lambda: mod.reduce_scatter_tensor(out, src.clone(), **kw)  # noqa: E731
    if plain:
        return one

    def compressed() -> None:
        with using(**policy):
            one()

    return compressed


def _median_ms(fn: Any, iters: int, warmup: int) -> float:
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    dist.barrier()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _rank(
    rank: int, world: int, ops: list[str], sizes: list[int], iters: int, warmup: int
) -> dict[str, float]:
    """One repeat on one rank: ``{"op|size|variant": median ms}``."""
    import torch

    torch.set_num_threads(1)
    got = {}
    for nbytes in sizes:
        n = nbytes // 4
        x = torch.randn(n, generator=torch.Generator().manual_seed(rank))
        outs = {}
        for dtype in (torch.float32, torch.bfloat16):
            outs["all_reduce", dtype] = outs["broadcast", dtype] = None
            outs["all_gather", dtype] = torch.empty(world * n, dtype=dtype)
            outs["reduce_scatter", dtype] = torch.empty(n // world, dtype=dtype)
        for op in ops:
            for variant in VARIANTS:
                fn = _call(op, variant, x, outs)
                got[f"{op}|{nbytes}|{variant}"] = _median_ms(fn, iters, warmup)
    return got


def small_call_rows(
    ops: list[str], sizes: list[int], world: int, repeats: int, iters: int, warmup: int
) -> list[dict[str, Any]]:
    """One row per (op, size, variant): median ms over repeats, spread, x fp32, x bf16."""
    runs: list[dict[str, float]] = []
    with DistPool(world, job_timeout=1800) as pool:
        for _ in range(repeats):
            runs.append(pool.run(_rank, ops, sizes, iters, warmup, timeout=1800)[0])
    rows = []
    for op in ops:
        for nbytes in sizes:
            per = {v: [r[f"{op}|{nbytes}|{v}"] for r in runs] for v in VARIANTS}
            med = {v: statistics.median(t) for v, t in per.items()}
            for v in VARIANTS:
                rows.append(
                    {
                        "op": op,
                        "size": nbytes,
                        "variant": v,
                        "ms": med[v],
                        "spread_ms": f"{min(per[v]):.3f}..{max(per[v]):.3f}",
                        "x_fp32": med[v] / med["fp32"],
                        "x_bf16": med[v] / med["bf16"],
                    }
                )
    return rows


def _profile_rank(rank: int, world: int, op: str, nbytes: int, iters: int) -> str:
    """cProfile of ``iters`` int8 calls of ``op`` on rank 0 (the top 30 by own time)."""
    import cProfile
    import io
    import pstats

    import torch

    torch.set_num_threads(1)
    x = torch.randn(nbytes // 4)
    outs = {
        ("all_gather", torch.float32): torch.empty(world * x.numel()),
        ("reduce_scatter", torch.float32): torch.empty(x.numel() // world),
        ("all_reduce", torch.float32): None,
        ("broadcast", torch.float32): None,
    }
    fn = _call(op, "int8", x, outs)
    for _ in range(20):
        fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        fn()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    return text.getvalue() if rank == 0 else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--sizes", nargs="+", default=list(SIZES), help="bytes of fp32 per rank")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, default=200, help="timed calls per variant and repeat")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--profile", choices=OPS, help="print a cProfile of rank 0 instead")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes]
    if args.profile:
        with DistPool(args.world, job_timeout=1800) as pool:
            print(pool.run(_profile_rank, args.profile, sizes[0], args.iters)[0])
        return 0
    rows = small_call_rows(args.ops, sizes, args.world, args.repeats, args.iters, args.warmup)
    print(
        format_table(
            rows,
            ["op", "size", "variant", "ms", "spread_ms", "x_fp32", "x_bf16"],
            formats={
                "size": lambda n: format_size(n, exact=True),
                "ms": "{:.3f}",
                "x_fp32": "{:.2f}",
                "x_bf16": "{:.2f}",
            },
            title=f"{args.world} gloo ranks on loopback, one thread each, "
            f"{args.repeats} repeats x {args.iters} calls",
        )
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
