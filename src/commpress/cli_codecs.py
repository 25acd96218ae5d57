"""``commpress codecs``: ratio, speed and error of every codec on sample data.

One row per registered codec (plus a few chains), measured on seeded
Gaussian data of the requested size and dtype, on one thread unless
``--threads`` says otherwise::

    commpress codecs                          # 16 MiB of float32 on the CPU
    commpress codecs --size 64MiB --dtype bfloat16 --repeat 5
    commpress codecs --codecs none,int8:block=128,zstd:level=9 --json

Columns: ``ratio`` is input bytes / payload bytes; ``encode GB/s`` and
``decode GB/s`` are *uncompressed* bytes per second (1 GB = 1e9 bytes),
median of ``--repeat`` runs after one warm-up; ``rel L2 error`` is
``||decode(encode(x)) - x|| / ||x||``. Encode writes into a preallocated
wire buffer (``wire.encode_pack(..., out=)``) where the codec declares its
layout, decode into a preallocated tensor (``decode(packet, out=)``): what
the collectives do. The yardstick is the first row, ``dst.copy_(x)`` into a
preallocated buffer (one read and one write pass); the ``x copy_`` columns
divide by it, so a codec at 1.0x runs at memory speed. ``tensor.clone()``
shows what a fresh allocation costs on top (page faults). Codecs that
cannot take the dtype or the device show ``n/a``.

The measuring functions return rows (`CodecRow`); one writer turns them
into the table, another into JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import torch

from . import units, wire
from .codec import Codec
from .errors import CommpressError
from .registry import get_codec, list_codecs

__all__ = [
    "CodecRow",
    "DEFAULT_SIZE",
    "DTYPES",
    "add_parser",
    "measure_clone",
    "measure_copy",
    "measure_codec",
    "parse_codec_list",
    "parse_size",
    "run",
    "sample",
    "format_table",
]

DEFAULT_SIZE = 16 << 20
#: Chains shown by default when all their stages are registered.
DEFAULT_CHAINS = ("bf16+zstd", "bf16+lz4", "int8+zstd", "fp8+lz4")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}


def parse_size(text: str) -> int:
    """`commpress.units.parse_size` of at least 1 byte, as an argparse ``type``.

    Raises:
        argparse.ArgumentTypeError: not a size (the message names the grammar).
    """
    try:
        return units.parse_size(text, minimum=1)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid {exc}") from None


def parse_codec_list(text: str) -> list[Codec]:
    """Codecs from ``"none,int8:block=128,stochastic=1,zstd"``.

    Commas separate specs, except where the text after a comma is a ``key=value``
    parameter of the spec before it.

    Raises:
        argparse.ArgumentTypeError: an empty list or a spec that does not resolve.
    """
    specs: list[str] = []
    for piece in text.split(","):
        if specs and re.match(r"^\s*\w+\s*=", piece):
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    codecs = []
    for spec in specs:
        try:
            codecs.append(get_codec(spec.strip()))
        except CommpressError as exc:
            raise argparse.ArgumentTypeError(f"invalid {exc}") from None
    if not codecs:
        raise argparse.ArgumentTypeError(f"no codecs in {text!r}")
    return codecs


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def default_codecs() -> list[Codec]:
    """Every registered codec, then the default chains whose stages are registered."""
    names = list_codecs()
    chains = [c for c in DEFAULT_CHAINS if all(part in names for part in c.split("+"))]
    return [get_codec(name) for name in names + chains]


def sample(numel: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """Seeded Gaussian data; integers get ``round(16 * N(0, 1))``, bool ``N(0, 1) > 0``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g)
    if dtype == torch.bool:
        x = x > 0
    elif not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        x = (x * 16).round().clamp(info.min, info.max)
    return x.to(dtype).to(device)


@dataclass(frozen=True)
class CodecRow:
    """One measured codec. Numbers are None where the codec does not apply (``note`` says why)."""

    codec: str
    ratio: float | None = None
    encode_gbps: float | None = None
    decode_gbps: float | None = None
    rel_l2_error: float | None = None
    note: str = ""
    failed: bool = False


def _timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def median_seconds(fn: Callable[[], Any], repeat: int) -> float:
        fn()  # warm-up: allocator, lazy imports, caches
        times = []
        for _ in range(repeat):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return median_seconds


