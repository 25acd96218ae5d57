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

``--ddp`` times a DDP training step instead (`commpress.bench.ddp.step_rank`: a
2-layer MLP of 67 MB of float32 gradients, 3 buckets) for each of ``--methods``
(``plain``, a hook codec, ``codec@algorithm`` for a codec under that algorithm,
``auto``), one after another in the same job::

    sudo .venv/bin/python benchmarks/bench_multihost.py --ddp \
        --methods plain,int8,int8@hierarchical,auto

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
            "chose": per_rank[0].get("chose", ""),
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


DDP_METHODS = ("plain", "int8", "int8@hierarchical", "auto")


def ddp_rank(methods: list[str], width: int = 2900, steps: int = 5, warmup: int = 2) -> dict:
    """One rank of `ddp_rows` (called through `multihost.run_function`)."""
    import torch.distributed as dist

    from commpress.bench.ddp import step_rank
    from commpress.policy import Policy, get_policy, set_policy

    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for method in methods:
        codec, _, algorithm = method.partition("@")
        saved = get_policy()
        if algorithm:
            set_policy(Policy(algorithm=algorithm))
        try:
            dist.barrier()
            out[method] = step_rank(rank, world, codec, width, steps, warmup)
        finally:
            set_policy(saved)
    return out


def ddp_rows(
    hosts: int = 2, local: int = 2, rate: str = "1gbit", methods: tuple[str, ...] = DDP_METHODS
) -> list[dict]:
    """The DDP step of every method in one multi-host job; the slowest rank's median each."""
    here = os.path.dirname(os.path.abspath(__file__))
    result = multihost.run_function(
        hosts,
        local,
        "bench_multihost:ddp_rank",
        {"methods": list(methods)},
        rate=rate,
        pythonpath=[here],
        timeout=600,
    )
    ranks = result["ranks"]
    rows = []
    for m in methods:
        step = max(r[m]["step_s"] for r in ranks)
        row = {"method": m, "step_ms": step * 1e3, "spread_ms": ranks[0][m]["spread"]}
        row["chosen"] = ranks[0][m].get("chosen", "")
        rows.append(row)
    plain = next((r["step_ms"] for r in rows if r["method"] == "plain"), None)
    for r in rows:
        r["x_plain"] = plain / r["step_ms"] if plain else None
    return rows


def print_ddp(rows: list[dict], hosts: int, local: int, rate: str) -> None:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    print(
        f"DDP step, {hosts} hosts x {local} ranks, {rate} each way between hosts, 67 MB of "
        f"float32 gradients; {now} UTC, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    print("| method | step | spread | vs plain | auto chose |")
    print("|---|---|---|---|---|")
    for r in rows:
        x = f"{r['x_plain']:.2f}x" if r["x_plain"] else "-"
        print(
            f"| {r['method']} | {r['step_ms']:.0f} ms | {r['spread_ms']} ms | {x} "
            f"| {r['chosen'] or '-'} |"
        )


def model_rows(
    nbytes: int = 1 << 30,
    gpus_per_node: int = 8,
    nics_per_node: int = 8,
    nvlink_Bps: float = 160e9,
    nic_Bps: float = 50e9,
    codec_Bps: float = 400e9,
    sizes: tuple[int, ...] = (8, 16, 64, 256, 1024),
) -> list[dict]:
    """The *model* (not a measurement) for NVLink + IB clusters; assumptions in docs/cluster.md.

    Bandwidth terms only (latency ignored: 1 GiB calls), per GPU, the slowest link wins:

    - plain bf16: NCCL rings, one per NIC: a GPU's NVLink carries ``(L-1)/L`` of the
      ring traffic ``2 (N-1)/N * S/2``, a node's NICs together carry all of it;
    - flat int8/int4 (`two_phase` over all ``N`` GPUs): each GPU sends
      ``2 (N-1)/N * S / r``, the share ``(N-L)/(N-1)`` of it to other nodes (through
      the node's NICs), the rest over NVLink; codec work (encode ``S``, decode ``2S``)
      overlaps the transfer;
    - hierarchical: `commpress.algorithms.hierarchical.cost`, with the per-GPU share of
      the node's NICs ``nics * nic_Bps / L`` as ``inter_Bps``.
    """
    ratios = {"int8": 3.94, "int4": 7.76}
    rows = []
    for n in sizes:
        L = min(n, gpus_per_node)
        H = max(n // L, 1)
        node_out = nics_per_node * nic_Bps
        ring = 2 * (n - 1) / n * nbytes / 2
        plain = max(ring * (L - 1) / L / nvlink_Bps, ring / node_out if H > 1 else 0.0)
        row = {"gpus": n, "nodes": H, "plain-bf16": plain}
        for codec, r in ratios.items():
            sent = 2 * (n - 1) / n * nbytes / r
            cross = (n - L) / (n - 1)
            wire = max(sent * (1 - cross) / nvlink_Bps, sent * cross * L / node_out)
            row[f"flat-{codec}"] = max(wire, 3 * nbytes / codec_Bps)
            row[f"hier-{codec}"] = cost(
                nbytes,
                hosts=H,
                local=L,
                ratio=r,
                intra_Bps=nvlink_Bps,
                inter_Bps=node_out / L,
                encode_Bps=codec_Bps,
                decode_Bps=codec_Bps,
                intra_latency_s=0.0,
                inter_latency_s=0.0,
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
        name = f"{r['config']} ({r['chose']})" if r.get("chose") else r["config"]
        print(
            f"| {name} | {r['time_s'] * 1e3:.0f} ms | {r.get('vs_plain-fp32', 0):.2f}x "
            f"| {r.get('vs_plain-bf16', 0):.2f}x | {r.get('vs_flat-int8', 0):.2f}x "
            f"| {_fmt_bytes(r['out_per_host'])} | {_fmt_bytes(f) if f else '-'} "
            f"| {'%+.2f%%' % (100 * r['deviation']) if f else '-'} | {r['rel_err']:.1e} |"
        )


def print_model(rows: list[dict], title: str) -> None:
    keys = ["plain-bf16", "flat-int8", "hier-int8", "flat-int4", "hier-int4"]
    print(f"MODEL, not a measurement: 1 GiB fp32 all_reduce, {title} (see docs/cluster.md)")
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
    p.add_argument("--ddp", action="store_true", help="time a DDP step per --methods instead")
    p.add_argument("--methods", default=",".join(DDP_METHODS), help="DDP methods (--ddp)")
    a = p.parse_args(argv)
    if a.ddp:
        ok, why = multihost.available()
        if not ok:
            print(f"bench_multihost: skipped: {why}", file=sys.stderr)
            return 3
        rows = ddp_rows(a.hosts, a.local, a.rate, tuple(a.methods.split(",")))
        print_ddp(rows, a.hosts, a.local, a.rate)
    elif a.model:
        rows = []
        for nics in (8, 1):
            part = model_rows(nics_per_node=nics)
            print_model(part, f"{nics} x 50 GB/s NIC per 8-GPU node, NVLink 160 GB/s")
            rows += [dict(r, nics_per_node=nics) for r in part]
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
