"""MoE dispatch + combine across emulated hosts: flat `commpress.moe` against `moe_internode`.

One multi-host run (root, iproute2), 1 Gbit/s each way between hosts, DeepSeek-like
routing at CPU size: per rank 4096 tokens x 2048 float32, top-8 of 32 experts from
a seeded random gate (distinct experts per token), identity experts::

    sudo .venv/bin/python benchmarks/bench_moe_multihost.py 2 2
    sudo .venv/bin/python benchmarks/bench_moe_multihost.py 3 1

Prints one markdown row per config (``flat`` / ``internode`` with dispatch/combine
codecs ``none/none`` or ``fp8/bf16``): the slowest rank's median of 3 calls (each
after a barrier), bytes out of each host's NIC per call (mean over hosts; barrier
baseline subtracted), the formula's bytes per host (`Crossings.nbytes` summed over
ranks, over hosts), rows that crossed hosts per host, and the relative error of the
combined output against ``flat none/none``. With one rank per host ``internode``
falls back to flat.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

CONFIGS = {
    "flat none/none": ("flat", "none", "none"),
    "flat fp8/bf16": ("flat", "fp8", "bf16"),
    "internode none/none": ("internode", "none", "none"),
    "internode fp8/bf16": ("internode", "fp8", "bf16"),
}


def run(tokens=4096, hidden=2048, topk=8, experts=32, iters=3, configs=tuple(CONFIGS)):
    """One rank's side (through `multihost.run_function`): times, NIC bytes, formula, error."""
    from commpress import moe, moe_internode
    from commpress.bench.collectives import timed_calls
    from commpress.bench.multihost import counted

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, hidden, generator=g)
    gate = torch.randn(tokens, experts, generator=g).softmax(1)
    weights, ids = gate.topk(topk, dim=1)
    crossings = moe_internode.crossings(ids, experts)
    res, ref = {}, None
    for name in configs:
        kind, cd, cc = CONFIGS[name]
        mod = moe if kind == "flat" else moe_internode

        def call(mod=mod, cd=cd, cc=cc):
            recv, handle = mod.dispatch(x, ids, experts, codec=cd)
            return mod.combine(recv, handle, weights=weights, codec=cc)

        out = call()  # warm-up: subgroups, connections, buffers
        ref = out if ref is None else ref
        err = float((out - ref).norm() / ref.norm())
        times, per_call = counted(lambda: timed_calls(lambda _: call(), torch.empty(0), iters))
        out_b = per_call["tx_bytes"]
        slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        formula = crossings.nbytes(hidden, dispatch_codec=cd, combine_codec=cc)[kind]
        rows = crossings.flat if kind == "flat" else crossings.internode
        res[name] = {
            "time": float(slowest),
            "times": times,
            "out": out_b,
            "formula": formula,
            "rows": rows,
            "err": err,
        }
    return {"rank": rank, "host": os.environ.get("GROUP_RANK"), "res": res}


def rows(result: dict, hosts: int, local: int) -> list[dict]:
    """One row per config from `run_function`'s result: per-host means over the job."""
    ranks = result["ranks"]
    out = []
    for name in ranks[0]["res"]:
        per_host = {r["host"]: r["res"][name]["out"] for r in ranks}  # one NIC per host
        out.append(
            {
                "shape": f"{hosts} x {local}",
                "config": name,
                "ms": ranks[0]["res"][name]["time"] * 1e3,
                "out_mib": statistics.mean(per_host.values()) / (1 << 20),
                "formula_mib": sum(r["res"][name]["formula"] for r in ranks) / hosts / (1 << 20),
                "rows": sum(r["res"][name]["rows"] for r in ranks) / hosts,
                "err": max(r["res"][name]["err"] for r in ranks),
            }
        )
    return out


def table(rows_: list[dict]) -> str:
    """Markdown table of `rows`."""
    head = (
        "| hosts x ranks | config (dispatch/combine) | time, slowest rank | out of each host "
        "| formula | rows crossing per host | rel. err vs flat none |\n"
        "|---|---|---|---|---|---|---|"
    )
    body = [
        f"| {r['shape']} | {r['config']} | {r['ms']:.0f} ms | {r['out_mib']:.1f} MiB "
        f"| {r['formula_mib']:.1f} MiB | {r['rows']:.0f} | {r['err']:.1e} |"
        for r in rows_
    ]
    return "\n".join([head, *body])


def main(argv: list[str] | None = None) -> None:
    """``bench_moe_multihost.py HOSTS RANKS_PER_HOST``: print the table (needs root)."""
    from commpress.bench import multihost

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hosts", type=int, help="emulated hosts")
    parser.add_argument("local", type=int, help="ranks per host")
    ns = parser.parse_args(argv)
    hosts, local = ns.hosts, ns.local
    ok, why = multihost.available()
    if not ok:
        sys.exit(f"bench_moe_multihost: skipped: {why}")
    here = os.path.dirname(os.path.abspath(__file__))
    result = multihost.run_function(
        hosts, local, "bench_moe_multihost:run", {}, rate="1gbit", pythonpath=[here], timeout=600
    )
    print(table(rows(result, hosts, local)))


if __name__ == "__main__":
    main()
