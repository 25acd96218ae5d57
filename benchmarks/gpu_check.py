"""One prepared GPU check: correctness, speed, SM budget, overlap, and a compressed
all_reduce between two processes sharing the GPU. Runs in under 8 minutes.

    python benchmarks/gpu_check.py                 # prints a report; JSON to $OUT if set
    python benchmarks/gpu_check.py --quick         # small sizes (a smoke run)

On a machine without CUDA it says so and exits 0 ("not run on GPU"): nothing
here is measured on the CPU. Sections, each with its own time budget, each
reported even when another one failed:

1. ``correctness``: every lossy codec's CUDA encode/decode against the CPU
   reference path (payload bits, decoded values, error bound), on Gaussian
   data and on the hostile edge values of ``commpress.testing``.
2. ``speed``: encode (into a preallocated wire buffer) and decode (into a
   preallocated tensor) GB/s against a device-to-device ``copy_`` of the same
   tensor, timed with CUDA events.
3. ``green_context``: the same inside a 20-SM green context
   (``torch.cuda.green_contexts``), as a fraction of the full-device copy.
4. ``overlap``: how much a bf16 matmul on the default stream slows down while
   a codec loop runs on another stream (the codec stream of the engine).
5. ``all_reduce``: 2 processes on the one GPU over gloo, 64 MiB, int8 and
   bf16 against plain, results checked against the float64 sum.

Targets (from the fast-codec issue): fused encode >= 85% of the copy
bandwidth, >= 15% of it inside 20 SMs. The CUDA path of the codecs is the
reference path (torch's own kernels) today; this script is how the next
session with a GPU learns how far that is from the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import commpress
from commpress import kernels, wire
from commpress.codecs.sparse import reset_draws
from commpress.testing import edge_values, gaussian

CODECS = ("int8", "int4", "int2", "fp8", "fp8_e5m2", "sign", "bf16", "fp16", "topk", "randomk")
SPEED_CODECS = ("int8", "int4", "fp8", "bf16", "fp16", "sign")


def _events_ms(fn: Callable[[], Any], repeat: int, stream: Any = None) -> float:
    """Median milliseconds of ``fn`` on ``stream`` (default: current), by CUDA events."""
    stream = stream or torch.cuda.current_stream()
    times = []
    with torch.cuda.stream(stream):
        fn()  # warm-up
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


# ----------------------------------------------------------------- sections
def correctness(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for spec in CODECS:
        codec = commpress.get_codec(spec)
        for name, x in (
            ("gaussian", gaussian(4099 if quick else 1 << 20, seed=1)),
            ("edge", edge_values(torch.float32)),
        ):
            row: dict[str, Any] = {"codec": spec, "data": name}
            try:
                reset_draws()  # randomk: both sides draw the same subset
                with kernels.reference_only():
                    ref = codec.encode(x)
                    ref_y = codec.decode(ref)
                reset_draws()
                gp = codec.encode(x.cuda())
                same = [
                    torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))
                    for a, b in zip(gp.payload, ref.payload, strict=True)
                ]
                y = codec.decode(gp).cpu()
                finite = x.isfinite()
                bound = codec.error_bound(x)
                err = (y.double() - x.double()).abs()
                ok_bound = bool(
                    (~finite | (err <= bound.double() * (1 + 1e-6)) | bound.isinf()).all()
                )
                nan_kept = bool(y[x.isnan()].isnan().all())
                row.update(
                    payload_bit_identical=all(same),
                    within_bound=ok_bound,
                    nan_kept=nan_kept,
                    decode_matches_cpu=bool(((y == ref_y) | (y.isnan() & ref_y.isnan())).all()),
                )
                row["ok"] = ok_bound and nan_kept
            except Exception as exc:  # noqa: BLE001 - report and go on
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            rows.append(row)
    return rows


def speed(quick: bool, stream: Any = None, label: str = "device") -> list[dict[str, Any]]:
    n = (1 << 22) if quick else (1 << 26)  # 16 MiB or 256 MiB of float32
    x = torch.randn(n, device="cuda")
    dst = torch.empty_like(x)
    repeat = 5 if quick else 20
    copy_ms = _events_ms(lambda: dst.copy_(x), repeat, stream)
    rows = [
        {
            "where": label,
            "codec": "copy_",
            "ms": copy_ms,
            "gbps": x.nbytes / copy_ms / 1e6,
            "x_copy": 1.0,
        }
    ]
    for spec in SPEED_CODECS:
        codec = commpress.get_codec(spec)
        buf = wire.encode_pack(codec, x)
        packet = wire.unpack(buf, codec)
        enc = _events_ms(lambda c=codec, b=buf: wire.encode_pack(c, x, out=b), repeat, stream)
        dec = _events_ms(lambda c=codec, p=packet: c.decode(p, out=dst), repeat, stream)
        rows.append(
            {
                "where": label,
                "codec": spec,
                "encode_ms": enc,
                "decode_ms": dec,
                "encode_x_copy": copy_ms / enc,
                "decode_x_copy": copy_ms / dec,
            }
        )
    return rows


def green_context(quick: bool, full_copy_ms: float | None) -> list[dict[str, Any]]:
    from torch.cuda.green_contexts import GreenContext

    ctx = GreenContext.create(num_sms=20, device_id=torch.cuda.current_device())
    stream = ctx.Stream() if hasattr(ctx, "Stream") else None
    if stream is None:
        raise RuntimeError("this torch's GreenContext has no Stream(); cannot run on it")
    rows = speed(quick, stream, label="20-SM green context")
    if full_copy_ms:
        for r in rows:
            if "encode_ms" in r:
                r["encode_x_full_copy"] = full_copy_ms / r["encode_ms"]
    return rows


def overlap(quick: bool) -> list[dict[str, Any]]:
    m = 4096 if quick else 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1 << 26, device="cuda")
    codec = commpress.get_codec("int8")
    buf = wire.encode_pack(codec, x)
    side = torch.cuda.Stream(priority=-1)
    alone = _events_ms(lambda: a @ b, 10)

    def codec_loop() -> None:
        with torch.cuda.stream(side):
            for _ in range(50):
                wire.encode_pack(codec, x, out=buf)

    torch.cuda.synchronize()
    codec_loop()  # the side stream is now busy for a while
    together = _events_ms(lambda: a @ b, 10)
    torch.cuda.synchronize()
    return [
        {
            "matmul": f"bf16 {m}x{m}",
            "alone_ms": alone,
            "with_codec_ms": together,
            "slowdown": together / alone - 1,
        }
    ]


def _ar_rank(rank: int, world: int, n: int, results: Any) -> None:
    import torch.distributed as dist

    import commpress.distributed as cdist

    torch.cuda.set_device(0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29631")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    base = torch.randn(n, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    expected = base.clone()
    dist.all_reduce(expected)  # float64 reference sum, on the CPU
    out = {}
    for spec in ("plain", "bf16", "int8"):
        x = base.float().cuda()
        t0 = time.perf_counter()
        if spec == "plain":
            dist.all_reduce(x)
        else:
            cdist.all_reduce(x, codec=spec)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rel = float((x.double().cpu() - expected).norm() / expected.norm())
        out[spec] = {"ms": seconds * 1e3, "rel_err": rel}
    results.put((rank, out))
    dist.destroy_process_group()


def all_reduce(quick: bool) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    n = (1 << 20) if quick else (1 << 24)
    procs = [ctx.Process(target=_ar_rank, args=(r, 2, n, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    rows = []
    for spec in ("plain", "bf16", "int8"):
        ms = max(got[r][spec]["ms"] for r in got)
        rows.append(
            {
                "codec": spec,
                "ms": ms,
                "rel_err": got[0][spec]["rel_err"],
                "ranks_agree": got[0][spec]["rel_err"] == got[1][spec]["rel_err"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here: nothing checked (not run on GPU)")
        return 0
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
        "kernels": "reference path (torch ops) on CUDA",
    }
    budget = {
        "correctness": 120,
        "speed": 90,
        "green_context": 90,
        "overlap": 60,
        "all_reduce": 150,
    }
    seen: dict[str, float] = {}  # the full-device copy time, once "speed" ran
    for name, fn in (
        ("correctness", lambda: correctness(args.quick)),
        ("speed", lambda: speed(args.quick)),
        ("green_context", lambda: green_context(args.quick, seen.get("copy_ms"))),
        ("overlap", lambda: overlap(args.quick)),
        ("all_reduce", lambda: all_reduce(args.quick)),
    ):
        t0 = time.perf_counter()
        try:
            rows = fn()
            report[name] = rows
            if name == "speed":
                seen["copy_ms"] = rows[0]["ms"]
        except Exception as exc:  # noqa: BLE001 - one section must not hide the others
            report[name] = {
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(limit=3),
            }
        seconds = time.perf_counter() - t0
        over = " (over its budget)" if seconds > budget[name] else ""
        print(f"== {name}: {seconds:.1f} s{over}")
        print(json.dumps(report[name], indent=1, default=str))
        sys.stdout.flush()
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