def measure_clone(x: torch.Tensor, repeat: int) -> float:
    """GB/s of ``x.clone()`` (a fresh allocation each time)."""
    seconds = _timer(x.device)(x.clone, repeat)
    return x.numel() * x.element_size() / seconds / 1e9


def measure_copy(x: torch.Tensor, repeat: int) -> float:
    """GB/s of ``dst.copy_(x)`` into a preallocated buffer: the memory-speed yardstick."""
    dst = torch.empty_like(x)
    seconds = _timer(x.device)(lambda: dst.copy_(x), repeat)
    return x.numel() * x.element_size() / seconds / 1e9


def _rel_l2(decoded: torch.Tensor, x: torch.Tensor) -> float:
    ref = x.double()
    norm = float(ref.norm())
    diff = float((decoded.double() - ref).norm())
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / norm


def measure_codec(codec: Codec, x: torch.Tensor, repeat: int) -> CodecRow:
    """Ratio, speeds and error of ``codec`` on ``x``; an ``n/a`` row when it does not apply."""
    if not codec.supports(x.dtype):
        return CodecRow(codec.spec, note=f"n/a: does not take {str(x.dtype)[6:]}")
    if codec.devices is not None and x.device.type not in codec.devices:
        return CodecRow(codec.spec, note=f"n/a: runs on {', '.join(codec.devices)}")
    try:
        packet = codec.encode(x)
    except CommpressError as exc:
        return CodecRow(codec.spec, note=f"n/a: {exc}")
    median_seconds = _timer(x.device)
    nbytes = x.numel() * x.element_size()
    if codec.sections(x.numel(), x.dtype) is not None:
        buf = wire.encode_pack(codec, x)
        encode_s = median_seconds(lambda: wire.encode_pack(codec, x, out=buf), repeat)
    else:
        encode_s = median_seconds(lambda: codec.encode(x), repeat)
    dst = torch.empty_like(x)
    decode_s = median_seconds(lambda: codec.decode(packet, out=dst), repeat)
    decoded = codec.decode(packet)
    return CodecRow(
        codec.spec,
        ratio=nbytes / packet.nbytes if packet.nbytes else math.inf,
        encode_gbps=nbytes / encode_s / 1e9,
        decode_gbps=nbytes / decode_s / 1e9,
        rel_l2_error=_rel_l2(decoded, x),
    )


class Progress:
    """A text progress bar on a terminal (``\\r``-redrawn); silent when disabled."""

    def __init__(self, total: int, stream: IO[str], enabled: bool, width: int = 24) -> None:
        self.total, self.stream, self.enabled, self.width = total, stream, enabled, width
        self.done = 0
        self._last = 0

    def step(self, label: str) -> None:
        """Show that ``label`` is being measured now."""
        if not self.enabled:
            return
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} {label}"
        self.stream.write("\r" + line.ljust(self._last))
        self.stream.flush()
        self._last = len(line)
        self.done += 1

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * self._last + "\r")
            self.stream.flush()


