"""The fast-codec measurements: codec speed against ``copy_``, peak memory of one
compressed all_reduce, and a DDP step with compressed gradients.

    python benchmarks/bench_fast.py codecs            # 64 MiB float32, one thread
    python benchmarks/bench_fast.py memory            # 256 MiB all_reduce, 2 ranks
    python benchmarks/bench_fast.py ddp --link 1gbit  # needs root for the link

Each measurement is a function that returns rows (dicts); `main` prints them
and ``make_results.py`` renders them into ``RESULTS.md``. Ratios are always
taken against a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import commpress
from commpress.bench import netem
from commpress.bench.ddp import STEP_METHODS, step_rows
from commpress.cli_codecs import measure_codec, measure_copy, sample
from commpress.testing import DistPool

FAST_CODECS = ("int8", "int4", "int2", "fp8", "fp8_e5m2", "sign", "bf16", "fp16")
#: Speed targets of the fast-codec issue: encode and decode at >= 1.0x dst.copy_(x).
COPY_TARGETS = {"int8": 1.0, "int4": 1.0, "fp8": 1.0, "bf16": 1.0}


# --------------------------------------------------------------- codec speed
def codec_rows(size: int = 64 << 20, repeat: int = 5, codecs: tuple[str, ...] = FAST_CODECS):
    """Encode/decode GB/s of each codec on one thread, as multiples of ``dst.copy_(x)``.

    The yardstick is measured before and after the codecs; the ratio uses their mean
    (the spread is reported).
    """
    torch.set_num_threads(1)
    x = sample(size // 4, torch.float32)
    before = measure_copy(x, repeat)
    rows = []
    for spec in codecs:
        r = measure_codec(commpress.get_codec(spec), x, repeat)
        rows.append(
            {
                "codec": spec,
                "ratio": r.ratio,
                "encode_gbps": r.encode_gbps,
                "decode_gbps": r.decode_gbps,
                "rel_l2_error": r.rel_l2_error,
            }
        )
    after = measure_copy(x, repeat)
    copy = (before + after) / 2
    for row in rows:
        row["copy_gbps"] = copy
        row["copy_spread"] = f"{min(before, after):.2f}..{max(before, after):.2f}"
        row["encode_x_copy"] = row["encode_gbps"] / copy
        row["decode_x_copy"] = row["decode_gbps"] / copy
        target = COPY_TARGETS.get(row["codec"])
        row["target"] = (
            None
            if target is None
            else "hit"
            if min(row["encode_x_copy"], row["decode_x_copy"]) >= target
            else "missed"
        )
    return rows


# -------------------------------------------------------------------- memory
def _peak_rank(rank: int, world: int, spec: str, numel: int) -> dict[str, Any]:
    import commpress.distributed as cdist

    def status(field: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    def reset_peak() -> int:
        # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")

    warm = torch.randn(1 << 16)
    cdist.all_reduce(warm, codec=spec)  # kernels loaded, caches built
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    x.add_(0)  # every page touched before the baseline is read
    extra, seconds = [], []
    for _ in range(2):
        # The same call site twice: the second call finds its error-feedback residual
        # (state that lives across calls, as big as the tensor) already there.
        base = reset_peak()
        t0 = time.perf_counter()
        cdist.all_reduce(x, codec=spec)
        seconds.append(time.perf_counter() - t0)
        extra.append(status("VmHWM") - base)
    return {"first_bytes": extra[0], "extra_bytes": extra[1], "seconds": seconds[1]}


def memory_rows(
    size: int = 256 << 20, codecs: tuple[str, ...] = ("int8", "int4", "fp8", "bf16", "topk", "zstd")
) -> list[dict[str, Any]]:
    """Peak extra RSS of one compressed float32 all_reduce of ``size`` bytes, 2 ranks.

    Fresh ranks per codec (peak RSS only grows within a process); the peak over the
    two ranks, as a multiple of the tensor's size, of the second call from one call
    site (``x_tensor``: what every call costs) and of the first (``first_x_tensor``:
    also the error-feedback residual, which is allocated once and kept).
    """
    rows = []
    for spec in codecs:
        with DistPool(2, job_timeout=600) as pool:
            res = pool.run(_peak_rank, spec, size // 4, timeout=600)
        first = max(r["first_bytes"] for r in res)
        extra = max(r["extra_bytes"] for r in res)
        rows.append(
            {
                "codec": spec,
                "tensor_bytes": size,
                "extra_bytes": extra,
                "x_tensor": extra / size,
                "first_x_tensor": first / size,
                "seconds": max(r["seconds"] for r in res),
                "target": "hit" if extra / size <= 0.5 else "missed",
            }
        )
    return rows


# ----------------------------------------------------------------------- DDP
def ddp_rows(
    width: int = 2900, steps: int = 5, warmup: int = 2, methods: tuple[str, ...] = STEP_METHODS
) -> list[dict[str, Any]]:
    """DDP step time of a 2-layer MLP (``2 * width**2`` parameters; 2900 -> 67 MB of
    float32 gradients) on 2 ranks, per gradient method (plain DDP, torch's hooks, each
    codec, ``auto``), in this process's network: `commpress.bench.ddp.step_rows`."""
    return step_rows(width, steps, warmup, methods)


def ddp_linked(rate: str, **kwargs: Any) -> list[dict[str, Any]]:
    """`ddp_rows` under an emulated link of ``rate`` (see ``commpress.bench.netem``)."""
    rows = netem.run_function(
        rate,
        "bench_fast:ddp_rows",
        kwargs,
        pythonpath=[str(Path(__file__).parent)],
        timeout=1800,
    )
    for r in rows:
        r["link"] = rate
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["codecs", "memory", "ddp"])
    p.add_argument("--link", default="none", help="for ddp: emulated link rate (root)")
    p.add_argument("--quick", action="store_true", help="small sizes (checks the pipeline)")
    args = p.parse_args(argv)
    if args.what == "codecs":
        rows = codec_rows(size=(1 << 20) if args.quick else 64 << 20)
    elif args.what == "memory":
        rows = memory_rows(size=(4 << 20) if args.quick else 256 << 20)
    else:
        kw = {"width": 256, "steps": 2, "warmup": 1} if args.quick else {}
        rows = ddp_rows(**kw) if args.link == "none" else ddp_linked(args.link, **kw)
    json.dump(rows, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
