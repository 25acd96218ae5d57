"""Regenerate benchmarks/RESULTS.md and everything in benchmarks/results/ with one command.

    python benchmarks/make_results.py            # the full run, ~15-20 minutes on 2 CPU cores
    python benchmarks/make_results.py --quick    # every section, tiny sizes (checks the pipeline)
    python benchmarks/make_results.py --render-only  # rebuild the page from results/*.json

Sections, each a function that returns rows (written by `commpress.bench.report`):

1. ``headline``: 64 MiB fp32 all_reduce on 2 ranks over an emulated 1 Gbit/s
   link, every codec next to plain fp32 and bf16, repeated (fresh ranks each
   time); PowerSGD rank 4 on a 4096x4096 matrix the same way.
2. ``bench_collectives``: the 64 MiB side-by-side of ``benchmarks/bench_collectives.py``.
3. ``sweeps``: ``commpress bench`` over all five ops on unshaped loopback, and
   all_reduce vs size at 1 and 10 Gbit/s.
4. ``breakeven``: codec throughput on one core and the link speed below which
   each codec should win (serial and pipelined models).
5. ``ddp_hooks``: torch's own DDP hooks probed on gloo.
6. ``convergence``: the study of ``benchmarks/bench_convergence.py`` over 1 Gbit/s.
7. ``fast``: ``benchmarks/bench_fast.py``: codec speed against ``dst.copy_(x)``
   (one thread), peak memory of one compressed 256 MiB all_reduce, and a DDP
   step (67 MB of gradients) on loopback and at 1 Gbit/s.

The machine, date, and the load measured before and after go on the page.
Link emulation (``commpress.bench.netem``) needs root; without it the linked
sections are skipped and the page says why.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from commpress.bench import netem, report
from commpress.bench.breakeven import codec_rows
from commpress.bench.cli import format_rows
from commpress.bench.collectives import BASELINES, sweep_rows
from commpress.bench.convergence import METHODS, StudyConfig, study
from commpress.bench.ddp import clean_error, probe_torch_hooks

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
PAGE = HERE / "RESULTS.md"

HEADLINE_CODECS = ("bf16", "int8", "int4", "fp8", "sign", "topk:ratio=0.01", "zstd", "int8+zstd")
SWEEP_CODECS = ("int8", "int4", "fp8", "zstd")
BREAKEVEN_CODECS = (
    "fp16",
    "bf16",
    "fp8",
    "int8",
    "int4",
    "int2",
    "sign",
    "topk:ratio=0.01",
    "lz4",
    "zstd",
    "int8+zstd",
    "powersgd:rank=4",
)
#: Targets to report against (not to tune for): speedup over plain fp32 at 1 Gbit/s.
SPEEDUP_TARGETS = {"int8": 3.6, "int4": 6.0, "powersgd:rank=4": 20.0}
#: Speedup targets at 10 Gbit/s (64 MiB all_reduce, from the 10gbit sweep).
SPEEDUP_10GBIT_TARGETS = {"int8": 1.5}
#: DDP step targets at 1 Gbit/s: the int8 hook against torch's fp16 hook and plain DDP.
DDP_TARGETS = {"x_torch_fp16_hook": 1.6, "x_plain": 2.5}
#: Convergence targets: final train loss within this fraction of fp32's.
LOSS_TARGETS = {"int8": 0.01, "fp8": 0.01, "powersgd:rank=4": 0.05, "ef-sign": 0.05}


# ------------------------------------------------------------------ machine


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{mem_kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        mem = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os": f"{platform.system()} {platform.release()}",
        "gpu": "none (not run on GPU)",
    }


def load() -> dict[str, Any]:
    """Load average and how many pytest processes (other people's test runs) are alive."""
    one, five, _ = os.getloadavg()
    try:
        found = subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, text=True).stdout
        pytest_procs = len([p for p in found.split() if p.strip() and int(p) != os.getpid()])
    except (OSError, ValueError):
        pytest_procs = -1
    return {"load1": round(one, 2), "load5": round(five, 2), "pytest_procs": pytest_procs}


# ---------------------------------------------------------------- sections


def _linked(rate: str, fields: dict[str, Any]) -> list[dict[str, Any]]:
    """`sweep_rows` under an emulated link of ``rate``."""
    target = "commpress.bench.collectives:sweep_rows"
    return netem.run_function(rate, target, fields, timeout=1800)


def headline_repeat(size: int, iters: int, shape: list[int]) -> list[dict[str, Any]]:
    """One repeat of the headline, in this process's network (run under netem by `headline`)."""
    base = {"ops": ["all_reduce"], "world_size": 2, "warmup": 1, "iters": iters, "link": "1gbit"}
    flat = sweep_rows(**base, codecs=list(HEADLINE_CODECS), sizes=[size])
    low_rank = sweep_rows(**base, codecs=["powersgd:rank=4"], shape=list(shape))
    for r in flat:
        r["tensor"] = f"{size >> 20} MiB vector"
    for r in low_rank:
        r["tensor"] = f"{shape[0]}x{shape[1]} matrix"
    return flat + low_rank


