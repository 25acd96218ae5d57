"""The fixed cost of small calls, against plain torch.distributed in one run.

    python benchmarks/small_calls.py                       # 2 ranks, 64 KiB..1 MiB, 4 ops
    python benchmarks/small_calls.py --sizes 64K --ops all_reduce broadcast --repeats 5
    python benchmarks/small_calls.py --sizes 64K --base c1bee13   # before/after, one run
    python benchmarks/small_calls.py --profile all_reduce  # cProfile of rank 0, 64 KiB int8

Each rank runs one thread (``torch.set_num_threads(1)``) on a gloo world over
loopback. For every op and size the variants are timed in one process,
interleaved call by call (each call on a fresh ``clone()`` of the input, so
in-place ops cost the same everywhere): plain ``torch.distributed`` on the float32
tensor (``fp32``), plain on the tensor cast to bfloat16 beforehand
(``bf16``), `commpress.distributed` with ``codec="none"`` and with
``codec="auto"`` (calibrated during the warm-up; at these sizes on loopback
it keeps the call plain), ``codec="int8"`` under the default policy
(descriptors verified), and ``codec="int8"`` with ``verify=False``. Each
variant runs under its own `Policy` object (``min_bytes=0``), the same one at
every call, as a training loop runs under one policy. A repeat is one pass over everything;
the table shows the median over repeats of rank 0's per-repeat median, the
spread of those medians, and each variant's time as a multiple of plain fp32
and plain bf16 (issue 10's targets at 64 KiB: auto within 5% of fp32, int8
all_reduce at most 1.5x fp32 and broadcast at most 2x).

``--base REV`` also runs every repeat on revision ``REV`` of ``src/`` (exported
with ``git archive``, first on ``PYTHONPATH`` of its processes), alternating
which tree goes first, and adds its times and ``base/head`` columns.

Times on a shared machine are noisy: compare rows of one run, not runs.
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
import time
from pathlib import Path
from typing import Any

from commpress.bench.report import format_table
from commpress.testing import DistPool
from commpress.units import format_size, parse_size

OPS = ("all_reduce", "broadcast", "all_gather", "reduce_scatter")
VARIANTS = ("fp32", "bf16", "none", "auto", "int8", "int8 verify=False")
CODECS = {"none": "none", "auto": "auto", "int8": "int8", "int8 verify=False": "int8"}
ROOT = Path(__file__).resolve().parent.parent
SIZES = ("64K", "256K", "1M")


def _call(op: str, variant: str, x: Any, outs: dict[Any, Any]) -> Any:
    """A function of no arguments making one call of ``op`` the way ``variant`` does."""
    import torch
    import torch.distributed as dist

    import commpress.distributed as cdist

    plain = variant in ("fp32", "bf16")
    src = x if variant != "bf16" else x.to(torch.bfloat16)
    out = outs[op, src.dtype]
    mod: Any = dist if plain else cdist
    kw = {} if plain else {"codec": CODECS[variant]}
    if op == "all_reduce":
        return lambda: mod.all_reduce(src.clone(), **kw)
    if op == "broadcast":
        return lambda: mod.broadcast(src.clone(), 0, **kw)
    if op == "all_gather":
        return lambda: mod.all_gather_into_tensor(out, src.clone(), **kw)
    return lambda: mod.reduce_scatter_tensor(out, src.clone(), **kw)


def _medians_ms(fns: dict[str, Any], iters: int, warmup: int) -> dict[str, float]:
    """Median ms per call of each variant, the variants interleaved call by call (so a
    change of the machine's load hits them all), each under its own policy object."""
    import torch.distributed as dist

    from commpress.policy import Policy, using

    policies = {v: Policy(min_bytes=0, verify=v != "int8 verify=False") for v in fns}
    for v, fn in fns.items():
        with using(policies[v]):
            for _ in range(warmup):
                fn()
    dist.barrier()
    times: dict[str, list[float]] = {v: [] for v in fns}
    for _ in range(iters):
        for v, fn in fns.items():
            with using(policies[v]):  # plain torch variants too: the same cost around each
                t0 = time.perf_counter()
                fn()
                times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) * 1e3 for v, t in times.items()}


