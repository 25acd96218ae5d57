"""64 MiB fp32 all-reduce on 2 gloo ranks: plain torch.distributed vs commpress, side by side.

Cases, all in one run and on the same data (a 4096 x 4096 float32 tensor per
rank, 64 MiB, standard normal, a different seed per rank):

- ``plain fp32`` -- ``torch.distributed.all_reduce`` on the float32 tensor;
- ``plain bf16`` -- the same on a bfloat16 copy (32 MiB; what a run that keeps
  its gradients in bf16 pays; the cast is not timed);
- ``commpress bf16`` / ``int8`` / ``int4`` -- ``commpress.distributed.all_reduce(x,
  codec=...)`` on the float32 tensor;
- ``commpress powersgd:rank=4`` -- `commpress.algorithms.powersgd.all_reduce_many`
  on the 4096 x 4096 matrix (warm start and error feedback across repeats).

over unshaped loopback (``link=none``) and over an emulated link
(``commpress.bench.netem``; ``1gbit`` by default -- a shared medium: both
ranks' traffic crosses the same shaped loopback, see `link_rows`).

Columns:

- ``wire_MiB`` -- MiB this rank hands to the backend per call (commpress's
  ``stats`` definition: packed buffers incl. headers; plain calls: the input);
- ``ms`` -- median over repeats of the slowest rank's time per call (ranks
  start together after a barrier); ``min_ms``/``max_ms`` -- the extremes;
  ``spread_pct`` -- ``(max - min) / median``;
- ``x_fp32`` / ``x_bf16`` -- plain fp32 / plain bf16 median time over this row's
  (above 1: faster than the baseline);
- ``rel_err`` -- ``||y - y_fp32|| / ||y_fp32||`` on the first call. PowerSGD's is
  near 1 here: a random matrix has no low-rank structure, and PowerSGD relies on
  error feedback across steps to deliver what one call drops
  (``tests/test_powersgd.py``);
- ``identical`` -- every rank ended with the same bits.

Run::

    python benchmarks/bench_collectives.py                  # none and 1gbit, 5 repeats
    python benchmarks/bench_collectives.py --links none --repeats 3 --json
    python benchmarks/bench_collectives.py --link-check     # what the emulated link delivers
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MATRIX = (4096, 4096)
CASES = (
    "plain fp32",
    "plain bf16",
    "commpress bf16",
    "commpress int8",
    "commpress int4",
    "commpress powersgd:rank=4",
)
_MIB = 1 << 20


# ---------------------------------------------------------------- on each rank


def _case_body(rank: int, world: int, case: str, repeats: int, warmup: int) -> dict[str, Any]:
    """Run one case on this rank; every rank calls it. Times, wire bytes, first output's digest."""
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(1234 + rank)
    base = torch.randn(MATRIX, generator=gen)
    reference = base.clone()
    dist.all_reduce(reference)
    call, src, wire = _make_call(case, base, world)
    times, wires = [], []
    first = None
    for i in range(warmup + repeats):
        x = src.clone()
        before = _stats_wire()
        dist.barrier()
        t0 = time.perf_counter()
        call(x)
        elapsed = time.perf_counter() - t0
        after = _stats_wire()
        if i >= warmup:
            times.append(elapsed)
            wires.append(wire if wire is not None else after - before)
        if first is None:
            first = x
    y = first.float()
    err = float((y - reference).norm() / reference.norm())
    digest = hashlib.sha256(first.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
    return {"times": times, "wire": statistics.median(wires), "rel_err": err, "digest": digest}


def _make_call(case: str, base: torch.Tensor, world: int):
    """(call(x) in place, the input tensor to clone per call, wire bytes if known up front)."""
    import torch.distributed as dist

    if case == "plain fp32":
        return dist.all_reduce, base, base.numel() * 4
    if case == "plain bf16":
        return dist.all_reduce, base.to(torch.bfloat16), base.numel() * 2
    spec = case.removeprefix("commpress ")
    if spec.startswith("powersgd"):
        from commpress.algorithms.powersgd import PowerSGDMemory, all_reduce_many, plan

        memory = PowerSGDMemory()

        def psgd(x: torch.Tensor) -> None:
            all_reduce_many([x], spec, average=False, memory=memory, keys=["w"])

        return psgd, base, plan([base], spec).wire_nbytes()
    import commpress.distributed as cdist  # raises ImportError while it is not there

    def compressed(x: torch.Tensor) -> None:
        cdist.all_reduce(x, op=dist.ReduceOp.SUM, codec=spec)

    return compressed, base, None


def _stats_wire() -> int:
    try:
        import commpress

        return int(commpress.stats().total().bytes_wire)
    except (AttributeError, ImportError):
        return 0


def _link_body(rank: int, world: int, nbytes: int, repeats: int) -> dict[str, list[float]]:
    """Times of a one-way send/recv (rank 0 -> 1) and of a plain all_reduce of ``nbytes``."""
    import torch.distributed as dist

    x = torch.ones(nbytes // 4)
    out: dict[str, list[float]] = {"send_recv": [], "all_reduce": []}
    for _ in range(repeats + 1):  # the first is a warm-up
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(x, 1)
        elif rank == 1:
            dist.recv(x, 0)
        dist.barrier()  # the receiver's completion ends the transfer for both
        out["send_recv"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        out["all_reduce"].append(time.perf_counter() - t0)
    return {k: v[1:] for k, v in out.items()}


# ------------------------------------------------------------ rows (one process)


def collective_rows(
    link: str = "none", repeats: int = 5, warmup: int = 1, cases: list[str] | None = None
) -> list[dict[str, Any]]:
    """Measure every case on 2 local gloo ranks in this process's network; one row per case.

    Call it through `commpress.bench.netem.run_function` to run it over a shaped
    link; ``link`` only labels the rows. A case that fails becomes a row whose
    ``status`` says why (e.g. ``commpress.distributed`` not available yet).
    """
    from commpress.testing import DistPool, RemoteError

    rows = []
    with DistPool(2, pg_timeout=300, job_timeout=900) as pool:
        for case in cases or CASES:
            row: dict[str, Any] = {"link": link, "case": case}
            try:
                per_rank = pool.run(_case_body, case, repeats, warmup)
            except (RemoteError, TimeoutError) as exc:
                row["status"] = "error: " + _first_error(exc)
                rows.append(row)
                continue
            slowest = [max(ts) for ts in zip(*(r["times"] for r in per_rank), strict=True)]
            median = statistics.median(slowest)
            row.update(
                status="ok",
                wire_MiB=per_rank[0]["wire"] / _MIB,
                ms=median * 1e3,
                min_ms=min(slowest) * 1e3,
                max_ms=max(slowest) * 1e3,
                spread_pct=(max(slowest) - min(slowest)) / median * 100,
                rel_err=per_rank[0]["rel_err"],
                identical=len({r["digest"] for r in per_rank}) == 1,
                repeats=repeats,
            )
            rows.append(row)
    return rows


def link_rows(link: str = "none", size_mib: int = 64, repeats: int = 3) -> list[dict[str, Any]]:
    """What a plain transfer achieves on this link: one row per op with MB/s.

    ``payload_MBps`` is the tensor's bytes over the median time; ``loopback_MBps``
    counts every byte that crosses the (shared) loopback: a send/recv moves the
    tensor once, a 2-rank ring all-reduce moves it once in each direction.
    """
    from commpress.testing import DistPool

    nbytes = size_mib * _MIB
    with DistPool(2, pg_timeout=300, job_timeout=900) as pool:
        per_rank = pool.run(_link_body, nbytes, repeats)
    rows = []
    for op, crossings in (("send_recv", 1), ("all_reduce", 2)):
        slowest = [max(ts) for ts in zip(*(r[op] for r in per_rank), strict=True)]
        t = statistics.median(slowest)
        rows.append(
            {
                "link": link,
                "op": op,
                "MiB": size_mib,
                "ms": t * 1e3,
                "payload_MBps": nbytes / t / 1e6,
                "loopback_MBps": crossings * nbytes / t / 1e6,
                "spread_pct": (max(slowest) - min(slowest)) / t * 100,
            }
        )
    return rows


def _first_error(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None)
    if failures:
        f = failures[0]
        return f"{f.type_name}: {f.message}".splitlines()[0][:200]
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


# ------------------------------------------------------------------- the run


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``x_fp32``/``x_bf16``: the plain baseline's median time over each row's, per link."""
    base = {(r["link"], r["case"]): r.get("ms") for r in rows if r.get("status") == "ok"}
    for r in rows:
        for col, case in (("x_fp32", "plain fp32"), ("x_bf16", "plain bf16")):
            ref = base.get((r["link"], case))
            r[col] = ref / r["ms"] if ref and r.get("status") == "ok" else None
    return rows


def run(
    links: tuple[str, ...] = ("none", "1gbit"), repeats: int = 5, quick: bool = False
) -> list[dict[str, Any]]:
    """Every case on every link, each link in a fresh process; rows with ratios.

    A link that cannot be emulated here gives one row per case saying why.
    """
    from commpress.bench import netem

    if quick:
        repeats = 2
    rows: list[dict[str, Any]] = []
    for link in links:
        if netem.parse_rate(link) is not None:
            ok, why = netem.link_available()
            if not ok:
                rows += [{"link": link, "case": c, "status": f"skipped: {why}"} for c in CASES]
                continue
        rows += netem.run_function(
            link,
            "bench_collectives:collective_rows",
            {"link": link, "repeats": repeats},
            pythonpath=[str(HERE)],
            timeout=3600,
        )
    return add_ratios(rows)


COLUMNS = [
    "link", "case", "wire_MiB", "ms", "min_ms", "max_ms", "spread_pct",
    "x_fp32", "x_bf16", "rel_err", "identical", "status",
]  # fmt: skip


def _meta(load_before: float) -> dict[str, Any]:
    return {
        "benchmark": "bench_collectives",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "world_size": 2,
        "tensor": f"float32 {MATRIX[0]}x{MATRIX[1]} (64 MiB)",
        "load1_before": load_before,
        "load1_after": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    from commpress.bench import netem, report

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--links", default="none,1gbit", help="comma list of rates, 'none' = as is")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2 repeats")
    p.add_argument(
        "--json",
        nargs="?",
        const=str(RESULTS / "bench_collectives.json"),
        help="write rows as JSON (default path: benchmarks/results/bench_collectives.json)",
    )
    p.add_argument(
        "--link-check", action="store_true", help="measure plain send/recv and all_reduce per link"
    )
    args = p.parse_args(argv)
    links = tuple(s.strip() for s in args.links.split(",") if s.strip())
    for link in links:
        try:
            netem.parse_rate(link)
        except ValueError as exc:
            p.error(str(exc))
    for link in links:
        if netem.parse_rate(link) is not None and not netem.link_available()[0]:
            print(
                f"bench_collectives: cannot emulate {link}: {netem.link_available()[1]}; "
                f"rows for it say so ({netem.HOW_TO_SKIP})",
                file=sys.stderr,
            )
    load_before = os.getloadavg()[0]
    if args.link_check:
        rows = []
        for link in links:
            if netem.parse_rate(link) is None or netem.link_available()[0]:
                rows += netem.run_function(
                    link, "bench_collectives:link_rows", {"link": link},
                    pythonpath=[str(HERE)], timeout=3600,
                )  # fmt: skip
        print(report.format_table(rows, title="plain transfers of 64 MiB on 2 gloo ranks"))
        if args.json:
            path = Path(args.json)
            report.write_json(path.with_name(path.stem + "_link.json"), rows, _meta(load_before))
        return 0
    rows = run(links, args.repeats, args.quick)
    print(
        report.format_table(
            rows, COLUMNS, title="all_reduce of 64 MiB fp32 on 2 gloo ranks (median of repeats)"
        )
    )
    if args.json:
        print(f"wrote {report.write_json(args.json, rows, _meta(load_before))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