def headline(repeats: int, size: int, iters: int, shape: tuple[int, int]) -> list[dict[str, Any]]:
    """all_reduce of ``size`` bytes at 1 Gbit/s, ``repeats`` times with fresh ranks each time.

    Each repeat also runs PowerSGD (and its own plain baselines) on one ``shape`` matrix.
    """
    rows = []
    for repeat in range(repeats):
        part = netem.run_function(
            "1gbit",
            "make_results:headline_repeat",
            {"size": size, "iters": iters, "shape": list(shape)},
            pythonpath=[str(HERE)],
            timeout=1800,
        )
        for r in part:
            r["repeat"] = repeat
        rows += part
    return rows


def _share(rows: list[dict[str, Any]]) -> float | None:
    """Median encode+decode share of the time; None where stats recorded none (baselines,
    and PowerSGD, whose algorithm does not report encode/decode seconds)."""
    shares = [(r.get("encode_share") or 0) + (r.get("decode_share") or 0) for r in rows]
    return statistics.median(shares) if any(shares) else None


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (shape, codec): medians and ranges of speedup and time over repeats."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            groups.setdefault((r["tensor"], r["codec"]), []).append(r)
    out = []
    for (tensor, codec), rs in groups.items():
        s32 = [r["speedup_fp32"] for r in rs]
        s16 = [r["speedup_bf16"] for r in rs]
        t = [r["time_us"] / 1e3 for r in rs]
        target = SPEEDUP_TARGETS.get(codec)
        med = statistics.median(s32)
        out.append(
            {
                "tensor": tensor,
                "codec": codec,
                "ratio": statistics.median(r["ratio"] for r in rs),
                "time_ms": statistics.median(t),
                "time_range_ms": f"{min(t):.0f}..{max(t):.0f}",
                "x_fp32": med,
                "x_fp32_range": f"{min(s32):.2f}..{max(s32):.2f}",
                "x_bf16": statistics.median(s16),
                "x_bf16_range": f"{min(s16):.2f}..{max(s16):.2f}",
                "rel_err": statistics.median(r["rel_err"] for r in rs),
                "enc_dec_share": _share(rs),
                "target_x_fp32": target,
                "target": None
                if target is None
                else ("hit" if med >= target else f"missed by {target - med:.2f}x"),
                "repeats": len(rs),
            }
        )
    return out


def sweeps(quick: bool) -> dict[str, list[dict[str, Any]]]:
    """``commpress bench`` sweeps: all ops on loopback; all_reduce vs size at 1 and 10 Gbit/s."""
    loop_sizes = [64 << 10, 1 << 20] if quick else [64 << 10, 1 << 20, 16 << 20]
    link_sizes = [1 << 20, 4 << 20] if quick else [1 << 20, 4 << 20, 16 << 20, 64 << 20]
    out = {}
    out["loopback"] = sweep_rows(
        ops=["all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all"],
        codecs=list(SWEEP_CODECS),
        sizes=loop_sizes,
        warmup=1,
        iters=3 if quick else 5,
    )
    for rate in ("1gbit", "10gbit"):
        out[rate] = _linked(
            rate,
            {
                "ops": ["all_reduce"],
                "codecs": list(SWEEP_CODECS),
                "sizes": link_sizes,
                "warmup": 1,
                "iters": 3,
                "link": rate,
            },
        )
    return out


def fast_rows(quick: bool, link_ok: bool) -> dict[str, list[dict[str, Any]]]:
    """``benchmarks/bench_fast.py``: codec speed, peak memory, DDP steps."""
    sys.path.insert(0, str(HERE))
    try:
        import bench_fast  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(HERE))
    out = {
        "fast_codecs": bench_fast.codec_rows(size=(1 << 20) if quick else 64 << 20),
        "memory": bench_fast.memory_rows(size=(4 << 20) if quick else 256 << 20),
    }
    kw = {"width": 256, "steps": 2, "warmup": 1} if quick else {}
    out["ddp_loopback"] = bench_fast.ddp_rows(**kw)
    if link_ok:
        out["ddp_1gbit"] = bench_fast.ddp_linked("1gbit", **kw)
    return out


def bench_collectives_rows(quick: bool) -> list[dict[str, Any]] | str:
    """Rows of ``benchmarks/bench_collectives.py`` (64 MiB, none and 1gbit), or why not."""
    sys.path.insert(0, str(HERE))
    try:
        import bench_collectives  # type: ignore[import-not-found]
    except ImportError as exc:
        return f"benchmarks/bench_collectives.py could not be imported: {exc}"
    finally:
        sys.path.remove(str(HERE))
    return bench_collectives.run(repeats=2 if quick else 3)