def _rank(
    rank: int, world: int, ops: list[str], sizes: list[int], iters: int, warmup: int
) -> dict[str, Any]:
    """One repeat on one rank: ``{"op|size|variant": median ms}`` and auto's picks."""
    import torch

    torch.set_num_threads(1)
    got: dict[str, Any] = {}
    for nbytes in sizes:
        n = nbytes // 4
        x = torch.randn(n, generator=torch.Generator().manual_seed(rank))
        outs = {}
        for dtype in (torch.float32, torch.bfloat16):
            outs["all_reduce", dtype] = outs["broadcast", dtype] = None
            outs["all_gather", dtype] = torch.empty(world * n, dtype=dtype)
            outs["reduce_scatter", dtype] = torch.empty(n // world, dtype=dtype)
        for op in ops:
            fns = {v: _call(op, v, x, outs) for v in VARIANTS}
            for v, ms in _medians_ms(fns, iters, warmup).items():
                got[f"{op}|{nbytes}|{v}"] = ms
            got[f"{op}|{nbytes}|pick"] = _auto_pick(op, nbytes)
    return got


def _auto_pick(op: str, nbytes: int) -> str:
    """What ``codec="auto"`` chose for ``op``'s family at ``nbytes`` (its newest decision)."""
    from commpress import auto
    from commpress.policy import OP_FAMILIES

    family = OP_FAMILIES.get(op, op)
    for c in reversed(auto.decisions()):
        if c.bucket == auto.bucket(nbytes) and OP_FAMILIES.get(c.op, c.op) == family:
            return "plain" if c.codec is None else f"{c.codec}/{c.algorithm}"
    return "?"


def small_call_runs(
    ops: list[str], sizes: list[int], world: int, repeats: int, iters: int, warmup: int
) -> list[dict[str, Any]]:
    """Rank 0's ``{"op|size|variant": median ms}`` of each repeat."""
    with DistPool(world, job_timeout=1800) as pool:
        return [pool.run(_rank, ops, sizes, iters, warmup, timeout=1800)[0] for _ in range(repeats)]


def small_call_rows(
    runs: list[dict[str, Any]], ops: list[str], sizes: list[int], base: list[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """One row per (op, size, variant): median ms over repeats, spread, x fp32, x bf16;
    with ``base`` (the runs of another revision) its median ms and ``base/head``."""
    rows = []
    for op in ops:
        for nbytes in sizes:
            per = {v: [r[f"{op}|{nbytes}|{v}"] for r in runs] for v in VARIANTS}
            med = {v: statistics.median(t) for v, t in per.items()}
            for v in VARIANTS:
                row = {
                    "op": op,
                    "size": nbytes,
                    "variant": v if v != "auto" else f"auto ({runs[-1][f'{op}|{nbytes}|pick']})",
                    "ms": med[v],
                    "spread_ms": f"{min(per[v]):.3f}..{max(per[v]):.3f}",
                    "x_fp32": med[v] / med["fp32"],
                    "x_bf16": med[v] / med["bf16"],
                }
                if base:
                    was = [r.get(f"{op}|{nbytes}|{v}") for r in base]
                    was = [t for t in was if t is not None]
                    if was:
                        row["base_ms"] = statistics.median(was)
                        row["base_x_fp32"] = row["base_ms"] / statistics.median(
                            [r[f"{op}|{nbytes}|fp32"] for r in base]
                        )
                        row["base/head"] = row["base_ms"] / med[v]
                rows.append(row)
    return rows


def _export(rev: str, into: Path) -> Path:
    """``src/`` of revision ``rev``, unpacked under ``into``."""
    archive = into / "tree.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def _one_repeat(src: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One repeat in a fresh process importing commpress from ``src``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), str(ROOT / "benchmarks")]))
    cmd = [sys.executable, __file__, "--raw-json", str(out), "--repeats", "1"]
    cmd += ["--world", str(args.world), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    cmd += ["--ops", *args.ops, "--sizes", *args.sizes]
    subprocess.run(cmd, env=env, check=True, timeout=3600)
    return json.loads(out.read_text())[0]


def paired_runs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``args.repeats`` repeats on this checkout and on ``args.base``, alternating which
    goes first (so drift of the machine's load hits both)."""
    head, base = [], []
    with tempfile.TemporaryDirectory() as tmp:
        base_src = _export(args.base, Path(tmp))
        for i in range(args.repeats):
            order = [(ROOT / "src", head), (base_src, base)]
            for src, runs in order if i % 2 == 0 else order[::-1]:
                runs.append(_one_repeat(src, args, Path(tmp) / "run.json"))
    return head, base


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
    p.add_argument("--base", help="also time this git revision of src/, side by side")
    p.add_argument("--profile", choices=OPS, help="print a cProfile of rank 0 instead")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--raw-json", type=Path, help=argparse.SUPPRESS)  # --base's worker
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes]
    if args.profile:
        with DistPool(args.world, job_timeout=1800) as pool:
            print(pool.run(_profile_rank, args.profile, sizes[0], args.iters)[0])
        return 0
    load = os.getloadavg()
    if args.raw_json:
        runs = small_call_runs(args.ops, sizes, args.world, args.repeats, args.iters, args.warmup)
        args.raw_json.write_text(json.dumps(runs))
        return 0
    if args.base:
        runs, base = paired_runs(args)
    else:
        runs = small_call_runs(args.ops, sizes, args.world, args.repeats, args.iters, args.warmup)
        base = []
    rows = small_call_rows(runs, args.ops, sizes, base)
    cols = ["op", "size", "variant", "ms", "spread_ms", "x_fp32", "x_bf16"]
    if base:
        cols += ["base_ms", "base_x_fp32", "base/head"]
    after = os.getloadavg()
    print(
        format_table(
            rows,
            cols,
            formats={
                "size": lambda n: format_size(n, exact=True),
                "ms": "{:.3f}",
                "x_fp32": "{:.2f}",
                "x_bf16": "{:.2f}",
                "base_ms": "{:.3f}",
                "base_x_fp32": "{:.2f}",
                "base/head": "{:.2f}",
            },
            title=f"{args.world} gloo ranks on loopback, one thread each, "
            f"{args.repeats} repeats x {args.iters} calls"
            + (f", base {args.base}" if args.base else "")
            + f"; load average before {load[0]:.2f}, after {after[0]:.2f}",
        )
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
