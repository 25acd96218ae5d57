"""Hierarchical vs flat compressed all-reduce across emulated hosts, and a model for scale.

Measured rows (needs root and iproute2): ``H`` hosts x ``L`` ranks, each host a
network namespace with a full-duplex link of RATE each way to a switch
(`commpress.bench.multihost`), real ``torchrun --nnodes H`` rendezvous, one
run for every configuration so the ratios are side by side::

    sudo .venv/bin/python benchmarks/bench_multihost.py --hosts 2 --local 2 --rate 1gbit --mib 64

``time`` is per call the slowest rank's wall time, median over ``--iters``.
``out/host`` is the bytes that left each host's NIC per call (kernel
counters of the emulated NIC, minus a barrier-only baseline; Ethernet/IP/TCP
headers included, about 0.1% at the emulation's 65000-byte MTU), averaged
over hosts. ``formula`` is ``2 (H-1)/H * S / ratio`` for the hierarchical
rows, with the ratio of the packets actually sent.

``--model`` prints the *model* (no measurement) for 8-1024 GPUs on NVLink +
InfiniBand instead; see ``docs/cluster.md`` for its assumptions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys

from commpress.algorithms.hierarchical import cost
from commpress.bench import multihost

HEADLINE = ("plain-fp32", "plain-bf16", "flat-int8", "hier-int8", "hier-int4")


def measured_rows(
    hosts: int = 2,
    local: int = 2,
    mib: float = 64,
    rate: str = "1gbit",
    iters: int = 3,
    configs: tuple[str, ...] = HEADLINE,
) -> list[dict]:
    """One multi-host run of every configuration; one row per configuration."""
    result = multihost.run_function(
        hosts,
        local,
        "commpress.bench.multihost:measure_all_reduce",
        {"mib": mib, "configs": list(configs), "iters": iters},
        rate=rate,
        timeout=600,
    )
    ranks = result["ranks"]
    numel = int(mib * (1 << 20)) // 4
    rows = []
    for name in configs:
        per_rank = [r["configs"][name] for r in ranks]
        slowest = [max(t) for t in zip(*(p["times"] for p in per_rank), strict=True)]
        by_host: dict[str, float] = {}
        for r in ranks:
            by_host[r["host"]] = r["configs"][name]["out_bytes"]
        out_host = statistics.mean(by_host.values())
        codec, algorithm, _, chunk = multihost.CONFIGS[name]
        row = {
            "config": name,
            "hosts": hosts,
            "local": local,
            "mib": mib,
            "rate": result["rate"],
            "time_s": statistics.median(slowest),
            "out_per_host": out_host,
            "rel_err": max(p["rel_err"] for p in per_rank),
        }
        if algorithm == "hierarchical" and codec is not None:
            formula, ratio = multihost.expected_cross_bytes(
                codec, numel, hosts, local, chunk_bytes=4 << 20 if chunk is None else 0
            )
            row.update(formula=formula, ratio=ratio, deviation=out_host / formula - 1)
        rows.append(row)
    base = {r["config"]: r["time_s"] for r in rows}
    for r in rows:
        for ref in ("plain-fp32", "plain-bf16", "flat-int8"):
            if ref in base:
                r[f"vs_{ref}"] = base[ref] / r["time_s"]
    return rows


def model_rows(
    nbytes: int = 1 << 30,
    gpus_per_node: int = 8,
    nvlink_Bps: float = 160e9,
    ib_Bps: float = 50e9,
    codec_Bps: float = 400e9,
    sizes: tuple[int, ...] = (8, 16, 64, 256, 1024),
) -> list[dict]:
    """The *model* (not a measurement) for NVLink + IB clusters; assumptions in docs/cluster.md.

    Plain bf16 is NCCL's ring bounded by the per-GPU IB rate across nodes (NVLink within
    one node); flat int8 is `two_phase` over all GPUs, its cross-node share on IB;
    hierarchical uses `commpress.algorithms.hierarchical.cost` with one IB NIC per GPU.
    """
    ratios = {"int8": 3.94, "int4": 7.76}
    rows = []
    for n in sizes:
        hosts, local = max(n // gpus_per_node, 1), min(n, gpus_per_node)
        link = nvlink_Bps if hosts == 1 else ib_Bps
        plain_bf16 = 2 * (n - 1) / n * nbytes / 2 / link
        row = {"gpus": n, "nodes": hosts, "plain-bf16": plain_bf16}
        for codec, r in ratios.items():
            cross = (n - local) / n if hosts > 1 else 0.0
            wire = 2 * (n - 1) / n * nbytes / r
            flat_wire = max(wire * cross / ib_Bps, wire * (1 - cross) / nvlink_Bps)
            flat_codec = nbytes / codec_Bps + (2 * n - 1) / n * nbytes / codec_Bps
            row[f"flat-{codec}"] = max(flat_wire, flat_codec)
            row[f"hier-{codec}"] = cost(
                nbytes,
                hosts=hosts,
                local=local,
                ratio=r,
                intra_Bps=nvlink_Bps,
                inter_Bps=ib_Bps,
                encode_Bps=codec_Bps,
                decode_Bps=codec_Bps,
            )
        rows.append(row)
    return rows


def _fmt_bytes(b: float) -> str:
    return f"{b / (1 << 20):.2f} MiB"


def print_measured(rows: list[dict]) -> None:
    r0 = rows[0]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    print(
        f"{r0['hosts']} hosts x {r0['local']} ranks, {r0['rate']} each way between hosts, "
        f"{r0['mib']:g} MiB float32 all_reduce; {now} UTC, {os.cpu_count()} cores, "
        f"{platform.machine()}, load {os.getloadavg()[0]:.1f}"
    )
    print(
        "| config | time | vs plain fp32 | vs plain bf16 | vs flat int8 | out/host | formula "
        "| deviation | rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = r.get("formula")
        print(
            f"| {r['config']} | {r['time_s'] * 1e3:.0f} ms | {r.get('vs_plain-fp32', 0):.2f}x "
            f"| {r.get('vs_plain-bf16', 0):.2f}x | {r.get('vs_flat-int8', 0):.2f}x "
            f"| {_fmt_bytes(r['out_per_host'])} | {_fmt_bytes(f) if f else '-'} "
            f"| {'%+.2f%%' % (100 * r['deviation']) if f else '-'} | {r['rel_err']:.1e} |"
        )


def print_model(rows: list[dict]) -> None:
    keys = ["plain-bf16", "flat-int8", "hier-int8", "flat-int4", "hier-int4"]
    print("MODEL, not a measurement: 1 GiB fp32 all_reduce per step (see docs/cluster.md)")
    print("| GPUs | nodes | " + " | ".join(keys) + " | hier-int8 vs plain bf16 |")
    print("|---" * (len(keys) + 3) + "|")
    for r in rows:
        cells = " | ".join(f"{r[k] * 1e3:.1f} ms" for k in keys)
        print(f"| {r['gpus']} | {r['nodes']} | {cells} | {r['plain-bf16'] / r['hier-int8']:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--local", type=int, default=2)
    p.add_argument("--mib", type=float, default=64)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--configs", default=",".join(HEADLINE), help="names of multihost.CONFIGS")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--model", action="store_true", help="print the scale model instead")
    a = p.parse_args(argv)
    if a.model:
        rows = model_rows()
        print_model(rows)
    else:
        ok, why = multihost.available()
        if not ok:
            print(f"bench_multihost: skipped: {why}", file=sys.stderr)
            return 3
        rows = measured_rows(a.hosts, a.local, a.mib, a.rate, a.iters, tuple(a.configs.split(",")))
        print_measured(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