# ---------------------------------------------------------------- the page


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None, **kw: Any) -> str:
    return "```text\n" + report.format_table(rows, columns, **kw) + "\n```\n"


def _wrap(label: str) -> str:
    """A codec name broken over lines, so that bar-chart labels do not overlap."""
    for sep in ("-", ":", "+"):
        label = label.replace(sep, sep + "\n")
    return label


def _curve_rows(conv: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in conv:
        curve = r.get("curve") or []
        k = max(len(curve) // 60, 1)  # smooth: mean over windows of k steps
        for i in range(0, len(curve) - k + 1, k):
            out.append({"method": r["method"], "step": i + k, "loss": sum(curve[i : i + k]) / k})
    return out


def _fmt(v: Any, spec: str = "{:.2f}") -> str:
    return "-" if v is None else spec.format(v)


def _losers(rows: list[dict[str, Any]], total: int) -> str:
    """ " Slower than plain fp32: int8 @1M, ..." when that list is short enough to read."""
    if not rows or len(rows) == total or len(rows) > 12:
        return ""
    cases = ", ".join(f"{r['codec']} {r['op']} @{r['size'] >> 10} KiB" for r in rows)
    return f" Slower than plain fp32: {cases}."


def _reading(data: dict[str, Any]) -> list[str]:
    """Plain-words findings generated from the numbers on this page."""
    out = []
    for r in data.get("headline", []):
        codec = r["codec"]
        if codec in BASELINES:
            continue
        verdict = "wins" if r["x_fp32"] > 1.05 else ("ties" if r["x_fp32"] > 0.95 else "loses")
        vs16 = (
            "beats" if r["x_bf16"] > 1.05 else ("ties with" if r["x_bf16"] > 0.95 else "loses to")
        )
        out.append(
            f"At 1 Gbit/s, all_reduce of a {r['tensor']}: **{codec}** {verdict} against plain fp32 "
            f"({r['x_fp32']:.2f}x, range {r['x_fp32_range']}) and {vs16} plain bf16 "
            f"({r['x_bf16']:.2f}x); it moves {r['ratio']:.2f}x fewer bytes, with relative "
            f"error {r['rel_err']:.1e}; "
            + (
                f"encode+decode take {100 * r['enc_dec_share']:.0f}% of its time."
                if r["enc_dec_share"] is not None
                else "commpress.stats records no encode/decode time for it."
            )
        )
    for name, label in (
        ("loopback", "unshaped loopback (memory speed)"),
        ("10gbit", "10 Gbit/s"),
        ("1gbit", "1 Gbit/s"),
    ):
        rows = [
            r
            for r in data.get("sweeps", {}).get(name, [])
            if r.get("status") == "ok" and r["codec"] not in BASELINES
        ]
        if not rows:
            continue
        lose32 = [r for r in rows if r["speedup_fp32"] < 1]
        lose16 = [r for r in rows if r["speedup_bf16"] < 1]
        best = max(rows, key=lambda r: r["speedup_fp32"])
        worst = min(rows, key=lambda r: r["speedup_fp32"])
        out.append(
            f"On {label}: compression is slower than plain fp32 in {len(lose32)} of {len(rows)} "
            f"cases and slower than plain bf16 in {len(lose16)} of {len(rows)}. Best: "
            f"{best['codec']} {best['op']} {best['size'] >> 10} KiB at "
            f"{best['speedup_fp32']:.2f}x; "
            f"worst: {worst['codec']} {worst['op']} {worst['size'] >> 10} KiB at "
            f"{worst['speedup_fp32']:.2f}x." + _losers(lose32, len(rows))
        )
    for r in data.get("breakeven", []):
        if r.get("status") != "ok" or r.get("break_even_serial_gbit") is None:
            continue
        out.append(
            f"{r['codec']}: {r['codec_GBps']:.2f} GB/s encode+decode on one core, ratio "
            f"{r['ratio']:.2f}: compression pays below ~{r['break_even_serial_gbit']:.1f} Gbit/s "
            f"if encode, send and decode run one after another, below "
            f"~{r['break_even_pipelined_gbit']:.1f} Gbit/s if they overlap perfectly."
        )
    return out


def _targets(data: dict[str, Any]) -> list[str]:
    """The targets this page reports against, each with the measured value: hit or missed."""
    lines = ["## Targets (reported, not tuned for)", ""]
    head = {(r["tensor"], r["codec"]): r for r in data.get("headline", [])}
    for codec, want in SPEEDUP_TARGETS.items():
        r = next((v for (t, c), v in head.items() if c == codec), None)
        where = "4096x4096" if codec.startswith("powersgd") else "64 MiB"
        if r is None:
            lines.append(f"- {codec} >= {want}x plain fp32 ({where}, 1 Gbit/s): not measured")
            continue
        got = r["x_fp32"]
        verdict = "**hit**" if got >= want else f"**missed** by {want - got:.2f}x"
        lines.append(
            f"- {codec} >= {want}x plain fp32 ({where}, 2 ranks, 1 Gbit/s): measured "
            f"{got:.2f}x (range {r['x_fp32_range']}; {r['x_bf16']:.2f}x plain bf16): {verdict}"
        )
    for r in data.get("fast_codecs", []):
        if r.get("target") is None:
            continue
        lines.append(
            f"- {r['codec']} encode and decode >= 1.0x `dst.copy_(x)` (64 MiB float32, one "
            f"thread): encode {r['encode_x_copy']:.2f}x, decode {r['decode_x_copy']:.2f}x "
            f"(copy_ {r['copy_gbps']:.2f} GB/s, {r['copy_spread']} before/after): "
            f"**{r['target']}**"
        )
    ten = {
        r["codec"]: r
        for r in data.get("sweeps", {}).get("10gbit", [])
        if r.get("status") == "ok" and r.get("size") == 64 << 20
    }
    for codec, want in SPEEDUP_10GBIT_TARGETS.items():
        r = ten.get(codec)
        if r is None:
            lines.append(f"- {codec} >= {want}x plain fp32 (64 MiB, 10 Gbit/s): not measured")
            continue
        got = r["speedup_fp32"]
        verdict = "**hit**" if got >= want else f"**missed** by {want - got:.2f}x"
        lines.append(
            f"- {codec} >= {want}x plain fp32 (64 MiB, 2 ranks, 10 Gbit/s): measured "
            f"{got:.2f}x: {verdict}"
        )
    ddp = {r["method"]: r for r in data.get("ddp_1gbit", [])}
    if "int8" in ddp:
        for key, want in DDP_TARGETS.items():
            got = ddp["int8"][key]
            verdict = "**hit**" if got >= want else f"**missed** by {want - got:.2f}x"
            what = "torch's fp16_compress_hook" if key == "x_torch_fp16_hook" else "plain DDP"
            lines.append(
                f"- DDP step (67 MB of fp32 gradients, 2 ranks, 1 Gbit/s): int8 hook >= "
                f"{want}x {what}: measured {got:.2f}x: {verdict}"
            )
    for r in data.get("memory", []):
        if r["codec"] in ("int8", "int4", "topk", "zstd"):
            lines.append(
                f"- peak extra memory of one {r['codec']} all_reduce (256 MiB float32) <= 0.5x "
                f"the tensor: {r['x_tensor']:.3f}x per call ({r['first_x_tensor']:.3f}x on "
                f"the first call): **{r['target']}**"
            )
    conv = {r["method"]: r for r in data.get("convergence", [])}
    for method, tol in LOSS_TARGETS.items():
        r = conv.get(method)
        if r is None or r.get("rel_gap") is None:
            status = r["status"] if r else "not run"
            lines.append(f"- {method} final train loss within {tol:.0%} of fp32: {status}")
            continue
        gap = r["rel_gap"]
        verdict = "**hit**" if gap <= tol else f"**missed** by {100 * (gap - tol):.2f} points"
        lines.append(
            f"- {method} final train loss within {tol:.0%} of fp32: measured {gap:+.2%} "
            f"(held-out {r['heldout_gap']:+.2%}): {verdict}"
        )
    return lines + [""]


def _fast_section(data: dict[str, Any]) -> list[str]:
    """Codec speed against copy_, peak memory, DDP steps (``benchmarks/bench_fast.py``)."""
    md: list[str] = []
    codecs = data.get("fast_codecs")
    if codecs:
        md += [
            "## Codec speed against one memory pass (64 MiB float32, one thread)",
            "",
            "`commpress codecs` measured the way the collectives use the codecs: encode "
            "into a preallocated wire buffer, decode into a preallocated tensor (CPU "
            "kernels: `commpress.kernels`, numba). `x copy_` divides by `dst.copy_(x)` "
            "into a preallocated buffer of the same size, measured before and after the "
            "codecs (`copy_spread`). Encode reads 4 B and writes ~1 B per element, so "
            "1.0x is memory speed, not a ceiling.",
            "",
            _table(
                codecs,
                [
                    "codec",
                    "ratio",
                    "encode_gbps",
                    "encode_x_copy",
                    "decode_gbps",
                    "decode_x_copy",
                    "copy_gbps",
                    "copy_spread",
                    "rel_l2_error",
                    "target",
                ],
                formats={
                    "ratio": "{:.2f}",
                    "encode_gbps": "{:.2f}",
                    "decode_gbps": "{:.2f}",
                    "encode_x_copy": "{:.2f}",
                    "decode_x_copy": "{:.2f}",
                    "copy_gbps": "{:.2f}",
                    "rel_l2_error": "{:.1e}",
                },
            ),
        ]
    mem = data.get("memory")
    if mem:
        md += [
            "## Peak extra memory of one compressed all_reduce (256 MiB float32, 2 ranks)",
            "",
            "Peak RSS above the RSS before the call (Linux `VmHWM`, reset before each call), "
            "the larger of the two ranks, as a multiple of the tensor's size. `x_tensor`: "
            "the second call from one call site (every call's cost); `first_x_tensor`: the "
            "first, which also allocates the error-feedback residual that sign and top-k "
            "keep between calls (state as large as the tensor).",
            "",
            _table(
                mem,
                ["codec", "x_tensor", "first_x_tensor", "seconds", "target"],
                formats={"x_tensor": "{:.3f}", "first_x_tensor": "{:.3f}", "seconds": "{:.2f}"},
            ),
        ]
    for key, label in (("ddp_loopback", "unshaped loopback"), ("ddp_1gbit", "1 Gbit/s")):
        rows = data.get(key)
        if not rows:
            continue
        md += [
            f"## DDP step, 2 ranks, {label}",
            "",
            "A 2-layer MLP (2 x 2900 x 2900, 67 MB of float32 gradients, DDP's default "
            "25 MB buckets), batch 8, SGD; median step of 5 after 2 warm-up steps, the "
            "slower rank. `plain`: no hook; torch's `fp16_compress_hook` is the torch "
            "baseline that runs on gloo; the others are `commpress.hooks` with that codec.",
            "",
            _table(
                rows,
                ["method", "step_ms", "spread_ms", "x_plain", "x_torch_fp16_hook"],
                formats={"step_ms": "{:.0f}", "x_plain": "{:.2f}", "x_torch_fp16_hook": "{:.2f}"},
            ),
        ]
    return md


def render(
    info: dict[str, Any],
    before: dict[str, Any],
    after: dict[str, Any],
    link_ok: bool,
    link_why: str,
    data: dict[str, Any],
    elapsed: float,
    quick: bool,
) -> str:
    """RESULTS.md from the sections' rows (tables through `commpress.bench.report`)."""
    md = ["# commpress benchmark results", ""]
    if quick:
        md += [
            "> **--quick run: tiny sizes and steps, for checking the pipeline only. Not results.**",
            "",
        ]
    md += [
        "Regenerate everything on this page and in `benchmarks/results/` with one command:",
        "",
        "```bash",
        "python benchmarks/make_results.py",
        "```",
        "",
        f"Measured {info['date']} on {info['cpu']}, {info['cores']} cores, {info['memory']} RAM, "
        f"{info['os']}, Python {info['python']}, torch {info['torch']}. "
        f"**GPU: not run on GPU** (no GPU here; nothing on this page is a GPU claim). "
        f"The run took {elapsed / 60:.1f} min.",
        "",
        f"Load while measuring (a shared machine; other engineers' test runs compete for the "
        f"cores): before load average {before['load1']} (1 min) / {before['load5']} (5 min), "
        f"{before['pytest_procs']} pytest processes; after {after['load1']} / {after['load5']}, "
        f"{after['pytest_procs']} pytest processes; highest 1-min load average seen between "
        f"sections {after.get('load1_max_seen', '-')}. Absolute times are noisy; ratios measured "
        f"in the same invocation are the headline.",
        "",
        "Link emulation: ranks run in a private network namespace whose loopback is shaped by "
        "`tc tbf` (`commpress.bench.netem`). The rate is the *aggregate* of both ranks' "
        "traffic (a shared medium), so a 2-rank all_reduce sees about half the rate per rank; "
        "speedups between codecs are unaffected since all traffic is shaped alike."
        + (
            ""
            if link_ok
            else f" **Link emulation was not available: {link_why}; linked sections are missing.**"
        ),
        "",
    ]
    md += _targets(data)
    head = data.get("headline")
    if head:
        md += [
            "## Headline: fp32 all_reduce, 2 ranks, emulated 1 Gbit/s",
            "",
            "Median over repeats (each a fresh pair of ranks, 3 timed iterations each, a "
            "time being the slower rank's); ranges are min..max over repeats. `x fp32` / "
            "`x bf16`: plain fp32 / plain bf16 time over this codec's time in the same "
            "invocation. PowerSGD rank 4 runs on one 4096x4096 matrix (64 MiB). `rel_err` is "
            "one call against plain fp32 on random data: sign, top-k and PowerSGD drop most of "
            "a single call's signal by design and make it up over steps with error feedback "
            "(a random matrix has no low-rank structure) -- the convergence table is where "
            "they are judged. `enc_dec_share`: encode+decode seconds from `commpress.stats` "
            "over the call's time ('-': none recorded).",
            "",
            _table(
                head,
                [
                    "tensor",
                    "codec",
                    "ratio",
                    "time_ms",
                    "time_range_ms",
                    "x_fp32",
                    "x_fp32_range",
                    "x_bf16",
                    "x_bf16_range",
                    "rel_err",
                    "enc_dec_share",
                    "target_x_fp32",
                    "target",
                ],
                formats={
                    "rel_err": "{:.1e}",
                    "enc_dec_share": lambda v: f"{100 * v:.0f}%",
                    "time_ms": "{:.0f}",
                    "ratio": "{:.2f}",
                    "x_fp32": "{:.2f}",
                    "x_bf16": "{:.2f}",
                },
            ),
            "![speedup](results/headline_speedup.png)",
            "",
        ]
    md += _fast_section(data)
    conv = data.get("convergence")
    if conv:
        cfg = StudyConfig(**data["convergence_config"])
        for r in conv:
            t = LOSS_TARGETS.get(r["method"])
            if t is not None and r.get("rel_gap") is not None:
                gap = r["rel_gap"]
                r["target"] = f"within {t:.0%}: " + ("hit" if gap <= t else f"missed ({gap:+.2%})")
            elif t is not None:
                r["target"] = f"within {t:.0%}: not measured"
        md += [
            "## Convergence: byte-level transformer LM, DDP on 2 ranks over 1 Gbit/s",
            "",
            f"{cfg.layers} layers, d_model {cfg.d_model}, {cfg.heads} heads, context "
            f"{cfg.context}, batch {cfg.batch} per rank, {cfg.steps} AdamW steps (lr {cfg.lr}, "
            f"warmup + cosine), text = this interpreter's stdlib `*.py` files (held-out = files "
            "not trained on). Same seed, weights and batch order for every method. Final "
            "train loss = mean of the last 10% of steps; `gap` = relative to fp32. The step "
            "budget was chosen so the whole study fits in ~10 minutes on this machine; it "
            "is short training, so small gaps are within run-to-run noise of the codecs' "
            "rounding, and it says nothing about long runs. commpress codecs run through "
            "`commpress.hooks.compress_hook`; `ef-` = error feedback on. torch's own "
            "`fp16_compress_hook` is the DDP baseline that runs on gloo; its `powerSGD_hook` "
            "is not trained here because it aborts or hangs gloo runs (see the hooks table). "
            "`step_ms` is the median step time over the emulated 1 Gbit/s link.",
            "",
            _table(
                conv,
                [
                    "method",
                    "final_train_loss",
                    "rel_gap",
                    "heldout_loss",
                    "heldout_gap",
                    "step_ms",
                    "step_speedup",
                    "target",
                    "status",
                ],
                formats={
                    "final_train_loss": "{:.4f}",
                    "heldout_loss": "{:.4f}",
                    "rel_gap": "{:+.2%}",
                    "heldout_gap": "{:+.2%}",
                    "step_ms": "{:.0f}",
                    "step_speedup": "{:.2f}",
                },
            ),
            "![loss curves](results/convergence_loss.png)",
            "",
        ]
    hooks = data.get("ddp_hooks")
    if hooks:
        md += [
            "## torch's own DDP hooks on gloo",
            "",
            "Each probed in a subprocess that may die (a small MLP with LayerNorm, 6 steps, "
            "2 ranks; a hook that runs is tried twice, since powerSGD_hook's abort does not "
            "happen on every run -- `runs` counts the attempts that completed): what a DDP "
            "user on CPU/gloo has without commpress. The convergence table above tries the "
            "hooks that run once more, on the transformer.",
            "",
            _table(
                hooks,
                ["hook", "status", "runs", "step_ms", "error"],
                formats={"step_ms": "{:.1f}", "error": clean_error},
            ),
        ]
    be = data.get("breakeven")
    if be:
        md += [
            "## Codec throughput and break-even link speed",
            "",
            "Encode + decode of 64 MiB fp32 `randn` on one core (as each benchmark rank "
            "has). Serial model: `t = S/B_codec + S/(r*B_link)` vs `S/B_link`, wins while "
            "`B_link < B_codec*(1-1/r)`; pipelined: `max(S/B_codec, S/(r*B_link))`, wins "
            "while `B_link < B_codec`. Break-even speeds in Gbit/s; `model x 1gbit` is the "
            "modelled speedup of one transfer at 1 Gbit/s (a two-phase all_reduce does more "
            "codec work per byte than this model: see the headline for the measured value). "
            "PowerSGD on random data has error ~1 (random matrices are not low rank).",
            "",
            _table(
                be,
                [
                    "codec",
                    "encode_GBps",
                    "decode_GBps",
                    "codec_GBps",
                    "ratio",
                    "rel_err",
                    "break_even_serial_gbit",
                    "break_even_pipelined_gbit",
                    "model_speedup_1gbit_serial",
                    "model_speedup_1gbit_pipelined",
                    "status",
                ],
                headers={
                    "break_even_serial_gbit": "serial Gbit/s",
                    "break_even_pipelined_gbit": "pipelined Gbit/s",
                    "model_speedup_1gbit_serial": "model x 1gbit serial",
                    "model_speedup_1gbit_pipelined": "model x 1gbit pipelined",
                },
                formats={"rel_err": "{:.1e}"},
            ),
        ]
    for name, rows in data.get("sweeps", {}).items():
        label = {"loopback": "unshaped loopback, all ops"}.get(name, f"all_reduce at {name}")
        md += [
            f"## commpress bench: {label}",
            "",
            f"`commpress bench` rows ({len(rows)} cases), 2 ranks. Columns as in "
            "`commpress bench --help`: busbw on uncompressed bytes with nccl-tests' factors.",
            "",
            "```text",
            format_rows(rows),
            "```",
            "",
            f"![busbw](results/sweep_{name}.png)",
            "",
        ]
    bc = data.get("bench_collectives")
    if bc is not None:
        md += ["## benchmarks/bench_collectives.py", ""]
        md += [_table(bc)] if isinstance(bc, list) else [f"Not run: {bc}", ""]
    for name, title in INCLUDED:
        path = HERE / "results" / name
        if path.exists():
            md += _included(path.read_text(), title)
    md += ["## Reading", ""]
    md += [f"- {line}" for line in _reading(data)]
    md += ["", READING_NOTES, ""]
    return "\n".join(md)


#: Sections that their own scripts measure and write to benchmarks/results/ (not this
#: one), included as they are: (file, title; None when the file has its own).
INCLUDED = (
    ("auto_grid.md", '## `codec="auto"` against every option (`benchmarks/auto_grid.py`)'),
    ("small_calls.md", None),  # benchmarks/small_calls.py (issue 10)
    ("multihost.md", None),  # benchmarks/bench_multihost.py, multihost_moves.py (issue 13)
)


def _included(text: str, title: str | None) -> list[str]:
    """An included file's lines under ``title``, or under its own title with its headings
    one level down when it starts at ``#`` (this page's sections are ``##``)."""
    text = text.strip()
    if title is not None:
        return [title, "", text, ""]
    if text.startswith("# "):
        text = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
    return [text, ""]


READING_NOTES = """\
How to read these numbers:

- Compression pays only when the link, not the CPU, is the bottleneck. The
  codecs here run on one CPU core per rank (no GPU), at the encode/decode
  speeds in the break-even table; unshaped loopback moves bytes at memory
  speed, so that sweep shows the cost of compressing when the link is fast.
- Over a slow link, time is roughly `codec work + bytes/ratio / link`. The
  break-even table turns measured codec speed and ratio into the link speed
  below which a codec should win; a two-phase all_reduce does several
  encode/decode passes per byte, so its real break-even is lower than the
  one-pass model says.
- The model's link rate is the nominal one, but the emulated link is a
  shared medium: in a 2-rank all_reduce both ranks send at once, so each
  gets about half of it. That is why measured speedups at "1 Gbit/s" can
  exceed the model's 1 Gbit/s prediction; the break-even speeds are per
  rank.
- The bf16 baseline is always next to fp32: a codec that beats fp32 but not
  bf16 buys nothing that keeping gradients in bf16 would not.
- Biased codecs (sign, top-k) train only with error feedback; the
  convergence table runs them with it.
- Nothing here was run on a GPU; GPU codec throughput, and so break-even
  points on NVLink/InfiniBand, are not measured."""


#: Section -> file in benchmarks/results/ its rows are saved to.
SECTION_FILES = {
    "bench_collectives": "collectives_64mib.json",
    "breakeven": "breakeven.json",
    "ddp_hooks": "ddp_hooks.json",
    "convergence": "convergence.json",
    "fast_codecs": "fast_codecs.json",
    "memory": "memory.json",
    "ddp_loopback": "ddp_step_loopback.json",
    "ddp_1gbit": "ddp_step_1gbit.json",
}


def load_run() -> dict[str, Any]:
    """`render`'s arguments from benchmarks/results/ (what the last run saved)."""
    _, run = report.read_json(OUT / "run.json")
    data: dict[str, Any] = {}
    if (OUT / "headline_raw.json").exists():
        data["headline"] = summarize(report.read_json(OUT / "headline_raw.json")[0])
    for section, name in SECTION_FILES.items():
        if (OUT / name).exists():
            data[section] = report.read_json(OUT / name)[0]
    sweeps = {}
    for name in ("loopback", "1gbit", "10gbit"):
        if (OUT / f"sweep_{name}.json").exists():
            sweeps[name] = report.read_json(OUT / f"sweep_{name}.json")[0]
    data["sweeps"] = sweeps
    data["convergence_config"] = run.get("convergence_config")
    return {
        "info": run["info"],
        "before": run["before"],
        "after": run["after"],
        "link_ok": run["link_ok"],
        "link_why": run["link_why"],
        "data": data,
        "elapsed": run["elapsed"],
        "quick": run["quick"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes and steps: check the pipeline")
    p.add_argument("--skip", default="", help="comma list of sections to skip (for debugging)")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: rebuild RESULTS.md from benchmarks/results/*.json",
    )
    args = p.parse_args(argv)
    if args.render_only:
        PAGE.write_text(render(**load_run()))
        print(f"wrote {PAGE}", file=sys.stderr)
        return 0
    skip = set(filter(None, args.skip.split(",")))
    OUT.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    info = machine()
    load_before = load()
    link_ok, link_why = netem.link_available()

    loads = [load_before["load1"]]

    def log(msg: str) -> None:
        loads.append(round(os.getloadavg()[0], 2))
        stamp = f"[make_results {time.perf_counter() - t_start:5.0f}s load {loads[-1]:.2f}]"
        print(f"{stamp} {msg}", file=sys.stderr, flush=True)

    data: dict[str, Any] = {}

    if "headline" not in skip and link_ok:
        log("headline: 64 MiB all_reduce at 1gbit")
        size, shape = ((4 << 20), (1024, 1024)) if args.quick else ((64 << 20), (4096, 4096))
        raw = headline(1 if args.quick else 3, size, 2 if args.quick else 3, shape)
        report.write_json(OUT / "headline_raw.json", raw, info)
        data["headline"] = summarize(raw)
        report.write_json(OUT / "headline.json", data["headline"], info)
        report.plot(
            [{**r, "codec": _wrap(r["codec"])} for r in data["headline"]],
            x="codec",
            y="x_fp32",
            series="tensor",
            path=OUT / "headline_speedup.png",
            kind="bar",
            title="all_reduce speedup over plain fp32, 2 ranks, 1 Gbit/s",
            ylabel="speedup vs plain fp32 (median of repeats)",
        )
    if "fast" not in skip:
        log("fast: codec speed, memory, DDP steps")
        for section, rows in fast_rows(args.quick, link_ok).items():
            data[section] = rows
            report.write_json(OUT / SECTION_FILES[section], rows, info)
    if "bench_collectives" not in skip:
        log("bench_collectives")
        data["bench_collectives"] = bench_collectives_rows(args.quick)
        if isinstance(data["bench_collectives"], list):
            report.write_json(OUT / "collectives_64mib.json", data["bench_collectives"], info)
    if "sweeps" not in skip:
        log("sweeps")
        data["sweeps"] = sweeps(args.quick) if link_ok else {}
        for name, rows in data["sweeps"].items():
            report.write_json(OUT / f"sweep_{name}.json", rows, info)
            report.write_csv(OUT / f"sweep_{name}.csv", rows)
            report.plot(
                [r for r in rows if r.get("status") == "ok"],
                x="size",
                y="busbw_GBps",
                series=["op", "codec"] if name == "loopback" else "codec",
                path=OUT / f"sweep_{name}.png",
                logx=True,
                logy=True,
                title=f"busbw vs size, 2 ranks, link {name}",
                xlabel="size (bytes of fp32)",
                ylabel="busbw (GB/s, uncompressed bytes)",
            )
    if "breakeven" not in skip:
        log("breakeven")
        data["breakeven"] = codec_rows(
            BREAKEVEN_CODECS, nbytes=(4 << 20) if args.quick else (64 << 20), repeats=3
        )
        report.write_json(OUT / "breakeven.json", data["breakeven"], info)
    if "ddp_hooks" not in skip:
        log("ddp_hooks")
        data["ddp_hooks"] = probe_torch_hooks()
        report.write_json(OUT / "ddp_hooks.json", data["ddp_hooks"], info)
    if "convergence" not in skip:
        log("convergence")
        cfg = StudyConfig(steps=10) if args.quick else StudyConfig()
        data["convergence"] = study(METHODS, cfg, "1gbit" if link_ok else "none")
        report.write_json(OUT / "convergence.json", data["convergence"], info)
        report.plot(
            _curve_rows(data["convergence"]),
            x="step",
            y="loss",
            series="method",
            path=OUT / "convergence_loss.png",
            title=f"train loss (window mean), 2 ranks, {cfg.steps} steps",
            ylabel="cross-entropy (nats/byte)",
        )
        data["convergence_config"] = asdict(cfg)
    load_after = load()
    load_after["load1_max_seen"] = max(loads + [load_after["load1"]])
    run = {
        "info": info,
        "before": load_before,
        "after": load_after,
        "link_ok": link_ok,
        "link_why": link_why,
        "elapsed": time.perf_counter() - t_start,
        "quick": args.quick,
        "convergence_config": data.get("convergence_config"),
    }
    report.write_json(OUT / "run.json", [], run)
    PAGE.write_text(render(**load_run()))
    log(f"wrote {PAGE.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