def _fmt_gbps(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _fmt_ratio(v: float | None) -> str:
    return "n/a" if v is None else ("inf" if math.isinf(v) else f"{v:.2f}")


def _fmt_err(v: float | None) -> str:
    return "n/a" if v is None else ("0" if v == 0 else f"{v:.2e}")


def _fmt_x(v: float | None, yardstick: float) -> str:
    return "n/a" if v is None or yardstick <= 0 else f"{v / yardstick:.2f}x"


def format_table(
    rows: list[CodecRow], clone_gbps: float, title: str, copy_gbps: float | None = None
) -> str:
    """The rows as an aligned text table, the ``dst.copy_(x)`` yardstick first."""
    copy = clone_gbps if copy_gbps is None else copy_gbps
    header = ("codec", "ratio", "encode GB/s", "x copy_", "decode GB/s", "x copy_", "rel L2 error")
    body = [
        ("dst.copy_(x)", "-", _fmt_gbps(copy), "1.00x", _fmt_gbps(copy), "1.00x", "-"),
        (
            "tensor.clone()",
            "-",
            _fmt_gbps(clone_gbps),
            _fmt_x(clone_gbps, copy),
            _fmt_gbps(clone_gbps),
            _fmt_x(clone_gbps, copy),
            "-",
        ),
    ]
    notes = []
    for row in rows:
        body.append(
            (
                row.codec,
                _fmt_ratio(row.ratio),
                _fmt_gbps(row.encode_gbps),
                _fmt_x(row.encode_gbps, copy),
                _fmt_gbps(row.decode_gbps),
                _fmt_x(row.decode_gbps, copy),
                _fmt_err(row.rel_l2_error),
            )
        )
        if row.note:
            notes.append(f"  {row.codec}: {row.note}")
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    out = [title, line(header), line(tuple("-" * w for w in widths)), *map(line, body)]
    out.append(
        "ratio = input bytes / payload bytes; GB/s = uncompressed bytes per second (1e9); "
        "x copy_ = GB/s / that of dst.copy_(x) into a preallocated buffer (memory speed)"
    )
    if notes:
        out += ["notes:", *notes]
    return "\n".join(out)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``commpress codecs``."""
    p = subparsers.add_parser(
        "codecs",
        help="measure ratio, speed and error of every codec",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument(
        "--size",
        type=parse_size,
        default=DEFAULT_SIZE,
        help="bytes of sample data, e.g. 1K, 4M, 64MiB, 1G (default: 16MiB)",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="(default: float32)")
    p.add_argument(
        "--codecs",
        type=parse_codec_list,
        default=None,
        metavar="SPEC,SPEC",
        help="comma-separated codec specs (default: every registered codec and a few chains)",
    )
    p.add_argument("--repeat", type=_positive_int, default=3, help="timed runs (default: 3)")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch (and kernel) threads while measuring (default: 1)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="sample data seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Measure and print; returns 1 if a codec failed unexpectedly, else 0."""
    out = out or sys.stdout
    dtype = DTYPES[args.dtype]
    itemsize = dtype.itemsize
    if args.size < itemsize:
        print(
            f"commpress codecs: error: --size {args.size} is smaller than one {args.dtype} "
            f"element ({itemsize} bytes)",
            file=sys.stderr,
        )
        return 2
    try:
        device = torch.device(args.device)
        x = sample(args.size // itemsize, dtype, str(device), args.seed)
    except (RuntimeError, AssertionError) as exc:
        print(f"commpress codecs: error: cannot use device {args.device!r}: {exc}", file=sys.stderr)
        return 2
    codecs = args.codecs if args.codecs is not None else default_codecs()
    enabled = sys.stderr.isatty() if args.progress is None else args.progress
    progress = Progress(len(codecs) + 1, sys.stderr, enabled)
    rows = []
    try:
        progress.step("dst.copy_(x)")
        torch.set_num_threads(args.threads)
        copy_gbps = measure_copy(x, args.repeat)
        clone_gbps = measure_clone(x, args.repeat)
        for codec in codecs:
            progress.step(codec.spec)
            try:
                rows.append(measure_codec(codec, x, args.repeat))
            except Exception as exc:  # noqa: BLE001 - one broken codec must not hide the others
                rows.append(
                    CodecRow(codec.spec, note=f"failed: {type(exc).__name__}: {exc}", failed=True)
                )
    finally:
        progress.close()
    nbytes = x.numel() * x.element_size()
    if args.json:
        doc = {
            "size_bytes": nbytes,
            "numel": x.numel(),
            "dtype": args.dtype,
            "device": str(device),
            "repeat": args.repeat,
            "seed": args.seed,
            "threads": args.threads,
            "copy_gbps": copy_gbps,
            "clone_gbps": clone_gbps,
            "rows": [_json_row(r) for r in rows],
        }
        out.write(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    else:
        title = (
            f"commpress codecs: {units.format_size(nbytes)} of {args.dtype} "
            f"({x.numel()} Gaussian elements, seed {args.seed}) on {device}, "
            f"{args.threads} thread(s), median of {args.repeat}"
        )
        out.write(format_table(rows, clone_gbps, title, copy_gbps) + "\n")
    return 1 if any(r.failed for r in rows) else 0


def _json_row(row: CodecRow) -> dict[str, Any]:
    # JSON has no Infinity: a ratio of a zero-byte payload becomes null, like n/a.
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v
        for k, v in dataclasses.asdict(row).items()
    }
