# ruff: noqa: B023  (call() runs inside the iteration that defines it)
"""Reduce-scatter and all-gather across emulated hosts: plain, flat int8, hierarchical int8/int4.

One multi-host run (root, iproute2), 64 MiB float32 per call (the reduce-scatter's
input, the all-gather's output), 1 Gbit/s each way between hosts::

    sudo .venv/bin/python benchmarks/multihost_moves.py 2 2
    sudo .venv/bin/python benchmarks/multihost_moves.py 3 1

Prints one markdown row per op and config: the slowest rank's median of 3 calls,
bytes out of each host's NIC per call (barrier baseline subtracted), the 3 times.
``flat-int8`` is ``two_phase`` (reduce-scatter) / ``auto``'s transport (all-gather);
``auto`` is ``codec="auto"`` (its warm-up call calibrates), with what it chose.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
import torch.distributed as dist


def run(  # noqa: D103 - one rank's side of main, through run_function
    mib=64,
    iters=3,
    configs=("plain-fp32", "plain-bf16", "flat-int8", "hier-int8", "hier-int4", "auto"),
):
    import commpress.distributed as cdist
    from commpress.bench.collectives import timed_calls
    from commpress.bench.multihost import auto_choice, counted
    from commpress.policy import Policy, using

    rank, world = dist.get_rank(), dist.get_world_size()
    numel = int(mib * (1 << 20)) // 4 // world * world
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    res = {}
    for op in ("reduce_scatter", "all_gather"):
        for name in configs:
            kind, codec = name.split("-") if name != "auto" else ("auto", "auto")
            dtype = torch.bfloat16 if codec == "bf16" else torch.float32
            algo = {"flat": "two_phase", "auto": "auto"}.get(kind, "hierarchical")
            if op == "all_gather" and kind == "flat":
                algo = "auto"
            if op == "reduce_scatter":
                src = x.to(dtype)
                outp = torch.empty(numel // world, dtype=dtype)
            else:
                src = x[: numel // world].to(dtype)
                outp = torch.empty(numel, dtype=dtype)

            def call():
                if kind == "plain":
                    (
                        dist.reduce_scatter_tensor
                        if op == "reduce_scatter"
                        else dist.all_gather_into_tensor
                    )(outp, src)
                else:
                    with using(Policy(algorithm=algo)):
                        f = (
                            cdist.reduce_scatter_tensor
                            if op == "reduce_scatter"
                            else cdist.all_gather_into_tensor
                        )
                        f(outp, src, codec=codec)

            call()
            times, per_call = counted(lambda: timed_calls(lambda _: call(), torch.empty(0), iters))
            out_b = per_call["tx_bytes"]
            t = torch.tensor(times, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            chose = auto_choice(op, src.numel() * src.element_size()) if kind == "auto" else ""
            res[f"{op} {name}"] = {"times": t.tolist(), "out": out_b, "chose": chose}
    return {"rank": rank, "host": os.environ.get("GROUP_RANK"), "res": res}


def main() -> None:
    from commpress.bench import multihost

    hosts, local = int(sys.argv[1]), int(sys.argv[2])
    ok, why = multihost.available()
    if not ok:
        sys.exit(f"multihost_moves: skipped: {why}")
    here = os.path.dirname(os.path.abspath(__file__))
    r = multihost.run_function(
        hosts, local, "multihost_moves:run", {}, rate="1gbit", pythonpath=[here], timeout=240
    )
    ranks = r["ranks"]
    for key in ranks[0]["res"]:
        byh = {x["host"]: x["res"][key]["out"] for x in ranks}
        t = ranks[0]["res"][key]["times"]
        chose = ranks[0]["res"][key].get("chose")
        label = f"{key} ({chose})" if chose else key
        print(
            f"| {hosts} x {local} | {label} | {statistics.median(t) * 1e3:.0f} ms "
            f"| {statistics.mean(byh.values()) / (1 << 20):.2f} MiB "
            f"| {', '.join(f'{v * 1e3:.0f}' for v in t)} |"
        )


if __name__ == "__main__":
    main()
